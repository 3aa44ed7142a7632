"""The edge where config becomes specs: validation of every key, sampler specs, path checks.

`validate` is pure and complete (every enum, range and combination a mode reads) and runs
before anything else; `check_paths` looks at the file system apart. Specs (the method, the
noise grid, the sampler) are frozen objects built here once; nothing jitted reads the config.
"""

import numpy as np

from consistency.core import samplers, vp
from consistency.core.samplers import SamplerSpec
from consistency.experiment import latent, methods, networks, paths, train_state
from consistency.io import data
from consistency.measure import digits, inception

MODES = ("train", "sample", "edit", "eval", "encode")  # encode: a latent model's dataset
TASKS = ("inpaint", "colorize", "superres", "stroke", "denoise", "interpolate")
FEATURES = ("inception", *digits.CLASSIFIERS)  # the FID Inception or a dataset's classifier
ATTENTION = ("plain", "xla", "cudnn", "none")
DEFAULT_EDIT_EVALUATIONS = 4  # network evaluations of the default edit.ts (Algorithm 4 steps)


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
        sampler(config)
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
            edit_sampler(config)
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
            if search_range(config, setting) is None:
                sampler(config, setting)
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


def _progressive_steps(config) -> int:
    """A PD student's step count at the end of its run: N(training.num_steps)."""
    method = methods.from_config(config)
    return int(method.schedule(np.int32(config.training.num_steps))[1])


def sampler(config, setting: str | None = None) -> SamplerSpec:
    """The sampler of sampling.* or of one eval setting, for the configured method.

    Consistency models: "1" is one step from sigma_max, "i0,i1,...,N-1" indices ts on the
    sampling.steps grid (Algorithm 1), "sigma=80,0.821" explicit noise levels. EDM teachers:
    "N" is Heun on an N-point grid; VP (ddpm) teachers: N DDIM steps; PD students: "N" Euler
    steps. Without a setting:
    sampling.sigmas, else sampling.timesteps (diffusers' order), else sampling.ts, else one
    step (teachers: sampling.teacher_steps; PD: its last stage's N).
    """
    s = config.sampling
    kind = methods.row(config.training.loss).samples_as
    clip = s.clip_denoised
    w = sampling_guidance(config)
    if kind == "diffusion" and methods.vp_schedule(config) is not None:
        return _ddim_sampler(config, setting, clip, w)
    if kind in ("diffusion", "progressive"):
        name = "heun" if kind == "diffusion" else "progressive"
        if setting is None:
            steps = s.teacher_steps if kind == "diffusion" else _progressive_steps(config)
            return SamplerSpec(kind=name, sigmas=(), steps=steps, clip_denoised=clip, guidance=w)
        what = "Heun grid size" if kind == "diffusion" else "Euler steps"
        if not setting.isdigit() or int(setting) < (2 if kind == "diffusion" else 1):
            raise ValueError(
                f"eval.settings: training.loss={config.training.loss!r} takes 'N' ({what}), "
                f"not {setting!r}"
            )
        return SamplerSpec(kind=name, sigmas=(), steps=int(setting), clip_denoised=clip, guidance=w)
    timesteps = ()
    if setting is None:
        sigmas, ts, timesteps = tuple(s.sigmas), tuple(s.ts), _timesteps(config)
    else:
        explicit = setting.startswith("sigma=")
        parse = float if explicit else int
        try:
            values = [parse(v) for v in setting.removeprefix("sigma=").split(",")]
        except ValueError:
            values = []
        if not values or (not explicit and values != [1] and len(values) < 2):
            raise ValueError(
                f"eval.settings: give '1', 'i0,...,N-1', 'sigma=s0,...' or 'search[=lo,hi]', "
                f"not {setting!r}"
            )
        sigmas = tuple(values) if explicit else ()
        ts = () if explicit or values == [1] else tuple(values)
    return SamplerSpec(
        kind="consistency",
        sigmas=_sigmas(config, sigmas, ts, s.steps, "sampling", timesteps=timesteps),
        clip_denoised=clip,
        guidance=w,
    )


def _ddim_sampler(config, setting: str | None, clip: bool, w: float | None) -> SamplerSpec:
    """A VP teacher's DDIM: sampling.teacher_steps (or setting 'N') trailing timesteps' levels."""
    if setting is not None and (not setting.isdigit() or int(setting) < 1):
        raise ValueError(
            f"eval.settings: training.loss={config.training.loss!r} takes 'N' (DDIM steps), "
            f"not {setting!r}"
        )
    steps = config.sampling.teacher_steps if setting is None else int(setting)
    discrete = methods.vp_schedule(config)
    if steps > discrete.num_train_timesteps:
        raise ValueError(
            f"DDIM steps {steps} > model.vp.num_train_timesteps={discrete.num_train_timesteps}: "
            "lower sampling.teacher_steps (or the eval setting)"
        )
    ts = vp.ddim_timesteps(
        num_train_timesteps=discrete.num_train_timesteps, num_inference_steps=steps
    )
    sigmas = tuple(float(s) for s in discrete.sigmas()[ts])
    return SamplerSpec(kind="ddim", sigmas=sigmas, steps=steps, clip_denoised=clip, guidance=w)


