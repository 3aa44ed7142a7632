"""A config's sampler specs: sampling.*, each eval setting and edit.* become frozen SamplerSpecs.

spec.validate builds each one once to report a bad value; the sampling, evaluation and editing
code builds them here. Nothing jitted reads the config.
"""

import numpy as np

from consistency.core import samplers, vp
from consistency.core.samplers import SamplerSpec
from consistency.experiment import methods

DEFAULT_EDIT_EVALUATIONS = 4  # network evaluations of the default edit.ts (Algorithm 4 steps)


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
