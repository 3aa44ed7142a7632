"""The edge where config is checked: validation of every key, path checks.

`validate` is pure and complete (every enum, range and combination a mode reads) and runs
before anything else; `check_paths` looks at the file system apart. The specs built from a
valid config (the method: experiment.methods; the samplers: experiment.sampling_spec) are
frozen objects; nothing jitted reads the config.
"""

from consistency.experiment import latent, methods, networks, paths, sampling_spec, train_state
from consistency.io import data
from consistency.measure import digits, inception

MODES = ("train", "sample", "edit", "eval", "encode")  # encode: a latent model's dataset
TASKS = ("inpaint", "colorize", "superres", "stroke", "denoise", "interpolate")
FEATURES = ("inception", *digits.CLASSIFIERS)  # the FID Inception or a dataset's classifier
ATTENTION = ("plain", "xla", "cudnn", "none")


class ConfigError(ValueError):
    """A bad configuration value; the message names every bad key."""


def _int(low):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _num(low, high, *, low_open=False, high_open=False):
    def ok(v):
        if not isinstance(v, int | float) or isinstance(v, bool):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return ok


_INF = float("inf")


# key -> (check, what the value must be): types and ranges of the keys the trainer reads.
_RULES = {
    "seed": (_int(0), "an integer >= 0"),
    "data.image_size": (_int(1), "a positive integer"),
    "data.num_channels": (_int(1), "a positive integer"),
    "data.num_threads": (_int(1), "a positive integer"),
    "model.sigma_min": (_num(0, _INF, low_open=True), "a number > 0"),
    "model.sigma_max": (_num(0, _INF, low_open=True), "a number > 0"),
    "model.rho": (_num(0, _INF, low_open=True), "a number > 0"),
    "model.sigma_data": (_num(0, _INF, low_open=True), "a number > 0"),
    "model.dropout": (_num(0, 1, high_open=True), "a number in [0, 1)"),
    "model.dtype": (lambda v: v in networks.DTYPES, f"one of {tuple(networks.DTYPES)}"),
    "model.remat": (
        lambda v: v in networks.REMAT_POLICIES,
        f"one of {tuple(networks.REMAT_POLICIES)}",
    ),
    "training.batch_size": (_int(1), "a positive integer"),
    "training.num_steps": (_int(1), "a positive integer"),
    "training.n_jitted_steps": (_int(1), "a positive integer"),
    "training.micro_batches": (_int(1), "a positive integer"),
    "training.mesh_fsdp": (_int(1), "a positive integer"),
    "training.keep_checkpoints": (_int(1), "a positive integer"),
    "training.start_ema": (_num(0, 1), "a number in [0, 1]"),
    "training.ema_warmup": (lambda v: isinstance(v, bool), "True or False"),
    "training.resume_reinit_changed": (lambda v: isinstance(v, bool), "True or False"),
    "optim.optimizer": (lambda v: v in train_state.OPTIMIZERS, f"one of {train_state.OPTIMIZERS}"),
    "optim.lr": (_num(0, _INF, low_open=True), "a number > 0"),
    "optim.beta1": (_num(0, 1, high_open=True), "a number in [0, 1)"),
    "optim.beta2": (_num(0, 1, high_open=True), "a number in [0, 1)"),
    "optim.eps": (_num(0, _INF, low_open=True), "a number > 0"),
    "optim.weight_decay": (_num(0, _INF), "a number >= 0"),
    "optim.warmup_steps": (_int(0), "an integer >= 0"),
    "optim.grad_clip": (_num(0, _INF), "a number >= 0"),
    "sampling.grid_size": (_int(0), "an integer >= 0"),
    "model.parameterization": (
        lambda v: v in networks.PARAMETERIZATIONS,
        f"one of {networks.PARAMETERIZATIONS}",
    ),
    "model.logvar_features": (_int(0), "an integer >= 0"),
    "model.guidance_embed_dim": (_int(0), "an integer >= 0 (0: no guidance input)"),
    "training.skip_steps": (_int(1), "a positive integer"),
    "training.guidance_min": (_num(-1, _INF), "a number >= -1 (LCM's w; -1: unconditional)"),
    "training.guidance_max": (_num(-1, _INF), "a number >= -1 (LCM's w; -1: unconditional)"),
    "sampling.guidance": (_num(-1, _INF), "a number >= -1 (LCM's w; -1: unconditional)"),
    "training.p_std": (_num(0, _INF, low_open=True), "a number > 0"),
    "training.ect_q": (_num(1, _INF, low_open=True), "a number > 1"),
    "training.ect_stage_steps": (_int(1), "a positive integer"),
    "training.scm_tangent_c": (_num(0, _INF), "a number >= 0"),
    "training.scm_warmup_steps": (_int(0), "an integer >= 0"),
    "training.distill_steps_per_iter": (_int(1), "a positive integer"),
    "training.teacher_ema_index": (_int(0), "an integer >= 0"),
    "training.init_ema_index": (_int(0), "an integer >= 0"),
    "training.lpips_pool": (lambda v: v in networks.LPIPS_POOLS, f"one of {networks.LPIPS_POOLS}"),
    "training.lpips_resize": (_int(0), "an integer >= 0"),
    "training.log_every": (_int(1), "a positive integer"),
    "training.snapshot_every": (_int(1), "a positive integer"),
    "data.name": (lambda v: v in data.DATASETS, f"one of {data.DATASETS}"),
    "data.num_classes": (_int(1), "a positive integer"),
    "model.name": (lambda v: v in networks.MODELS, f"one of {networks.MODELS}"),
    "model.attention_impl": (lambda v: v in ATTENTION, f"one of {ATTENTION}"),
    "sampling.steps": (_int(2), "an integer >= 2"),
    "sampling.num_samples": (_int(1), "a positive integer"),
    "sampling.batch_size": (_int(1), "a positive integer"),
    "sampling.teacher_steps": (_int(2), "an integer >= 2"),
    "sampling.clip_denoised": (lambda v: isinstance(v, bool), "True or False"),
    "sampling.class_label": (_int(-1), "-1 (random) or a class index"),
    "sampling.checkpoint_step": (_int(-1), "-1 (latest) or a step"),
    "sampling.ema_index": (_int(0), "an integer >= 0"),
    "sampling.seed": (_int(0), "an integer >= 0"),
}
# Keys each mode reads beyond the shared ones (a prefix covers its whole section).
_EDIT_RULES = {
    "edit.task": (lambda v: v in TASKS, f"one of {TASKS}"),
    "edit.steps": (_int(2), "an integer >= 2"),
    "edit.patch_size": (_int(1), "a positive integer"),
    "edit.stroke_index": (_int(0), "an integer >= 0"),
    "edit.noise_sigma": (_num(0, _INF, low_open=True), "a number > 0"),
    "edit.num_interpolations": (_int(2), "an integer >= 2"),
    "edit.num_pairs": (_int(1), "a positive integer"),
    "edit.seed": (_int(0), "an integer >= 0"),
    "edit.ema_index": (_int(0), "an integer >= 0"),
    "edit.checkpoint_step": (_int(-1), "-1 (latest) or a step"),
}
_EVAL_RULES = {
    "eval.num_samples": (_int(2), "an integer >= 2"),
    "eval.every_steps": (_int(0), "an integer >= 0 (0: no FID while training)"),
    "eval.features": (lambda v: v in FEATURES, f"one of {FEATURES}"),
    "eval.resize": (lambda v: v in inception.RESIZES, f"one of {inception.RESIZES}"),
    "eval.reference_limit": (_int(0), "an integer >= 0"),
    "eval.batch_size": (_int(1), "a positive integer"),
    "eval.chunk_size": (_int(1), "a positive integer"),
    "eval.ema_index": (_int(0), "an integer >= 0"),
    "eval.save_samples": (lambda v: isinstance(v, bool), "True or False"),
}


