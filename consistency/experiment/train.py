"""--mode=train: train_and_evaluate (resume, log, checkpoint, snapshot), the training loop."""

import collections
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from consistency.experiment import (
    latent,
    methods,
    monitor,
    networks,
    resume,
    sample,
    spec,
    train_state,
    update,
)
from consistency.experiment.train_state import TrainState
from consistency.io import checkpoints, data, image_io, preemption, prefetch, sharding

# Batches made ahead of the step by a background thread (each a stacked global array on device).
PREFETCH_DEPTH = 2
# Steps dispatched but not finished at most: the host waits on the step before the last, never
# on the one just dispatched, so the device always has the next step queued; the bound keeps the
# queued steps' inputs (device memory) from growing over a long log interval.
MAX_IN_FLIGHT = 2


class NonFiniteError(RuntimeError):
    """Raised when the loss, the gradient or the parameters stop being finite."""


class Preempted(SystemExit):
    """Raised after the final checkpoint of a preempted run: exit status 143 (128 + SIGTERM)."""

    def __init__(self, step: int):
        super().__init__(143)
        self.step = step


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
    """PNG grid (and a TensorBoard image) of samples from the EMA copy that sampling reads
    (sampling.ema_index; process 0 writes)."""
    n = config.sampling.grid_size
    ids = np.arange(n)
    labels = jnp.asarray(sample.sample_labels(config, ids))
    images = sample_fn(state.ema_params[config.sampling.ema_index], jax.random.key(0), ids, labels)
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


def _batches(config, mesh, start_step: int, workdir):
    """This process's rows of every global batch from start_step on (latents: the cache's)."""
    t, d = config.training, config.data
    index, count = sharding.process_rows(mesh, t.batch_size)
    source = latent.training_source(config, workdir)
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


def _device_batches(batches, n: int, batch_sharding):
    """Global arrays [n, B, ...] of each n consecutive local batches, placed on the mesh."""
    while True:
        local = [next(batches) for _ in range(n)]
        stacked = {k: np.stack([b[k] for b in local]) for k in ("image", "label")}
        yield sharding.global_array(stacked, batch_sharding)


def train_and_evaluate(config, workdir: str, *, devices=None) -> TrainState:
    """Train (resuming from the newest sound checkpoint in workdir), log, snapshot; return state.

    Every process of a multi-host job runs this (after jax.distributed.initialize) on the mesh of
    `devices` (default: all); each feeds its own rows of the batch, checkpoints are written
    collectively, and only process 0 prints or writes runs.jsonl, config.json, TensorBoard and
    PNG grids. SIGTERM saves a checkpoint at the next step and raises Preempted; a non-finite
    step raises NonFiniteError without saving; a failed (asynchronous) save raises
    CheckpointWriteError at the next step; a checkpoint of another state structure raises
    ResumeMismatchError (see training.resume_reinit_changed).
    """
    devices = jax.devices() if devices is None else list(devices)
    spec.validate_config(config, num_devices=len(devices))
    lead = jax.process_index() == 0
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = config.training
    mesh = sharding.make_mesh(t.mesh_fsdp, devices)
    # Before anything heavy: a missing LPIPS weights file fails here, naming its key.
    distance = jax.device_put(networks.distance_fn(config), sharding.replicated(mesh))
    network = networks.build_network(config)
    expected = checkpoints.param_fingerprint(sample.abstract_params(config, network))
    meta = resume.checkpoint_meta(config, expected)
    teacher = None
    if t.teacher_checkpoint:  # a guided student's teacher: the network without the w input
        teacher_net = network.unguided()
        shapes = sample.abstract_params(config, teacher_net) if network.guided else None
        fingerprint = expected if shapes is None else checkpoints.param_fingerprint(shapes)
        teacher = resume.load_teacher(config, teacher_net, fingerprint)
    if teacher is not None:
        teacher = jax.device_put(teacher, sharding.tree_sharding(mesh, teacher))
    tx = train_state.optimizer(config)
    checkpointer = checkpoints.Checkpointer(workdir / "checkpoints", t.keep_checkpoints)
    template = update.abstract_state(config, network, tx, mesh)
    try:
        state, note = resume.restore_or_init(
            config, workdir, network, tx, mesh, teacher, checkpointer, meta, template
        )
        step = int(state.step)
        if step > t.num_steps:
            raise ValueError(
                f"training.num_steps={t.num_steps} is below step {step} of the checkpoint in "
                f"{checkpointer.directory}: nothing to train. Set training.num_steps above "
                f"{step} to continue the run, or use a fresh --workdir"
            )
    except BaseException:
        checkpointer.close()
        raise
    if note:
        meta = dict(meta, resume_reinit_changed={"step": step, "reinitialised": note})
    if lead:
        resume.record_run(workdir, config, step, note)
    shardings = jax.tree.map(lambda a: a.sharding, template)
    train_step = update.train_step_for(config, network, tx, mesh, state_shardings=shardings)
    autoencoder = methods.row(t.loss).samples_as == "autoencoder"
    decode = latent.decoder(config)  # latents -> images for grids and FID (None: pixels)
    if autoencoder:  # its grids: training images above their reconstructions
        sample_fn = latent.reconstruction_fn(
            network, latent.training_source(config, workdir), config.data
        )
    else:
        sample_fn = sample.make_sample_fn(config, network, decode=decode)
    scorer = None
    if config.eval.every_steps:  # FID while training: classifier and reference are made here
        scorer = monitor.TrainingEval(config, workdir, network, mesh, decode=decode)
    batches = _batches(config, mesh, step, workdir)
    writer = _tensorboard(workdir) if lead else None
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    batch_sharding = sharding.stacked_batch_sharding(mesh)
    watch = preemption.PreemptionWatch()
    pending = []  # (step, metrics on device) since the last finiteness check
    in_flight = collections.deque(maxlen=MAX_IN_FLIGHT)  # 'finite' of the last steps dispatched
    start, last_time, last_step = time.time(), time.time(), step
    # The next batches are read, stacked and put on the devices while the step runs.
    inputs = prefetch.Prefetcher(
        _device_batches(batches, t.n_jitted_steps, batch_sharding), PREFETCH_DEPTH, "train-inputs"
    )
    try:
        while step < t.num_steps:
            if len(in_flight) == MAX_IN_FLIGHT:
                in_flight[0].block_until_ready()
            state, metrics = train_step(state, next(inputs), teacher, distance, key)
            in_flight.append(metrics["finite"])
            step += t.n_jitted_steps
            checkpointer.check()  # a failed asynchronous save stops the run here
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
            if scorer is not None and scorer.due(step, last=step == t.num_steps):
                scorer(step, state.ema_params[config.eval.ema_index], writer)
    finally:
        inputs.close()
        watch.close()
        checkpointer.close()
        if writer is not None:
            writer.close()
    if autoencoder and lead:  # a diffusers vae/ folder that latent.vae reads
        folder = latent.export_autoencoder(
            config, workdir, network, state.ema_params[config.sampling.ema_index]
        )
        print(f"autoencoder (EMA copy {config.sampling.ema_index}) exported to {folder}")
    return state


def _tensorboard(workdir: pathlib.Path):
    """TensorBoard event files without TensorFlow (tensorboardX)."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tensorboard"))


run = train_and_evaluate  # main.py's entry point of this mode
