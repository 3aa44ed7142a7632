"""EDM teacher on the bundled digits: the CD teacher of cd_digits (Heun sampling, 18 steps)."""

from configs import _digits


def get_config():
    config = _digits.digits()
    config.training.update(loss="edm", num_steps=2000)
    config.optim.update(optimizer="adam", lr=1e-3, warmup_steps=200)
    config.sampling.teacher_steps = 18
    config.eval.settings = ("18",)
    # Off while training: one evaluation (5,000 samples by Heun at 35 NFE) takes ~75 s, over 10%
    # of this ~7-minute run; `--mode=eval` scores the trained teacher (launch.sh digits does).
    config.eval.every_steps = 0
    return config
