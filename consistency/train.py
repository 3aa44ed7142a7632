"""The training program: config validation, the jitted train step, and train_and_evaluate."""

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from consistency import builders, checkpoints, data, evaluate, sharding
from consistency.train_state import TrainState, apply_gradients


class NonFiniteError(RuntimeError):
    """Raised when the loss or the gradient stops being finite."""


def validate_config(config) -> None:
    """One clear message per bad key, before anything is built."""
    t, d = config.training, config.data
    problems = []
    if t.loss not in builders.LOSSES:
        problems.append(f"training.loss: unknown {t.loss!r}; choose one of {builders.LOSSES}")
    if d.name not in data.DATASETS:
        problems.append(f"data.name: unknown {d.name!r}; choose one of {data.DATASETS}")
    if config.model.name not in builders.MODELS:
        problems.append(f"model.name: unknown {config.model.name!r}; choose {builders.MODELS}")
    for key in ("log_every", "snapshot_every", "num_steps"):
        if t[key] <= 0 or t[key] % t.n_jitted_steps:
            problems.append(
                f"training.{key}={t[key]} must be a positive multiple of training.n_jitted_steps"
                f"={t.n_jitted_steps}"
            )
    if t.loss == "cd" and not t.teacher_checkpoint:
        problems.append("training.teacher_checkpoint: CD needs the EDM teacher's checkpoint dir")
    if t.teacher_checkpoint and not pathlib.Path(t.teacher_checkpoint).exists():
        problems.append(f"training.teacher_checkpoint: no such path {t.teacher_checkpoint!r}")
    if t.init_from_teacher and not t.teacher_checkpoint:
        problems.append("training.init_from_teacher needs training.teacher_checkpoint")
    if not t.ema_rates or any(not 0 <= r < 1 for r in t.ema_rates):
        problems.append(f"training.ema_rates={t.ema_rates}: give rates in [0, 1)")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


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


def make_train_step(config, network, tx, loss, mesh):
    """jitted (state, batches [n, B, ...], teacher_params, key) -> (state, metrics), state donated.

    n = training.n_jitted_steps optimiser steps fused (lax.scan on accelerators); each step's
    randomness is fold_in(key, step) and its curriculum (N(k), mu(k)) a traced function of it.
    """
    schedule = builders.schedule_fn(config)
    ema_rates = tuple(config.training.ema_rates)
    lr_fn = builders.learning_rate(config)

    def one(state, batch, teacher_params, key):
        step_key = jax.random.fold_in(key, state.step)
        mu, num_scales = schedule(state.step)

        def mean_loss(params):
            per, aux = loss(
                params, state.target_params, teacher_params, batch, step_key, state.step
            )
            return per.mean(), (per, aux)

        (value, (per, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        new_state = apply_gradients(state, grads, tx, target_ema=mu, ema_rates=ema_rates)
        metrics = dict(
            loss=value, grad_norm=grad_norm, lr=lr_fn(state.step),
            num_scales=num_scales.astype(jnp.float32), target_ema=mu,
            **_quartile_losses(per, aux["sigma"], config),
        )  # fmt: skip
        return new_state, metrics

    def steps(state, batches, teacher_params, key):
        n = jax.tree.leaves(batches)[0].shape[0]
        if n > 1 and jax.default_backend() != "cpu":
            body = lambda st, b: one(st, b, teacher_params, key)  # noqa: E731
            state, metrics = jax.lax.scan(body, state, batches)
        else:
            # XLA:CPU runs a train step inside a while loop ~18x slower (measured on the digits
            # UNet), so on CPU (and for n = 1) the fused steps are unrolled instead.
            per_step = []
            for k in range(n):
                batch = jax.tree.map(lambda v, k=k: v[k], batches)
                state, m = one(state, batch, teacher_params, key)
                per_step.append(m)
            metrics = jax.tree.map(lambda *v: jnp.stack(v), *per_step)
        # Mean over the fused steps; finiteness must hold for every one of them.
        finite = jnp.all(jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]))
        metrics = jax.tree.map(lambda v: jnp.mean(v, axis=0), metrics)
        return state, dict(metrics, finite=finite)

    rep = sharding.replicated(mesh)
    return jax.jit(
        steps,
        in_shardings=(rep, sharding.stacked_batch_sharding(mesh), rep, rep),
        out_shardings=(rep, rep),
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
    print(f"teacher: {t.teacher_checkpoint} step {step} (EMA copy {t.teacher_ema_index})")
    return params


def init_state(config, network, tx, mesh, teacher_params=None) -> TrainState:
    """A fresh TrainState, replicated over the mesh; the student copies the teacher if asked."""
    d, t = config.data, config.training
    x = jnp.zeros((1, d.image_size, d.image_size, d.num_channels), jnp.float32)
    y = jnp.zeros((1,), jnp.int32)
    rep = sharding.replicated(mesh)

    def create(key, teacher):
        params = teacher if teacher is not None else network.init(key, x, y)
        return TrainState.create(params, tx, num_ema=len(t.ema_rates), with_target=t.loss != "edm")

    teacher = teacher_params if t.init_from_teacher else None
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    # Init runs once: skip backend optimisation (on CPU it compiles several times faster).
    fast = {"xla_backend_optimization_level": 0}
    return jax.jit(create, out_shardings=rep, compiler_options=fast)(key, teacher)


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
    """PNG grid (and a TensorBoard image) of samples from the first EMA copy."""
    n = config.sampling.grid_size
    ids = np.arange(n)
    labels = jnp.asarray(evaluate.sample_labels(config, ids))
    images = evaluate.to_uint8(sample_fn(state.ema_params[0], jax.random.key(0), ids, labels))
    grid = evaluate.image_grid(images)
    evaluate.save_png(pathlib.Path(workdir) / "samples" / f"grid_{step:07d}.png", grid)
    if writer is not None:
        writer.add_image("samples", grid, step, dataformats="HWC")


def _check_finite(metrics, step, checkpointer) -> None:
    if not bool(metrics["finite"]):
        last = checkpointer.latest_step()
        terms = {k: float(v) for k, v in metrics.items() if k != "finite"}
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step}: {terms}; the last good checkpoint is "
            f"step {last} in {checkpointer.directory} (nothing was saved after the failure)"
        )


