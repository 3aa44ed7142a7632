"""Config validation: every bad key in one message, before anything runs."""

import pathlib

from consistency.experiment import methods, networks, train_state
from consistency.io import data


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
    "training.index_sampling": (
        lambda v: v in methods.INDEX_SAMPLINGS,
        f"one of {methods.INDEX_SAMPLINGS}",
    ),
    "training.p_std": (_num(0, _INF, low_open=True), "a number > 0"),
    "training.ect_q": (_num(1, _INF, low_open=True), "a number > 1"),
    "training.ect_stage_steps": (_int(1), "a positive integer"),
    "training.ect_scalings": (
        lambda v: v in methods.ECT_SCALINGS,
        f"one of {methods.ECT_SCALINGS}",
    ),
    "training.scm_tangent_c": (_num(0, _INF), "a number >= 0"),
    "training.scm_warmup_steps": (_int(0), "an integer >= 0"),
}


def _lookup(config, key):
    for part in key.split("."):
        config = config[part]
    return config


def validate_config(config, *, num_devices: int | None = None) -> None:
    """One clear message per bad key (names, types, ranges, divisibility), before anything runs.

    num_devices (of every process) adds the check that the global batch splits evenly over the
    devices and the micro-batches, and that the FSDP group size divides the device count.
    """
    t, d = config.training, config.data
    problems = [
        f"{key}={_lookup(config, key)!r}: must be {need}"
        for key, (ok, need) in _RULES.items()
        if not ok(_lookup(config, key))
    ]
    bad = {p.split("=")[0] for p in problems}
    if t.loss not in methods.LOSSES:
        problems.append(f"training.loss: unknown {t.loss!r}; choose one of {methods.LOSSES}")
    if d.name not in data.DATASETS:
        problems.append(f"data.name: unknown {d.name!r}; choose one of {data.DATASETS}")
    if config.model.name not in networks.MODELS:
        problems.append(f"model.name: unknown {config.model.name!r}; choose {networks.MODELS}")
    for key in ("log_every", "snapshot_every", "num_steps"):
        if "training.n_jitted_steps" in bad or not _int(1)(t[key]) or t[key] % t.n_jitted_steps:
            problems.append(
                f"training.{key}={t[key]} must be a positive multiple of training.n_jitted_steps"
                f"={t.n_jitted_steps}"
            )
    if not bad & {"model.sigma_min", "model.sigma_max"}:
        if config.model.sigma_min >= config.model.sigma_max:
            problems.append("model.sigma_min must be below model.sigma_max")
    if num_devices is not None and not bad & {"training.batch_size", "training.micro_batches"}:
        if t.batch_size % (num_devices * t.micro_batches):
            problems.append(
                f"training.batch_size={t.batch_size} must be divisible by the device count "
                f"({num_devices}) x training.micro_batches ({t.micro_batches}) = "
                f"{num_devices * t.micro_batches}"
            )
    if num_devices is not None and "training.mesh_fsdp" not in bad and num_devices % t.mesh_fsdp:
        problems.append(
            f"training.mesh_fsdp={t.mesh_fsdp} must divide the device count ({num_devices})"
        )
    if t.loss in ("cd", "cd_continuous", "scd") and not t.teacher_checkpoint:
        problems.append("training.teacher_checkpoint: CD needs the EDM teacher's checkpoint dir")
    if t.teacher_checkpoint and not pathlib.Path(t.teacher_checkpoint).exists():
        problems.append(f"training.teacher_checkpoint: no such path {t.teacher_checkpoint!r}")
    if t.loss in ("sct", "scd") and (
        config.model.parameterization != "trigflow" or config.model.logvar_features < 1
    ):
        problems.append(f"training.loss={t.loss!r} needs model.parameterization='trigflow' and "
                        "model.logvar_features > 0 (the learned weighting)")  # fmt: skip
    if t.init_from_teacher and not t.teacher_checkpoint:
        problems.append("training.init_from_teacher needs training.teacher_checkpoint")
    if not t.ema_rates or any(not _num(0, 1, high_open=True)(r) for r in t.ema_rates):
        problems.append(f"training.ema_rates={t.ema_rates}: give rates in [0, 1)")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
