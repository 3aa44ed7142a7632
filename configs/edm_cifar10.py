"""EDM teacher on CIFAR-10 (jcm configs/cifar10_k_ve.py): NCSN++, Adam 1e-3, 400k steps."""

import math

from configs import _paper


def get_config():
    config = _paper.cifar10(_paper.new())
    config.training.update(loss="edm", num_steps=400000)
    # EMA half-life of 0.5M images at batch 512, as jcm's EDM config.
    config.training.ema_rates = (math.exp(math.log(0.5) / (0.5e6 / 512)),)
    config.model.dropout = 0.13
    config.sampling.teacher_steps = 18  # Heun, NFE 35 (EDM)
    config.eval.settings = ("18",)
    config.optim.update(optimizer="adam", lr=1e-3, warmup_steps=19531)  # 1e7 images / 512
    config.sampling.teacher_steps = 18  # Heun, 35 network evaluations
    config.eval.settings = ("18",)
    return config
