"""CT on CIFAR-10 (jcm cifar10_ve_ct_adaptive.py + launch.sh): s0=2, s1=150, mu0=0.9, K=800k."""

from configs import _paper


def get_config():
    config = _paper.cifar10(_paper.new())
    _paper.ct(config, end_scales=150, start_ema=0.9, lr=4e-4, steps=800000)
    config.sampling.update(steps=151, ts=())
    config.eval.settings = ("1",)
    return config
