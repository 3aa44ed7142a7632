"""The CM paper's continuous-time CD/CT on the bundled digits, from the edm_digits teacher.

--config=configs/continuous_digits.py:cd-l2 (default), :cd-l2-stopgrad or :ct-l2.
"""

from configs import _digits, _successors


def get_config(variant: str = "cd-l2"):
    config = _digits.digits()
    _successors.continuous(config, variant)
    config.training.update(num_steps=2000, teacher_checkpoint="runs/edm_digits/checkpoints")
    return config
