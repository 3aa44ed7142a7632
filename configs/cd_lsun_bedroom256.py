"""CD on LSUN Bedroom 256 (cm launch.sh): N=40, mu=0.95, RAdam 1e-5, batch 256, 600k steps."""

from configs import _paper

TS = {"lpips": (0, 17, 39), "l2": (0, 18, 39)}  # launch.sh two-step settings


VARIANTS = ("l1", "l2", "lpips")  # --config=FILE:ARG


def get_config(metric: str = "lpips"):
    config = _paper.lsun256(_paper.new())
    _paper.cd(config, metric, num_scales=40, target_ema=0.95, lr=1e-5, steps=600000)
    _paper.two_step(config, steps=40, ts=TS.get(metric, (0, 17, 39)))
    return config
