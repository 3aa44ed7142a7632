"""CT on the bundled digits from scratch: adaptive N(k) 2 -> 40, mu0 = 0.9, l2, minutes on CPU.

1,200 steps fit the README's 10 minutes on 2 CPU cores but give noise (one-step FID ~1,220, as
the official code on that budget). The recipe converges when its curriculum is stretched:
--config.training.num_steps=20000 --config.training.total_steps=20000 gives one-step digits FID
33.1 at 10,000 steps and 21.6 at 20,000, two-step 24.3 and 14.0, ~75-100 min on 2 cores
(benchmarks/results/convergence_digits_2026-12-04_cb67930.md). iCT and CD do much better per
minute: configs/ict_digits.py stretched the same way scores 7.7 / 5.3 at 10,000 steps and
4.2 / 1.35 at 17,000 (same file; benchmarks/quality_digits.py).
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
