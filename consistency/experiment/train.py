"""--mode=train: train_and_evaluate (resume, log, checkpoint, snapshot), the training loop."""

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from consistency.experiment import networks, sample, spec, train_state, update
from consistency.experiment.train_state import TrainState
from consistency.io import checkpoints, data, image_io, preemption, sharding


class NonFiniteError(RuntimeError):
    """Raised when the loss, the gradient or the parameters stop being finite."""


class Preempted(SystemExit):
    """Raised after the final checkpoint of a preempted run: exit status 143 (128 + SIGTERM)."""

    def __init__(self, step: int):
        super().__init__(143)
        self.step = step


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
    labels = jnp.asarray(sample.sample_labels(config, ids))
    images = sample_fn(state.ema_params[0], jax.random.key(0), ids, labels)
    # Every process takes part in sampling (the params may be sharded over hosts).
    images = image_io.to_uint8(multihost_utils.process_allgather(images, tiled=True))
    if jax.process_index() != 0:
        return
    grid = image_io.image_grid(images)
    image_io.save_png(pathlib.Path(workdir) / "samples" / f"grid_{step:07d}.png", grid)
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
        return update.init_state(config, network, tx, mesh, teacher, shardings=shardings)
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
        source,
        seed=config.seed,
        local_batch=t.batch_size // count,
        image_size=d.image_size,
        num_channels=d.num_channels,
        random_flip=d.random_flip,
        start_step=start_step,
        process_index=index,
        process_count=count,
        num_threads=d.num_threads,
    )


def train_and_evaluate(config, workdir: str, *, devices=None) -> TrainState:
    """Train (resuming from the newest sound checkpoint in workdir), log, snapshot; return state.

    Every process of a multi-host job runs this (after jax.distributed.initialize) on the mesh of
    `devices` (default: all); each feeds its own rows of the batch, checkpoints are written
    collectively, and only process 0 prints or writes config.json, TensorBoard and PNG grids.
    SIGTERM saves a checkpoint at the next step and raises Preempted; a non-finite step raises
    NonFiniteError without saving.
    """
    devices = jax.devices() if devices is None else list(devices)
    spec.validate_config(config, num_devices=len(devices))
    lead = jax.process_index() == 0
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if lead:
        checkpoints.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    t = config.training
    mesh = sharding.make_mesh(t.mesh_fsdp, devices)
    # Before anything heavy: a missing LPIPS weights file fails here, naming its key.
    distance = jax.device_put(networks.distance_fn(config), sharding.replicated(mesh))
    network = networks.build_network(config)
    expected = checkpoints.param_fingerprint(sample.abstract_params(config, network))
    meta = {"model": config.model.name, "params": expected}
    teacher = load_teacher(config, network, expected) if t.teacher_checkpoint else None
    if teacher is not None:
        teacher = jax.device_put(teacher, sharding.tree_sharding(mesh, teacher))
    tx = train_state.optimizer(config)
    checkpointer = checkpoints.Checkpointer(workdir / "checkpoints", t.keep_checkpoints)
    template = update.abstract_state(config, network, tx, mesh)
    state = _restore_or_init(config, network, tx, mesh, teacher, checkpointer, meta, template)
    step = int(state.step)
    shardings = jax.tree.map(lambda a: a.sharding, template)
    train_step = update.train_step_for(config, network, tx, mesh, state_shardings=shardings)
    sample_fn = sample.make_sample_fn(config, network)
    batches = _batches(config, mesh, step)
    writer = _tensorboard(workdir) if lead else None
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    batch_sharding = sharding.stacked_batch_sharding(mesh)
    watch = preemption.PreemptionWatch()
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


run = train_and_evaluate  # main.py's entry point of this mode