def _lookup(config, key):
    for part in key.split("."):
        config = config[part]
    return config


def _rule_problems(config, rules) -> list[str]:
    return [
        f"{key}={_lookup(config, key)!r}: must be {need}"
        for key, (ok, need) in rules.items()
        if not ok(_lookup(config, key))
    ]


def _training_problems(config, bad: set[str], num_devices: int | None) -> list[str]:
    t = config.training
    out = []
    for key in ("log_every", "snapshot_every", "num_steps"):
        if "training.n_jitted_steps" in bad or not _int(1)(t[key]) or t[key] % t.n_jitted_steps:
            out.append(
                f"training.{key}={t[key]} must be a positive multiple of training.n_jitted_steps"
                f"={t.n_jitted_steps}"
            )
    if num_devices is not None and not bad & {"training.batch_size", "training.micro_batches"}:
        if t.batch_size % (num_devices * t.micro_batches):
            out.append(
                f"training.batch_size={t.batch_size} must be divisible by the device count "
                f"({num_devices}) x training.micro_batches ({t.micro_batches}) = "
                f"{num_devices * t.micro_batches}"
            )
    if t.init_checkpoint and t.init_from_teacher:
        out.append(
            "training.init_checkpoint and training.init_from_teacher both say where the student "
            "starts: give one"
        )
    if num_devices is not None and "training.mesh_fsdp" not in bad and num_devices % t.mesh_fsdp:
        out.append(f"training.mesh_fsdp={t.mesh_fsdp} must divide the device count ({num_devices})")
    return out


