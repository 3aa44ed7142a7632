"""The CM paper's continuous-time CD/CT on the bundled digits, from the edm_digits teacher.

--config=configs/continuous_digits.py:cd-l2 (default), :cd-l2-stopgrad or :ct-l2.
"""

from configs import _digits, _successors

VARIANTS = _successors.CONTINUOUS_VARIANTS  # --config=FILE:ARG


def get_config(variant: str = "cd-l2"):
    config = _digits.digits()
    _successors.continuous(config, variant)
    config.training.update(num_steps=2000, teacher_checkpoint="runs/edm_digits/checkpoints")
    if config.training.continuous_stopgrad:
        # jcm's 5e-6 suits 800k steps at batch 512; in a digits run it leaves the teacher as it
        # is (300 steps: FID 356 vs the teacher's 384). 1e-4 gives CT 26.0 / 10.4 in 1,000 steps.
        config.optim.lr = 1e-4
    return config
