"""The CM paper's continuous-time CD/CT on CIFAR-10 (jcm cifar10_ve_continuous.py, launch.sh).

--config=configs/continuous_cifar10.py:cd-l2 (default), :cd-l2-stopgrad or :ct-l2; all start
from the EDM teacher (finetune): --config.training.teacher_checkpoint=RUNS/edm_cifar10/checkpoints.
NCSN++ with Fourier scale 16, dropout 0.3, RAdam, batch 512, 800k steps.
"""

from configs import _paper, _successors

VARIANTS = _successors.CONTINUOUS_VARIANTS  # --config=FILE:ARG


def get_config(variant: str = "cd-l2"):
    config = _paper.cifar10(_paper.new())
    _successors.continuous(config, variant)
    config.model.dropout = 0.3
    config.training.num_steps = 800000
    return config