def _sampling_problems(config) -> list[str]:
    s, d, t = config.sampling, config.data, config.training
    out = []
    if d.class_conditional and s.class_label >= d.num_classes:
        out.append(
            f"sampling.class_label={s.class_label}: must be < data.num_classes "
            f"({d.num_classes}), or -1 for random labels"
        )
    if s.ema_index >= len(t.ema_rates):
        out.append(
            f"sampling.ema_index={s.ema_index}: the run keeps {len(t.ema_rates)} EMA "
            "copies (training.ema_rates)"
        )
    try:
        sampling_spec.sampler(config)
    except ValueError as e:
        out.append(str(e))
    return out


def _edit_problems(config) -> list[str]:
    e, d = config.edit, config.data
    out = _rule_problems(config, _EDIT_RULES)
    if out:
        return out
    if methods.row(config.training.loss).samples_as != "consistency":
        out.append(
            f"training.loss={config.training.loss!r}: --mode=edit needs a consistency "
            "model, not a diffusion teacher"
        )
    if e.task == "colorize" and d.num_channels != 3:
        out.append(f"edit.task='colorize' needs RGB images, but data.num_channels={d.num_channels}")
    if e.task == "superres" and d.image_size % e.patch_size:
        out.append(f"edit.patch_size={e.patch_size} must divide data.image_size={d.image_size}")
    if e.task == "stroke" and not 0 <= e.stroke_index < e.steps - 1:
        out.append(f"edit.stroke_index={e.stroke_index} must lie in [0, edit.steps - 1)")
    if not out:
        try:
            sampling_spec.edit_sampler(config)
        except ValueError as err:
            out.append(str(err))
    return out


def _data_problems(config, mode: str) -> list[str]:
    """data.classes: () or distinct labels in [0, data.num_classes) (labels are not renumbered,
    so a class-conditional network keeps its rows and can be sampled at the other classes);
    fashion_mnist's splits."""
    d, out = config.data, []
    classes = d.classes if isinstance(d.classes, tuple | list) else (d.classes,)
    in_range = all(_int(0)(c) and c < d.num_classes for c in classes)
    if not in_range or len(set(classes)) != len(classes):
        out.append(
            f"data.classes={d.classes!r}: must be () (every class) or distinct labels in "
            f"[0, data.num_classes={d.num_classes})"
        )
    if d.name == "fashion_mnist" and d.split not in ("train", "test"):
        out.append(f"data.split={d.split!r}: fashion_mnist has 'train' and 'test'")
    return out


