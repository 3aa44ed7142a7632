"""sCM on CIFAR-10 (Lu & Song 2024, App. G): sCT (default), sCD, or their TrigFlow teacher.

--config=configs/scm_cifar10.py:teacher trains the TrigFlow diffusion model (EDM settings);
:sct / :scd then start from its EMA: --config.training.teacher_checkpoint=RUNS/.../checkpoints.
The network is NCSN++ with positional embeddings (the paper: DDPM++ with adaptive double norm).
"""

import math

from configs import _paper, _successors

HALF_LIFE_EMA = math.exp(math.log(0.5) / (0.5e6 / 512))  # EMA half-life 0.5 Mimg at bs 512


VARIANTS = ("sct", "scd", "teacher")  # --config=FILE:ARG


def get_config(kind: str = "sct"):
    config = _paper.cifar10(_paper.new())
    config.training.ema_rates = (HALF_LIFE_EMA,)
    if kind == "teacher":
        _successors.trigflow(config)
        config.training.update(loss="edm", num_steps=400000, edm_p_mean=-1.2, edm_p_std=1.2)
        config.model.dropout = 0.13
        config.optim.update(optimizer="adam", lr=1e-3, beta2=0.999, eps=1e-8)
        config.sampling.teacher_steps = 18  # Heun, NFE 35
        config.eval.settings = ("18",)
        return config
    # Iterations are not stated for CIFAR-10; 400k as ImageNet-64 ([R]).
    _successors.scm(config, kind, p_mean=-1.0, p_std=1.4, steps=400000)
    config.model.dropout = 0.2 if kind == "sct" else 0.0
    config.optim.update(optimizer="radam", lr=1e-4, beta1=0.9, beta2=0.99, eps=1e-8, warmup_steps=0)
    return config
