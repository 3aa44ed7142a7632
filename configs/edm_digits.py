"""EDM teacher on the bundled digits: the CD teacher of cd_digits (Heun sampling, 18 steps)."""

from configs import _digits


def get_config():
    config = _digits.digits()
    config.training.update(loss="edm", num_steps=2000)
    config.optim.update(optimizer="adam", lr=1e-3, warmup_steps=200)
    config.sampling.teacher_steps = 18
    config.eval.settings = ("18",)
    return config