def sampling_guidance(config) -> float | None:
    """sampling.guidance as the sampled model takes it: the w input of a guided student
    (model.guidance_embed_dim > 0), the CFG scale of an EDM teacher with a null class (None
    at w = 0: plain conditional Heun), else None; a w the model cannot take is an error."""
    s, m, d = config.sampling, config.model, config.data
    kind = methods.row(config.training.loss).samples_as
    if kind == "consistency" and m.guidance_embed_dim > 0:
        return float(s.guidance)
    if s.guidance == 0:
        return None
    if kind == "diffusion" and d.class_conditional and m.null_label:
        return float(s.guidance)
    need = (
        "model.null_label and data.class_conditional (a teacher trained with "
        "training.label_dropout > 0)"
        if kind == "diffusion"
        else "a guided student (training.loss='guided_cd', model.guidance_embed_dim > 0)"
    )
    raise ValueError(f"sampling.guidance={s.guidance}: needs {need}; or set sampling.guidance=0")


def _timesteps(config) -> tuple[int, ...]:
    """sampling.timesteps, checked to be integers and the only choice of levels."""
    s = config.sampling
    values = tuple(s.timesteps)
    if any(not isinstance(t, int) or isinstance(t, bool) for t in values):
        raise ValueError(
            f"sampling.timesteps={values}: give integer indices of the sampling.steps grid, "
            "e.g. (22, 0)"
        )
    for key in ("ts", "sigmas") if values else ():
        if s[key]:
            raise ValueError(
                f"sampling.timesteps={values} and sampling.{key}={tuple(s[key])} are both set: "
                f"give one (timesteps (22, 0) are ts (0, 22, {s.steps - 1})), e.g. "
                f"--config.sampling.{key}='()'"
            )
    return values


SEARCH = "search"  # eval setting: ternary search of the two-step sampler's intermediate index


def search_range(config, setting: str) -> tuple[int, int] | None:
    """(lo, hi) of an eval setting 'search' ([1, N-2] of the sampling.steps grid) or
    'search=lo,hi': the intermediate index i of the two-step ts (0, i, N-1) that a ternary
    search on FID picks; None for every other setting."""
    if not setting.startswith(SEARCH):
        return None
    n = config.sampling.steps
    bounds = setting.removeprefix(SEARCH).removeprefix("=")
    try:
        lo, hi = (int(v) for v in bounds.split(",")) if bounds else (1, n - 2)
    except ValueError:
        lo, hi = 0, -1
    if setting not in (SEARCH, f"{SEARCH}={bounds}") or not 1 <= lo < hi <= n - 2:
        raise ValueError(
            f"eval.settings: {setting!r}: give 'search' or 'search=lo,hi' with "
            f"1 <= lo < hi <= {n - 2} (intermediate indices of the sampling.steps={n} grid)"
        )
    if methods.row(config.training.loss).samples_as != "consistency":
        raise ValueError(
            f"eval.settings: {setting!r} searches a consistency model's two-step sampler; "
            f"training.loss={config.training.loss!r} is sampled with 'N' settings"
        )
    return lo, hi


def _sigmas(config, sigmas, ts, steps, section: str, timesteps=()) -> tuple[float, ...]:
    """Evaluation sigmas: explicit ones, diffusers' timesteps or indices ts of a steps-point
    grid, or one step."""
    grid = methods.noise_grid(config)
    try:
        if sigmas:
            out = np.asarray(sigmas, np.float32)
            samplers.validate_sigmas(out, sigma_min=grid.sigma_min, sigma_max=grid.sigma_max)
        elif timesteps:
            out = samplers.diffusers_sigmas(steps, timesteps=timesteps, **grid.kwargs())
        elif ts:
            out = samplers.index_sigmas(ts, steps, **grid.kwargs())
        else:
            out = np.asarray([grid.sigma_max], np.float32)
    except ValueError as e:
        key = "sigmas" if sigmas else "timesteps" if timesteps else "ts"
        fix = f" (diffusers' order on the {steps}-point grid, e.g. (22, 0))" if timesteps else ""
        raise ValueError(f"{section}.{key}: {e}{fix}") from None
    return tuple(float(v) for v in out)


def edit_sampler(config) -> SamplerSpec:
    """Algorithm 4's levels: indices edit.ts of an edit.steps grid; by default a few even steps
    (stroke guidance starts at edit.stroke_index, SDEdit's starting noise, the others at 0)."""
    e = config.edit
    ts = tuple(e.ts)
    if not ts:
        start = e.stroke_index if e.task == "stroke" else 0
        grid = np.linspace(start, e.steps - 1, DEFAULT_EDIT_EVALUATIONS + 1)
        ts = tuple(int(t) for t in np.unique(np.round(grid)))
    sigmas = _sigmas(config, (), ts, e.steps, "edit")
    return SamplerSpec(
        kind="consistency", sigmas=sigmas, clip_denoised=config.sampling.clip_denoised
    )
