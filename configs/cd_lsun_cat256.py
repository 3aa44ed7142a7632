"""CD on LSUN Cat 256 (cm launch.sh, bedroom settings): images from data.folder (PNG export).

The references give no two-step setting for Cat CD: sampling defaults to one step.
"""

from configs import _paper

VARIANTS = ("l1", "l2", "lpips")  # --config=FILE:ARG


def get_config(metric: str = "lpips"):
    config = _paper.lsun256(_paper.new(), name="image_folder")
    _paper.cd(config, metric, num_scales=40, target_ema=0.95, lr=1e-5, steps=600000)
    config.sampling.update(steps=40, ts=())
    config.eval.settings = ("1",)
    return config
