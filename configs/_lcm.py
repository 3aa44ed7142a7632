"""LCM end to end on an autoencoder's latents (issue 20), for any latent config of a dataset.

Each function turns a latent config (configs/latent_digits.py, latent_fashion.py: latent.vae,
the latent shape, FID features) into one stage; the class subsets and run paths are arguments.
Guidance is LCM's convention throughout: the teacher is D(y) + w (D(y) - D(null)), the usual
scale 1 + w; the guided networks take w (training.guidance_min/max, sampling.guidance).

  teacher: EDM on the latents, class-conditional with a null class (label dropout 0.1)
  student: guided CD of that teacher (LCD), pairs 20 points apart on a 360-point grid
  lcf:     LCF: CT without a teacher from the student's checkpoint (guidance_proj included),
           on latents of other classes, w ~ U[guidance_min, guidance_max] given to both copies
"""

GUIDANCE_EMBED_DIM = 64  # the student's w features (LCM: 256); kept by LCF
SCALES, SKIP = 360, 20  # LCM's skipping step on a fine grid: ~18 distinct pairs per path


def _conditional(config, classes: tuple[int, ...], num_classes: int):
    config.data.update(class_conditional=True, num_classes=num_classes, classes=classes)
    config.model.null_label = True  # the null class data.num_classes (one more label row)
    config.sampling.guidance = 1.0  # w when sampled (the usual scale 2)
    return config


def teacher(config, *, classes: tuple[int, ...], num_classes: int, steps: int):
    """The latent diffusion teacher: EDM, label dropout 0.1, Heun 18 (35 NFE) with CFG."""
    config = _conditional(config, classes, num_classes)
    config.training.update(
        loss="edm", num_steps=steps, total_steps=-1, label_dropout=0.1, init_from_teacher=False
    )
    config.optim.update(optimizer="adam", lr=1e-3, warmup_steps=200)
    config.sampling.update(teacher_steps=18, sigmas=())
    config.eval.update(settings=("18",), every_steps=steps)
    return config


def _consistency(config, steps: int):
    """What the student and LCF share: the w input, the skip-k pairs, the samplers."""
    config.model.guidance_embed_dim = GUIDANCE_EMBED_DIM
    config.training.update(
        distance="l2",
        weighting="uniform",
        index_sampling="uniform",
        target_ema_mode="fixed",
        scale_mode="fixed",
        start_scales=SCALES,
        end_scales=SCALES,
        skip_steps=SKIP,
        start_ema=0.95,
        guidance_min=0.0,
        guidance_max=4.0,
        num_steps=steps,
        total_steps=-1,
    )
    config.sampling.update(steps=18, ts=(), sigmas=())
    config.eval.update(settings=("1", "0,11,17"), every_steps=steps)
    return config


def student(config, *, classes, num_classes: int, steps: int, teacher_checkpoint: str):
    """LCD: guided CD of the teacher (Heun), started from it plus a zero guidance projection."""
    config = _consistency(_conditional(config, classes, num_classes), steps)
    config.training.update(
        loss="guided_cd",
        solver="heun",
        init_from_teacher=True,
        teacher_checkpoint=teacher_checkpoint,
    )
    return config


def lcf(config, *, classes, num_classes: int, steps: int, init_checkpoint: str, lr: float):
    """LCF: CT on `classes` from the student's EMA (init_checkpoint), the guidance input kept."""
    config = _consistency(_conditional(config, classes, num_classes), steps)
    config.training.update(
        loss="ct",
        init_from_teacher=False,
        teacher_checkpoint="",
        init_checkpoint=init_checkpoint,
    )
    config.optim.lr = lr
    return config


VARIANTS = ("student", "teacher", "lcf")  # the stages, as --config=FILE:ARG names them


def stage(arg: str, latent, *, source, target, runs: str, num_classes: int = 10):
    """The config of stage `arg` on latent() (a fresh latent config): the teacher and student
    on the classes `source` (runs_teacher/, runs/), LCF from the student on `target`."""
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {VARIANTS}")
    if arg == "teacher":
        return teacher(latent(), classes=source, num_classes=num_classes, steps=2000)
    if arg == "student":
        return student(
            latent(),
            classes=source,
            num_classes=num_classes,
            steps=2000,
            teacher_checkpoint=f"{runs}_teacher/checkpoints",
        )
    return lcf(
        latent(),
        classes=target,
        num_classes=num_classes,
        steps=1000,
        init_checkpoint=f"{runs}/checkpoints",
        lr=2e-4,
    )
