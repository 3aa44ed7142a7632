"""The method table: each training method is one row, a frozen object of its hyper-parameters.

A row's class attributes are its properties (whether it needs a teacher, how its models are
sampled, what parameterization and distances it takes); its fields are read from the config once,
by `from_config`; its `loss` returns per-example losses [B] and metrics. Nothing here is called
with the config inside jitted code. Adding a method: a loss in core/losses.py and a row in
diffusion.py, discrete.py or successors.py, listed in ROWS below.
"""

from consistency.core import ode, parameterization
from consistency.experiment.methods.base import (
    ALL_DISTANCES,
    ECT_SCALINGS,
    INDEX_SAMPLINGS,
    SAMPLERS,
    TEACHERS,
    VP_PARAMETERIZATIONS,
    Method,
    ModelFns,
    _vp_problems,
    noise_grid,
    vp_schedule,
)
from consistency.experiment.methods.diffusion import DDPM, EDM, VAE
from consistency.experiment.methods.discrete import CD, CT, PD, GuidedCD
from consistency.experiment.methods.successors import ECT, SCD, SCT, CDContinuous, CTContinuous

__all__ = [
    "ALL_DISTANCES", "ECT_SCALINGS", "INDEX_SAMPLINGS", "SAMPLERS", "TEACHERS",
    "VP_PARAMETERIZATIONS", "Method", "ModelFns", "noise_grid", "vp_schedule",
    "CD", "CT", "DDPM", "ECT", "EDM", "PD", "SCD", "SCT", "VAE", "CDContinuous", "CTContinuous",
    "GuidedCD", "ROWS", "METHODS", "LOSSES", "row", "from_config", "distance_name", "problems",
]  # fmt: skip

# The table: training.loss -> its row.
# DDPM: the discrete VP (eps / v) teachers that cd and guided_cd also distil.
# VAE: the autoencoder of latent models (latent.vae), sampled by no mode.
ROWS = (EDM, CD, CT, PD, ECT, CDContinuous, CTContinuous, SCT, SCD, GuidedCD, VAE, DDPM)
METHODS: dict[str, type[Method]] = {row.name: row for row in ROWS}
LOSSES = tuple(METHODS)


def row(name: str) -> type[Method]:
    """The method class of training.loss `name` (its properties, without building it)."""
    if name not in METHODS:
        raise ValueError(f"training.loss: unknown {name!r}; choose one of {LOSSES}")
    return METHODS[name]


def from_config(config) -> Method:
    """The configured method: its row filled from config.training and config.model."""
    return row(config.training.loss).from_config(config)


def distance_name(method: Method | type[Method], name: str) -> str:
    """What training.distance `name` means for this method (e.g. the tangent's norm for 'l2')."""
    if method.distances and name not in method.distances:
        raise ValueError(
            f"training.distance={name!r} is not supported by training.loss={method.name!r}; "
            f"choose one of {method.distances}"
        )
    return method.distance_aliases.get(name, name)


def problems(config) -> list[str]:
    """Every inconsistency between the configured method and the rest of the config."""
    t, m = config.training, config.model
    if t.loss not in METHODS:
        return [f"training.loss: unknown {t.loss!r}; choose one of {LOSSES}"]
    cls = METHODS[t.loss]
    out = []
    if m.parameterization not in cls.parameterizations:
        out.append(
            f"model.parameterization={m.parameterization!r}: training.loss={t.loss!r} takes "
            f"one of {cls.parameterizations}"
        )
    if m.parameterization in VP_PARAMETERIZATIONS:
        out += _vp_problems(config)
    if cls.needs_logvar and m.logvar_features < 1:
        out.append(
            f"model.logvar_features: training.loss={t.loss!r} needs > 0 (the learned weighting)"
        )
    if t.index_sampling not in INDEX_SAMPLINGS:
        out.append(
            f"training.index_sampling: unknown {t.index_sampling!r}; choose one of "
            f"{INDEX_SAMPLINGS}"
        )
    if t.ect_scalings not in ECT_SCALINGS:
        out.append(
            f"training.ect_scalings: unknown {t.ect_scalings!r}; choose one of {ECT_SCALINGS}"
        )
    if t.weighting not in parameterization.WEIGHTINGS:
        out.append(
            f"training.weighting: unknown {t.weighting!r}; choose one of "
            f"{parameterization.WEIGHTINGS}"
        )
    if m.guidance_embed_dim > 0 and not cls.guided:
        out.append(
            f"model.guidance_embed_dim={m.guidance_embed_dim}: training.loss={t.loss!r} does not "
            "train a guided student; set it to 0 (or training.loss='guided_cd'; 'ct' fine-tunes "
            "one: LCF)"
        )
    if t.skip_steps != 1 and not cls.takes_skip:
        out.append(
            f"training.skip_steps={t.skip_steps}: training.loss={t.loss!r} has no grid pairs to "
            "skip (only cd, ct and guided_cd); set it to 1"
        )
    if t.solver not in ode.SOLVERS:
        out.append(f"training.solver: unknown {t.solver!r}; choose one of {ode.SOLVERS}")
    if t.distance not in ALL_DISTANCES:
        out.append(f"training.distance: unknown {t.distance!r}; choose one of {ALL_DISTANCES}")
    else:
        try:
            distance_name(cls, t.distance)
        except ValueError as e:
            out.append(str(e))
    if out:
        return out
    try:
        from_config(config)  # the row's own checks (curriculum modes, combinations)
    except ValueError as e:
        out.append(str(e))
    return out