def _eval_problems(config, num_devices: int | None, mode: str) -> list[str]:
    e = config.eval
    out = _rule_problems(config, _EVAL_RULES)
    if e.features in digits.INPUT_SHAPES:
        d, lat = config.data, config.latent
        side = lat.image_size if lat.vae else d.image_size  # a latent model's decoded images
        want = digits.INPUT_SHAPES[e.features]
        if (side and side != want[0]) or (not lat.vae and d.num_channels != want[2]):
            out.append(
                f"eval.features={e.features!r}: its classifier takes {want[0]}x{want[0]}x"
                f"{want[2]} images, but data.image_size / num_channels"
                f"{' (latent.image_size)' if lat.vae else ''} give other images"
            )
    if not e.settings:
        out.append("eval.settings is empty: give e.g. ('1',) or ('1', '0,22,39')")
    for setting in e.settings:
        try:
            if sampling_spec.search_range(config, setting) is None:
                sampling_spec.sampler(config, setting)
            elif mode == "train":
                out.append(
                    f"eval.settings: {setting!r} runs in --mode=eval only; FID while training "
                    "(eval.every_steps) takes fixed settings: remove it or set eval.every_steps=0"
                )
        except ValueError as err:
            out.append(str(err))
    if num_devices is not None and "eval.batch_size" not in " ".join(out):
        if e.batch_size % num_devices:
            out.append(
                f"eval.batch_size={e.batch_size} must be divisible by the device count "
                f"({num_devices})"
            )
    return out


def problems(config, *, mode: str = "train", num_devices: int | None = None) -> list[str]:
    """Every bad key that `mode` would read, one line each (no file system access)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    out = _rule_problems(config, _RULES)
    bad = {p.split("=")[0] for p in out}
    t, m = config.training, config.model
    if not bad & {"model.sigma_min", "model.sigma_max"} and m.sigma_min >= m.sigma_max:
        out.append("model.sigma_min must be below model.sigma_max")
    if not t.ema_rates or any(not _num(0, 1, high_open=True)(r) for r in t.ema_rates):
        out.append(f"training.ema_rates={t.ema_rates}: give rates in [0, 1)")
    out += methods.problems(config)
    out += latent.problems(config, mode)
    out += _data_problems(config, mode)
    if mode == "train":
        out += _training_problems(config, bad, num_devices)
    if out:  # the checks below build specs from the keys above
        return out
    out += _sampling_problems(config)
    if mode == "edit":
        out += _edit_problems(config)
    if mode == "eval" or (mode == "train" and config.eval.every_steps):
        out += _eval_problems(config, num_devices, mode)
    return out


def validate(config, *, mode: str = "train", num_devices: int | None = None) -> None:
    """Raise ConfigError naming every bad key `mode` reads, before anything runs.

    num_devices (of every process) adds the check that the global batch splits evenly over the
    devices and the micro-batches, and that the FSDP group size divides the device count.
    """
    found = problems(config, mode=mode, num_devices=num_devices)
    if found:
        raise ConfigError("invalid config:\n  " + "\n  ".join(found))


def check_paths(config, *, mode: str = "train", workdir: str | None = None) -> None:
    """Raise ConfigError for every input file the mode needs (set on the command line: the
    experiment files leave teachers and weights empty) and cannot find, and with `workdir` for
    its checkpoints (sample/edit/eval) and every output dir it could not write (paths.problems)."""
    out = paths.problems(config, mode=mode, workdir=workdir)
    if latent.enabled(config):  # latent.vae's config.json: the latent shape data.* must have
        out += latent.shape_problems(config)
        if not out and mode == "train" and workdir is not None:
            out += latent.cache_problems(config, workdir)
    if out:
        raise ConfigError("invalid config:\n  " + "\n  ".join(out))


def validate_config(config, *, num_devices: int | None = None) -> None:
    """The training run's checks: validate(mode='train') and check_paths."""
    validate(config, mode="train", num_devices=num_devices)
    check_paths(config, mode="train")
