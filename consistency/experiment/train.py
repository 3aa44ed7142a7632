"""--mode=train: train_and_evaluate (resume, log, checkpoint, snapshot), the training loop."""

import collections
import json
import pathlib
import subprocess
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


class ResumeMismatchError(ValueError):
    """The workdir's checkpoint holds a state of another structure than this config builds."""


class Preempted(SystemExit):
    """Raised after the final checkpoint of a preempted run: exit status 143 (128 + SIGTERM)."""

    def __init__(self, step: int):
        super().__init__(143)
        self.step = step


def checkpoint_meta(config, expected_params) -> dict:
    """What a checkpoint records of what it is: network, parameter fingerprint, method."""
    loss = config.training.loss
    return {
        "model": config.model.name,
        "params": expected_params,
        "method": loss,
        "samples_as": methods.row(loss).samples_as,
        "parameterization": config.model.parameterization,
    }


def check_teacher(meta: dict, config, where) -> None:
    """A teacher is a diffusion model: an 'edm' (or, VP, 'ddpm') run with the student's
    parameterization (the teacher's network is applied with the student's scalings)."""
    wanted = config.model.parameterization
    method, found = meta.get("method"), meta.get("parameterization")
    if method is None:  # written before checkpoints recorded what they are
        if jax.process_index() == 0:
            print(
                f"WARNING: teacher checkpoint {where} does not record its method (an older "
                f"checkpoint); assuming a training.loss='edm' run with "
                f"model.parameterization={wanted!r}",
                flush=True,
            )
        return
    if method not in methods.TEACHERS or found != wanted:
        raise checkpoints.ModelMismatchError(
            f"training.teacher_checkpoint {where} holds a training.loss={method!r} model "
            f"(samples as {meta.get('samples_as')!r}, model.parameterization={found!r}); a "
            f"{config.training.loss!r} teacher must be a diffusion model: a training.loss='edm' "
            f"run (VP: 'ddpm') with model.parameterization={wanted!r}"
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
    check_teacher(meta, config, t.teacher_checkpoint)
    if jax.process_index() == 0:
        print(f"teacher: {t.teacher_checkpoint} step {step} (EMA copy {t.teacher_ema_index})")
    return params


def load_start(config, expected_params, mesh):
    """training.init_checkpoint's EMA copy (training.init_ema_index): the params, target and EMA
    copies this run starts from (LCF: a guided_cd student's, guidance_proj included). It must
    hold this very network (model and parameter fingerprint) and parameterization."""
    t = config.training
    params, meta, step = checkpoints.load_params(t.init_checkpoint, ema_index=t.init_ema_index)
    wanted, method = config.model.parameterization, meta.get("method")
    if meta.get("model") != config.model.name or meta.get("params") != expected_params:
        raise checkpoints.ModelMismatchError(
            f"training.init_checkpoint {t.init_checkpoint} holds a {meta.get('model')!r} network "
            f"(training.loss={method!r}) of other parameters than this config's "
            f"{config.model.name!r}: give the run the checkpoint's network (its model.* and "
            "data.* overrides; LCF: model.guidance_embed_dim of the guided student)"
        )
    if meta.get("parameterization", wanted) != wanted:
        raise checkpoints.ModelMismatchError(
            f"training.init_checkpoint {t.init_checkpoint} holds a training.loss={method!r} "
            f"model of model.parameterization={meta.get('parameterization')!r}; this run's is "
            f"{wanted!r}"
        )
    if jax.process_index() == 0:
        print(f"start: {t.init_checkpoint} step {step} ({method}, EMA copy {t.init_ema_index})")
    return jax.device_put(params, sharding.tree_sharding(mesh, params))


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


def _group(path: str) -> str:
    """The parts of the state that are kept or re-initialised as a whole: each EMA copy alone."""
    parts = path.split("/")
    return "/".join(parts[:2]) if parts[0] == "ema_params" and len(parts) > 1 else parts[0]


def _merge(raw, template, fresh) -> tuple[TrainState, dict]:
    """The template's state from a restored tree of another structure: each part whose arrays
    all match is kept; a target or EMA copy that does not starts from the restored params; the
    rest (an optimiser state of another structure) is fresh. Returns (state, {part: how})."""
    found = dict(zip(checkpoints.tree_paths(raw), jax.tree.leaves(raw), strict=True))
    have, want = checkpoints.structure(raw), checkpoints.structure(template)
    paths = checkpoints.tree_paths(template)
    whole = {}
    for g in {_group(p) for p in paths}:
        mine = [p for p in paths if _group(p) == g]
        theirs = [p for p in have if _group(p) == g]
        whole[g] = len(mine) == len(theirs) and all(have.get(p) == want[p] for p in mine)
    values, reinit = [], {}
    for path, new in zip(paths, jax.tree.leaves(fresh), strict=True):
        g = _group(path)
        source = "params" + path[len(g) :]
        if whole[g]:
            values.append(found[path])
        elif g.startswith(("ema_params", "target_params")) and have.get(source) == want[path]:
            values.append(found[source])
            reinit[g] = "from the restored params"
        else:
            values.append(new)
            reinit[g] = "fresh"
    shardings = jax.tree.map(lambda a: a.sharding, template)
    state = jax.tree.unflatten(jax.tree.structure(template), values)
    return jax.device_put(state, shardings), reinit


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def recorded_config(workdir: pathlib.Path) -> tuple[dict | None, str]:
    """(config, where) of the workdir's last started run: runs.jsonl, else an older config.json."""
    runs = workdir / "runs.jsonl"
    if runs.exists():
        lines = [line for line in runs.read_text().splitlines() if line.strip()]
        if lines:
            return json.loads(lines[-1])["config"], str(runs)
    path = workdir / "config.json"
    return (json.loads(path.read_text()), str(path)) if path.exists() else (None, "")


def config_changes(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every config key whose value differs (absent keys included)."""
    a, b = _flat(old), _flat(new)
    gone = "(absent)"
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, gone) != b.get(k, gone))
    return [f"{k}: {a.get(k, gone)!r} -> {b.get(k, gone)!r}" for k in keys]


def _mismatch(config, workdir, checkpointer, template, error) -> ResumeMismatchError:
    """The refusal naming the changed config keys and the parts of the state that differ."""
    found = checkpointer.saved_structure(error.step)
    parts = checkpoints.structure_differences(found, checkpoints.structure(template), _group)
    old, where = recorded_config(workdir)
    changed = config_changes(old, _config_json(config)) if old is not None else []
    keys = "; ".join(changed[:12]) + (" ..." if len(changed) > 12 else "") or "none"
    if old is None:
        keys = "unknown (no recorded config in the workdir)"
    return ResumeMismatchError(
        f"cannot resume from checkpoint step {error.step} in {checkpointer.directory}: its state "
        f"differs in structure from the one this config builds: {'; '.join(parts)}. Config keys "
        f"that differ from the run's recorded config ({where or 'none'}): {keys}. Nothing was "
        "restored or moved. To continue from its params, target and EMA copies with what "
        "changed re-initialised (a fresh optimiser state; a new EMA copy starts from the "
        "params), add --config.training.resume_reinit_changed=True; or use a fresh --workdir"
    )


def _restore_or_init(config, workdir, network, tx, mesh, teacher, checkpointer, meta, template):
    """(state, what a changed resume re-initialised or None): the newest sound checkpoint
    (corrupt ones are reported and skipped), else a fresh state (training.init_checkpoint's).

    A checkpoint whose state differs in structure (another optimiser, another number of EMA
    copies) stops the run (ResumeMismatchError), unless training.resume_reinit_changed.
    """
    shardings = jax.tree.map(lambda a: a.sharding, template)

    def fresh():  # training.init_checkpoint is read only when the run starts afresh
        start = (
            load_start(config, meta["params"], mesh) if config.training.init_checkpoint else None
        )
        return update.init_state(
            config, network, tx, mesh, teacher, start=start, shardings=shardings
        )

    notes = {}

    def changed(step):  # a restore into the template's structure from another one
        checkpoints.check_same_model(
            checkpointer.read_meta(step), meta, f"{checkpointer.directory} step {step}"
        )
        raw, found_meta = checkpointer.restore_raw(step)
        state, notes[step] = _merge(raw, template, fresh())
        return state, found_meta

    try:
        found = checkpointer.restore_latest(template, meta)
    except checkpoints.StructureMismatchError as e:
        if not config.training.resume_reinit_changed:
            raise _mismatch(config, workdir, checkpointer, template, e) from None
        found = checkpointer.restore_latest(template, meta, restore=changed)
    if found is None:
        return fresh(), None
    state, _, step = found
    note = notes.get(step)
    if jax.process_index() == 0:
        print(f"resumed from step {step} in {checkpointer.directory}", flush=True)
        if note:
            what = ", ".join(f"{g} ({how})" for g, how in sorted(note.items()))
            print(
                f"training.resume_reinit_changed: the checkpoint's state differs in structure; "
                f"kept every part that matches, re-initialised {what}",
                flush=True,
            )
    return state, note


def _commit() -> str | None:
    """The code's git commit (with '+' when the tree has changes), if git answers quickly."""
    repo = pathlib.Path(__file__).resolve().parents[2]
    try:
        run = lambda *a: subprocess.run(
            ["git", "-C", str(repo), *a], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        return run("rev-parse", "HEAD") + ("+" if run("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _record_run(workdir: pathlib.Path, config, step: int, note: dict | None) -> None:
    """Append the run to WORKDIR/runs.jsonl (config, start step, time, commit); config.json
    holds the latest. Written once the run has started: a refused run leaves both alone."""
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "start_step": step,
        "commit": _commit(),
        "config": _config_json(config),
    }
    if note:
        record["resume_reinit_changed"] = note
    with open(workdir / "runs.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    checkpoints.write_json(workdir / "config.json", record["config"])


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
    meta = checkpoint_meta(config, expected)
    teacher = None
    if t.teacher_checkpoint:  # a guided student's teacher: the network without the w input
        teacher_net = network.unguided()
        shapes = sample.abstract_params(config, teacher_net) if network.guided else None
        fingerprint = expected if shapes is None else checkpoints.param_fingerprint(shapes)
        teacher = load_teacher(config, teacher_net, fingerprint)
    if teacher is not None:
        teacher = jax.device_put(teacher, sharding.tree_sharding(mesh, teacher))
    tx = train_state.optimizer(config)
    checkpointer = checkpoints.Checkpointer(workdir / "checkpoints", t.keep_checkpoints)
    template = update.abstract_state(config, network, tx, mesh)
    try:
        state, note = _restore_or_init(
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
        _record_run(workdir, config, step, note)
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
