"""CT on ImageNet 64 (cm launch.sh): s1=200, mu0=0.95, RAdam 1e-4, batch 2048, 800k steps.

launch.sh passes a teacher path, which makes cm copy EDM weights into the "CT" student; here CT
starts from scratch unless --config.training.init_from_teacher=True is given with a teacher.
"""

from configs import _paper


def get_config():
    config = _paper.imagenet64(_paper.new())
    _paper.ct(config, end_scales=200, start_ema=0.95, lr=1e-4, steps=800000)
    _paper.two_step(config, steps=201, ts=(0, 106, 200))
    return config