def train_and_evaluate(config, workdir: str) -> TrainState:
    """Train (resuming from the latest checkpoint in workdir), log, snapshot; return the state."""
    validate_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    t, d = config.training, config.data
    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(t.batch_size, mesh)
    network = builders.build_network(config)
    expected = checkpoints.param_fingerprint(evaluate.abstract_params(config, network))
    meta = {"model": config.model.name, "params": expected}
    teacher = load_teacher(config, network, expected) if t.teacher_checkpoint else None
    if teacher is not None:
        teacher = jax.device_put(teacher, sharding.replicated(mesh))
    tx = builders.optimizer(config)
    checkpointer = checkpoints.Checkpointer(workdir / "checkpoints", t.keep_checkpoints)
    state = init_state(config, network, tx, mesh, teacher)
    if checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(checkpointer.latest_step(), state, meta)
        print(f"resumed from step {int(state.step)} in {checkpointer.directory}")
    step = int(state.step)
    loss = builders.loss_fn(config, network, builders.distance_fn(config))
    train_step = make_train_step(config, network, tx, loss, mesh)
    sample_fn = evaluate.make_sample_fn(config, network)
    source = data.make_source(d.name, split=d.split, data_dir=d.data_dir or None, folder=d.folder)
    batches = data.make_batches(
        source, seed=config.seed, local_batch=t.batch_size // jax.process_count(),
        image_size=d.image_size, num_channels=d.num_channels, random_flip=d.random_flip,
        start_step=step, process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=d.num_threads,
    )  # fmt: skip
    writer = _tensorboard(workdir) if jax.process_index() == 0 else None
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    batch_sharding = sharding.stacked_batch_sharding(mesh)
    start, last_time, last_step = time.time(), time.time(), step
    while step < t.num_steps:
        local = [next(batches) for _ in range(t.n_jitted_steps)]
        stacked = {k: np.stack([b[k] for b in local]) for k in ("image", "label")}
        state, metrics = train_step(
            state, sharding.global_array(stacked, batch_sharding), teacher, key
        )
        step += t.n_jitted_steps
        if step % t.log_every == 0 or step == t.num_steps:
            metrics = jax.device_get(metrics)
            _check_finite(metrics, step, checkpointer)
            now = time.time()
            _log(writer, step, metrics, (step - last_step) / (now - last_time), t.num_steps, start)
            last_time, last_step = now, step
        if step % t.snapshot_every == 0 or step == t.num_steps:
            _check_finite(jax.device_get(metrics), step, checkpointer)
            checkpointer.save(step, state, meta)
            _snapshot(config, workdir, step, state, sample_fn, writer)
    checkpointer.close()
    if writer is not None:
        writer.close()
    return state


def _tensorboard(workdir: pathlib.Path):
    """TensorBoard event files without TensorFlow (tensorboardX)."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tensorboard"))
