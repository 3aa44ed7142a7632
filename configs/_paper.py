"""Settings shared by the paper's experiment configs: datasets, networks, optimiser."""

from configs import base

PAPER_EMA = 0.9999432189950708  # the EMA of the released ImageNet/LSUN models and their tables
IMAGENET_EMA = (0.999, 0.9999, PAPER_EMA)  # cm launch.sh ImageNet-64
LSUN_EMA = (0.9999, 0.99994, PAPER_EMA)  # cm launch.sh LSUN-256


def _cm_lineage(config):
    """What the PyTorch cm code (ImageNet-64, LSUN) did: piq's avg-pooled VGG for LPIPS, and
    samples and FID from the 0.9999432189950708 EMA copy."""
    config.training.lpips_pool = "avg"
    return ema(config, config.training.ema_rates, PAPER_EMA)


def cifar10(config):
    """CIFAR-10 32x32 (tfds cifar10) with the paper's NCSN++ (jcm configs, launch.sh)."""
    config.data.update(name="cifar10", image_size=32, num_channels=3, random_flip=True)
    config.model.name = "ncsnpp"
    config.training.batch_size = 512
    config.training.log_every = 50
    config.training.snapshot_every = 10000
    config.training.ema_rates = (0.9999,)
    config.sampling.update(grid_size=64, batch_size=512, num_samples=50000)
    # FID against the 50k training images (jcm: clean-fid's CIFAR-10 train statistics), whose
    # legacy_tensorflow mode resizes with the TF1 legacy map inside its Inception.
    config.eval.update(reference="", reference_split="train", batch_size=512, resize="clean_legacy")
    return config


def imagenet64(config):
    """ImageNet 64x64 (tfds imagenet_resized/64x64), class-conditional ADM (cm launch.sh)."""
    config.data.update(
        name="imagenet64",
        image_size=64,
        num_channels=3,
        random_flip=True,
        class_conditional=True,
        num_classes=1000,
    )
    config.model.name = "adm"
    config.model.dtype = "bfloat16"  # the references train in fp16 with fp32 master weights
    config.model.adm.update(
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    config.training.batch_size = 2048
    config.training.ema_rates = IMAGENET_EMA
    config.training.snapshot_every = 10000
    config.sampling.update(grid_size=64, batch_size=256, num_samples=50000)
    # ADM's reference batch: download evaluate.ADM_REF_BATCHES + imagenet/64/... to this path.
    # The ADM evaluator's TF1 graph resizes with the legacy ResizeBilinear.
    config.eval.update(
        reference="ref_batches/VIRTUAL_imagenet64_labeled.npz", batch_size=256, resize="tf1"
    )
    return _cm_lineage(config)


def lsun256(config, name="lsun_bedroom", folder=""):
    """LSUN 256x256 (tfds lsun/bedroom or an image folder for Cat), unconditional ADM."""
    config.data.update(name=name, folder=folder, image_size=256, num_channels=3, random_flip=True)
    config.model.name = "adm"
    config.model.dtype = "bfloat16"
    config.model.adm.update(
        model_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        use_scale_shift_norm=False,
        resblock_updown=True,
    )
    config.training.batch_size = 256  # cm launch.sh (the paper's table recalls 2048)
    config.training.ema_rates = LSUN_EMA
    config.training.snapshot_every = 10000
    config.sampling.update(grid_size=16, batch_size=32, num_samples=50000)
    # ADM's reference batches: evaluate.ADM_REF_BATCHES + lsun/{bedroom,cat}/..., to this path.
    ref = "VIRTUAL_lsun_bedroom256.npz" if name == "lsun_bedroom" else "VIRTUAL_lsun_cat256.npz"
    config.eval.update(reference=f"ref_batches/{ref}", batch_size=32, resize="tf1")  # ADM evaluator
    return _cm_lineage(config)


def cd(config, metric: str, *, num_scales: int, target_ema: float, lr: float, steps: int):
    """Consistency distillation: Heun teacher, fixed N and mu, RAdam at a constant lr."""
    if metric not in ("l1", "l2", "lpips"):
        raise ValueError(f"unknown CD metric: {metric!r}; choose l1, l2 or lpips")
    config.training.update(
        loss="cd",
        distance=metric,
        solver="heun",
        target_ema_mode="fixed",
        scale_mode="fixed",
        start_scales=num_scales,
        end_scales=num_scales,
        start_ema=target_ema,
        num_steps=steps,
        init_from_teacher=True,
        teacher_checkpoint="",
    )
    config.optim.update(optimizer="radam", lr=lr, warmup_steps=0, grad_clip=0.0)
    return config


def ct(config, *, end_scales: int, start_ema: float, lr: float, steps: int):
    """Consistency training: adaptive N(k) from 2 and mu(k) from mu0, LPIPS, from scratch."""
    config.training.update(
        loss="ct",
        distance="lpips",
        solver="euler",
        target_ema_mode="adaptive",
        scale_mode="progressive",
        start_scales=2,
        end_scales=end_scales,
        start_ema=start_ema,
        num_steps=steps,
        total_steps=steps,
        init_from_teacher=False,
    )
    config.optim.update(optimizer="radam", lr=lr, warmup_steps=0, grad_clip=0.0)
    return config


def new():
    return base.get_config()


def ema(config, rates: tuple, sample_rate: float):
    """The run's EMA rates, and the copy that sampling, evaluation and editing read."""
    config.training.ema_rates = tuple(rates)
    index = config.training.ema_rates.index(sample_rate)
    for section in (config.sampling, config.eval, config.edit):
        section.ema_index = index
    return config


def two_step(config, *, steps: int, ts: tuple):
    """The launch scripts' two-step sampler, stated once: sampling.ts on a steps-point grid,
    and the eval settings one step and those indices."""
    config.sampling.update(steps=steps, ts=tuple(ts))
    config.eval.settings = ("1", ",".join(str(t) for t in ts))
    return config
