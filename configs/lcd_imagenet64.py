"""Guided consistency distillation (LCM's recipe, pixel space) on ImageNet 64, class-conditional.

:teacher is an EDM run of the cm ImageNet ADM with label dropout 0.1 to a null class (EDM's
ImageNet-64 flags: batch 4096, lr 1e-4, dropout 0.10, EMA half-life 50M images, 2,500M images).
The official cm/EDM ImageNet teachers were trained without a null class, so they cannot be
guided: the teacher must be trained (or fine-tuned) with label dropout first. :student (the
default) distils it as cd_imagenet64 does (N-grid Heun steps, mu = 0.95, LPIPS, RAdam 8e-6)
on the guided PF-ODE D(y) + w (D(y) - D(null)) (LCM's w; the usual scale 1 + w), w ~ U[0, 4]
per example and embedded (guidance_embed_dim 256, LCM's time_cond_proj_dim), pairs skipping
k = 20 points of a 1,000-point grid in one step as LCM does. The w range is untuned.
"""

import math

from configs import _paper

VARIANTS = ("student", "teacher")  # --config=FILE:ARG


def _conditional(config):
    config.model.null_label = True  # the null class data.num_classes = 1000
    config.sampling.guidance = 1.0  # w when sampled (usual scale 2)
    return config


def teacher():
    config = _conditional(_paper.imagenet64(_paper.new()))
    config.training.update(loss="edm", batch_size=4096, num_steps=610352, label_dropout=0.1)
    config.training.ema_rates = (math.exp(math.log(0.5) / (50e6 / 4096)),)  # half-life 50M images
    config = _paper.ema(config, config.training.ema_rates, config.training.ema_rates[0])
    config.model.dropout = 0.1
    config.optim.update(optimizer="adam", lr=1e-4, warmup_steps=2441)  # 10M images / 4096
    config.sampling.teacher_steps = 18  # Heun, 35 evaluations of the guided denoiser
    config.eval.settings = ("18",)
    return config


def student():
    config = _conditional(_paper.imagenet64(_paper.new()))
    _paper.cd(config, "lpips", num_scales=1000, target_ema=0.95, lr=8e-6, steps=600000)
    config.model.guidance_embed_dim = 256
    config.training.update(loss="guided_cd", skip_steps=20, guidance_min=0.0, guidance_max=4.0)
    _paper.two_step(config, steps=40, ts=(0, 22, 39))
    return config


def get_config(arg: str = "student"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {VARIANTS}")
    return student() if arg == "student" else teacher()
