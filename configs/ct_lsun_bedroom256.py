"""CT on LSUN Bedroom 256 (cm launch.sh): s1=150, mu0=0.95, RAdam 5e-5, batch 256, 1M steps."""

from configs import _paper


def get_config():
    config = _paper.lsun256(_paper.new())
    _paper.ct(config, end_scales=150, start_ema=0.95, lr=5e-5, steps=1000000)
    _paper.two_step(config, steps=151, ts=(0, 67, 150))
    return config
