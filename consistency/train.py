"""The training program: config validation, the jitted train step, and train_and_evaluate."""

import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from consistency import builders, checkpoints, data, evaluate, optim, sharding, train_state
from consistency.train_state import TrainState, apply_gradients


class ConfigError(ValueError):
    """A bad configuration value; the message names every bad key."""


class NonFiniteError(RuntimeError):
    """Raised when the loss, the gradient or the parameters stop being finite."""


class Preempted(SystemExit):
    """Raised after the final checkpoint of a preempted run: exit status 143 (128 + SIGTERM)."""

    def __init__(self, step: int):
        super().__init__(143)
        self.step = step


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
    "model.dtype": (lambda v: v in builders.DTYPES, f"one of {tuple(builders.DTYPES)}"),
    "model.remat": (
        lambda v: v in builders.REMAT_POLICIES,
        f"one of {tuple(builders.REMAT_POLICIES)}",
    ),
    "training.batch_size": (_int(1), "a positive integer"),
    "training.num_steps": (_int(1), "a positive integer"),
    "training.n_jitted_steps": (_int(1), "a positive integer"),
    "training.micro_batches": (_int(1), "a positive integer"),
    "training.mesh_fsdp": (_int(1), "a positive integer"),
    "training.keep_checkpoints": (_int(1), "a positive integer"),
    "training.start_ema": (_num(0, 1), "a number in [0, 1]"),
    "training.ema_warmup": (lambda v: isinstance(v, bool), "True or False"),
    "optim.optimizer": (lambda v: v in optim.OPTIMIZERS, f"one of {optim.OPTIMIZERS}"),
    "optim.lr": (_num(0, _INF, low_open=True), "a number > 0"),
    "optim.beta1": (_num(0, 1, high_open=True), "a number in [0, 1)"),
    "optim.beta2": (_num(0, 1, high_open=True), "a number in [0, 1)"),
    "optim.eps": (_num(0, _INF, low_open=True), "a number > 0"),
    "optim.weight_decay": (_num(0, _INF), "a number >= 0"),
    "optim.warmup_steps": (_int(0), "an integer >= 0"),
    "optim.grad_clip": (_num(0, _INF), "a number >= 0"),
    "sampling.grid_size": (_int(0), "an integer >= 0"),
    "model.parameterization": (
        lambda v: v in builders.PARAMETERIZATIONS,
        f"one of {builders.PARAMETERIZATIONS}",
    ),
    "model.logvar_features": (_int(0), "an integer >= 0"),
    "training.index_sampling": (
        lambda v: v in builders.INDEX_SAMPLINGS,
        f"one of {builders.INDEX_SAMPLINGS}",
    ),
    "training.p_std": (_num(0, _INF, low_open=True), "a number > 0"),
    "training.ect_q": (_num(1, _INF, low_open=True), "a number > 1"),
    "training.ect_stage_steps": (_int(1), "a positive integer"),
    "training.ect_scalings": (
        lambda v: v in builders.ECT_SCALINGS,
        f"one of {builders.ECT_SCALINGS}",
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
    if t.loss not in builders.LOSSES:
        problems.append(f"training.loss: unknown {t.loss!r}; choose one of {builders.LOSSES}")
    if d.name not in data.DATASETS:
        problems.append(f"data.name: unknown {d.name!r}; choose one of {data.DATASETS}")
    if config.model.name not in builders.MODELS:
        problems.append(f"model.name: unknown {config.model.name!r}; choose {builders.MODELS}")
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


def _quartile_losses(per_example, sigma, config) -> dict:
    """Mean loss in each quarter of the rho-warped noise axis (index i/(N-1) on a Karras grid)."""
    m = config.model
    lo, hi = m.sigma_max ** (1 / m.rho), m.sigma_min ** (1 / m.rho)
    u = jnp.clip((sigma ** (1 / m.rho) - lo) / (hi - lo), 0.0, 1.0)
    q = jnp.minimum(jnp.floor(4 * u), 3)
    out = {}
    for k in range(4):
        mask = (q == k).astype(jnp.float32)
        out[f"loss_q{k}"] = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return out


def scan_loops() -> bool:
    # XLA:CPU runs a train step inside a while loop ~18x slower (measured on the digits UNet), so
    # on CPU fused steps and micro-batches are unrolled; accelerators use lax.scan.
    return jax.default_backend() != "cpu"


def make_train_step(config, network, tx, make_loss, mesh, *, state_shardings=None):
    """jitted (state, batches [n, B, ...], teacher_params, distance, key) -> (state, metrics),
    state donated.

    n = training.n_jitted_steps optimiser steps fused (lax.scan on accelerators); each step's
    randomness is fold_in(key, step) and its curriculum (N(k), mu(k)) a traced function of it.
    The loss is make_loss(distance), built inside: the distance (builders.distance_fn, a pytree
    holding LPIPS's frozen params) is an argument, so its weights are buffers, not constants.
    The state is sharded as state_sharding() (FSDP over the mesh's fsdp axis; pass it if known),
    the batch over every device; metrics['finite'] says whether every fused step's loss and
    gradient were finite (the parameters are checked again before each save).
    """
    t = config.training
    schedule = builders.schedule_fn(config)
    ema_rates = tuple(t.ema_rates)
    lr_fn = builders.learning_rate(config)
    scan = scan_loops()
    batches_sharding = sharding.stacked_batch_sharding(mesh)

    def one(state, batch, teacher_params, key, grad_fn):
        step_key = jax.random.fold_in(key, state.step)
        mu, num_scales = schedule(state.step)
        value, grads, per, aux = grad_fn(
            state.params, state.target_params, teacher_params, batch, step_key, state.step
        )
        grad_norm = optax.tree.norm(grads)
        rates = ema_rates
        if t.ema_warmup:
            rates = tuple(train_state.warmup_ema_rate(r, state.step) for r in ema_rates)
        new_state = apply_gradients(state, grads, tx, target_ema=mu, ema_rates=rates)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        metrics = dict(
            loss=value, grad_norm=grad_norm, lr=lr_fn(state.step),
            num_scales=num_scales.astype(jnp.float32), target_ema=mu, finite=finite,
            **_quartile_losses(per, aux["sigma"], config),
            # Loss-specific diagnostics (ECT's r, sCM's logvar and tangent norm), batch means.
            **{k: jnp.mean(v) for k, v in aux.items() if k not in ("sigma", "index")},
        )  # fmt: skip
        return new_state, metrics

    def steps(state, batches, teacher_params, distance, key):
        grad_fn = train_state.make_grad_fn(
            make_loss(distance), t.micro_batches, scan=scan, part_sharding=batches_sharding
        )
        body = lambda st, b: one(st, b, teacher_params, key, grad_fn)  # noqa: E731
        n = jax.tree.leaves(batches)[0].shape[0]
        state, metrics = train_state.loop(body, state, batches, scan=scan and n > 1)
        # Mean over the fused steps; finiteness must hold for every one of them.
        finite = jnp.all(metrics.pop("finite"))
        metrics = jax.tree.map(lambda v: jnp.mean(v, axis=0), metrics)
        return state, dict(metrics, finite=finite)

    if state_shardings is None:
        state_shardings = state_sharding(config, network, tx, mesh)
    rep = sharding.replicated(mesh)
    return jax.jit(
        steps,
        # The teacher keeps the sharding it was put with (None: no constraint).
        in_shardings=(state_shardings, batches_sharding, None, rep, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )


def load_teacher(config, network, expected_params):
    """Frozen EMA params of the CD teacher's checkpoint, checked against the configured network."""
    t = config.training
    params, meta, step = checkpoints.load_params(
        t.teacher_checkpoint, ema_index=t.teacher_ema_index
    )
    found = {"model": meta.get("model"), "params": meta.get("params")}
    checkpoints.check_same_model(
        found, {"model": config.model.name, "params": expected_params}, t.teacher_checkpoint
    )
    if jax.process_index() == 0:
        print(f"teacher: {t.teacher_checkpoint} step {step} (EMA copy {t.teacher_ema_index})")
    return params


def _create_fn(config, network, tx):
    """(key, teacher params or None) -> a fresh TrainState (the student copies the teacher)."""
    d, t = config.data, config.training
    x = jnp.zeros((1, d.image_size, d.image_size, d.num_channels), jnp.float32)
    y = jnp.zeros((1,), jnp.int32)
    with_target = t.loss != "edm" and not builders.online_target(config)

    def create(key, teacher):
        params = teacher if teacher is not None else network.init(key, x, y)
        return TrainState.create(params, tx, num_ema=len(t.ema_rates), with_target=with_target)

    return create


def abstract_state(config, network, tx, mesh) -> TrainState:
    """ShapeDtypeStructs of the TrainState with their shardings: restore templates, no memory."""
    shapes = jax.eval_shape(_create_fn(config, network, tx), jax.random.key(0), None)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        shapes, sharding.tree_sharding(mesh, shapes),
    )  # fmt: skip


def state_sharding(config, network, tx, mesh):
    """The TrainState's shardings: params, target, EMA and moments FSDP-sharded, the rest not."""
    return jax.tree.map(lambda a: a.sharding, abstract_state(config, network, tx, mesh))


def init_state(config, network, tx, mesh, teacher_params=None, *, shardings=None) -> TrainState:
    """A fresh TrainState, sharded over the mesh (as state_sharding() unless given); the student
    copies the teacher if asked."""
    teacher = teacher_params if config.training.init_from_teacher else None
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    # Init runs once: skip backend optimisation (on CPU it compiles several times faster).
    fast = {"xla_backend_optimization_level": 0}
    create = _create_fn(config, network, tx)
    out = state_sharding(config, network, tx, mesh) if shardings is None else shardings
    return jax.jit(create, out_shardings=out, compiler_options=fast)(key, teacher)


def _log(writer, step: int, metrics: dict, rate: float, num_steps: int, start: float):
    eta = (num_steps - step) / max(rate, 1e-9)
    print(
        f"step {step}/{num_steps}  loss {metrics['loss']:.5f}  grad_norm {metrics['grad_norm']:.3f}"
        f"  N {int(metrics['num_scales'])}  {rate:.2f} steps/s  ETA {eta / 60:.1f} min"
        f"  elapsed {(time.time() - start) / 60:.1f} min",
        flush=True,
    )
    if writer is not None:
        for k, v in metrics.items():
            writer.add_scalar(f"train/{k}", float(v), step)
        writer.add_scalar("train/steps_per_sec", rate, step)


def _snapshot(config, workdir, step, state, sample_fn, writer):
    """PNG grid (and a TensorBoard image) of samples from the first EMA copy (process 0 writes)."""
    n = config.sampling.grid_size
    ids = np.arange(n)
    labels = jnp.asarray(evaluate.sample_labels(config, ids))
    images = sample_fn(state.ema_params[0], jax.random.key(0), ids, labels)
    # Every process takes part in sampling (the params may be sharded over hosts).
    images = evaluate.to_uint8(multihost_utils.process_allgather(images, tiled=True))
    if jax.process_index() != 0:
        return
    grid = evaluate.image_grid(images)
    evaluate.save_png(pathlib.Path(workdir) / "samples" / f"grid_{step:07d}.png", grid)
    if writer is not None:
        writer.add_image("samples", grid, step, dataformats="HWC")


def _non_finite(where: str, metrics: dict, checkpointer) -> NonFiniteError:
    """The error naming the step, its loss terms and the last good checkpoint."""
    checkpointer.wait()
    last = checkpointer.latest_step()
    order = sorted(metrics, key=lambda k: (k != "loss", k != "grad_norm", k))
    terms = ", ".join(f"{k} {float(metrics[k]):.6g}" for k in order)
    good = "no checkpoint was written yet" if last is None else f"last good checkpoint: step {last}"
    return NonFiniteError(
        f"non-finite loss, gradient or parameters at {where} ({terms}); {good} in "
        f"{checkpointer.directory} (nothing was saved after it). Lower optim.lr, set "
        "optim.grad_clip, or check the data"
    )


def _check_finite(pending, n_fused: int, checkpointer) -> dict:
    """Host copies of the metrics since the last check; NonFiniteError at the first bad step."""
    for step, metrics in jax.device_get(pending):
        if not metrics.pop("finite"):
            where = f"step {step}" if n_fused == 1 else f"steps {step - n_fused + 1}-{step}"
            raise _non_finite(where, metrics, checkpointer)
    return metrics


def _restore_or_init(config, network, tx, mesh, teacher, checkpointer, meta, template):
    """The newest sound checkpoint (corrupt ones are reported and skipped), else a fresh state."""
    found = checkpointer.restore_latest(template, meta)
    if found is None:
        shardings = jax.tree.map(lambda a: a.sharding, template)
        return init_state(config, network, tx, mesh, teacher, shardings=shardings)
    state, _, step = found
    if jax.process_index() == 0:
        print(f"resumed from step {step} in {checkpointer.directory}", flush=True)
    return state


def _batches(config, mesh, start_step: int):
    """This process's rows of every global batch from start_step on."""
    t, d = config.training, config.data
    index, count = sharding.process_rows(mesh, t.batch_size)
    source = data.make_source(d.name, split=d.split, data_dir=d.data_dir or None, folder=d.folder)
    return data.make_batches(
        source, seed=config.seed, local_batch=t.batch_size // count, image_size=d.image_size,
        num_channels=d.num_channels, random_flip=d.random_flip, start_step=start_step,
        process_index=index, process_count=count, num_threads=d.num_threads,
    )  # fmt: skip


def train_and_evaluate(config, workdir: str, *, devices=None) -> TrainState:
    """Train (resuming from the newest sound checkpoint in workdir), log, snapshot; return state.

    Every process of a multi-host job runs this (after jax.distributed.initialize) on the mesh of
    `devices` (default: all); each feeds its own rows of the batch, checkpoints are written
    collectively, and only process 0 prints or writes config.json, TensorBoard and PNG grids.
    SIGTERM saves a checkpoint at the next step and raises Preempted; a non-finite step raises
    NonFiniteError without saving.
    """
    devices = jax.devices() if devices is None else list(devices)
    validate_config(config, num_devices=len(devices))
    lead = jax.process_index() == 0
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if lead:
        checkpoints.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    t = config.training
    mesh = sharding.make_mesh(t.mesh_fsdp, devices)
    # Before anything heavy: a missing LPIPS weights file fails here, naming its key.
    distance = jax.device_put(builders.distance_fn(config), sharding.replicated(mesh))
    network = builders.build_network(config)
    expected = checkpoints.param_fingerprint(evaluate.abstract_params(config, network))
    meta = {"model": config.model.name, "params": expected}
    teacher = load_teacher(config, network, expected) if t.teacher_checkpoint else None
    if teacher is not None:
        teacher = jax.device_put(teacher, sharding.tree_sharding(mesh, teacher))
    tx = builders.optimizer(config)
    checkpointer = checkpoints.Checkpointer(workdir / "checkpoints", t.keep_checkpoints)
    template = abstract_state(config, network, tx, mesh)
    state = _restore_or_init(config, network, tx, mesh, teacher, checkpointer, meta, template)
    step = int(state.step)
    make_loss = functools.partial(builders.loss_fn, config, network)
    shardings = jax.tree.map(lambda a: a.sharding, template)
    train_step = make_train_step(config, network, tx, make_loss, mesh, state_shardings=shardings)
    sample_fn = evaluate.make_sample_fn(config, network)
    batches = _batches(config, mesh, step)
    writer = _tensorboard(workdir) if lead else None
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    batch_sharding = sharding.stacked_batch_sharding(mesh)
    watch = checkpoints.PreemptionWatch()
    pending = []  # (step, metrics on device) since the last finiteness check
    start, last_time, last_step = time.time(), time.time(), step
    try:
        while step < t.num_steps:
            local = [next(batches) for _ in range(t.n_jitted_steps)]
            stacked = {k: np.stack([b[k] for b in local]) for k in ("image", "label")}
            state, metrics = train_step(
                state, sharding.global_array(stacked, batch_sharding), teacher, distance, key
            )
            step += t.n_jitted_steps
            pending.append((step, metrics))
            preempted = watch.reached(step)
            log = step % t.log_every == 0 or step == t.num_steps
            save = step % t.snapshot_every == 0 or step == t.num_steps or preempted
            if log or save:  # a poisoned state is never saved: check every step since the last
                metrics, pending = _check_finite(pending, t.n_jitted_steps, checkpointer), []
            if log and lead:
                now = time.time()
                rate = (step - last_step) / (now - last_time)
                _log(writer, step, metrics, rate, t.num_steps, start)
                last_time, last_step = now, step
            if save:
                try:
                    checkpointer.save(step, state, meta)
                except checkpoints.NonFiniteStateError:
                    raise _non_finite(f"step {step}", metrics, checkpointer) from None
            if preempted:
                checkpointer.wait()
                if lead:
                    print(
                        f"preempted: saved checkpoint step {step} in {checkpointer.directory}; "
                        "run the same command to resume",
                        flush=True,
                    )
                raise Preempted(step)
            if save and config.sampling.grid_size > 0:
                _snapshot(config, workdir, step, state, sample_fn, writer)
    finally:
        watch.close()
        checkpointer.close()
        if writer is not None:
            writer.close()
    return state


def _tensorboard(workdir: pathlib.Path):
    """TensorBoard event files without TensorFlow (tensorboardX)."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tensorboard"))
