"""CT on the bundled digits from scratch: adaptive N(k) 2 -> 40, mu0 = 0.9, l2, minutes on CPU.

1,200 steps fit the README's 10 minutes on 2 CPU cores; CT from scratch needs far more for
good one-step samples (benchmarks/quality_digits.py: iCT and CD do much better per minute).
"""

from configs import _digits


def get_config():
    config = _digits.digits()
    config.training.update(
        loss="ct",
        distance="l2",
        target_ema_mode="adaptive",
        scale_mode="progressive",
        start_scales=2,
        end_scales=40,
        start_ema=0.9,
        num_steps=1200,
        total_steps=1200,
    )
    config.sampling.update(steps=41, ts=())
    config.eval.settings = ("1", "0,22,40")  # two steps: sigma 80, then 1.58
    return config
