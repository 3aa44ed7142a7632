"""CD on ImageNet 64 (cm launch.sh): N=40, mu=0.95, RAdam 8e-6, batch 2048, 600k steps.

--config=configs/cd_imagenet64.py:lpips (default) or :l2.
"""

from configs import _paper

VARIANTS = ("l1", "l2", "lpips")  # --config=FILE:ARG


def get_config(metric: str = "lpips"):
    config = _paper.imagenet64(_paper.new())
    _paper.cd(config, metric, num_scales=40, target_ema=0.95, lr=8e-6, steps=600000)
    _paper.two_step(config, steps=40, ts=(0, 22, 39))  # launch.sh two-step setting
    return config
