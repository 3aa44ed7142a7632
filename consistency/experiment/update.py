"""The jitted train step: per-example loss -> gradients -> optimiser, target and EMA updates."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from consistency.core.schedules import NoiseGrid
from consistency.experiment import methods, networks, train_state
from consistency.experiment.train_state import TrainState, apply_gradients
from consistency.io import sharding


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the train step needs beyond the method: EMA, micro-batches, logging axis, lr."""

    ema_rates: tuple[float, ...] = (0.9999,)
    ema_warmup: bool = False  # rate min(rate, (1 + k)/(10 + k)) at step k
    micro_batches: int = 1
    grid: NoiseGrid = NoiseGrid()  # the noise axis of the loss quartiles
    lr: float = 4e-4  # for the logged learning rate
    warmup_steps: int = 0


def _quartile_losses(per_example, sigma, grid: NoiseGrid) -> dict:
    """Mean loss in each quarter of the rho-warped noise axis (index i/(N-1) on a Karras grid)."""
    lo, hi = grid.sigma_max ** (1 / grid.rho), grid.sigma_min ** (1 / grid.rho)
    u = jnp.clip((sigma ** (1 / grid.rho) - lo) / (hi - lo), 0.0, 1.0)
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


def restart_stage(state: TrainState, restart: jax.Array, tx) -> TrainState:
    """Where `restart`: params = target = the first EMA copy, and a fresh optimiser (PD stages)."""
    new = state.ema_params[0]

    def pick(a, b):
        return jax.tree.map(lambda x, y: jnp.where(restart, x, y), a, b)

    return state.replace(
        params=pick(new, state.params),
        target_params=pick(new, state.target_params),
        opt_state=pick(tx.init(new), state.opt_state),
    )


def make_train_step(
    spec: StepSpec, method: methods.Method, fns: methods.ModelFns, tx, mesh, state_shardings
):
    """jitted (state, batches [n, B, ...], teacher_params, distance, key) -> (state, metrics),
    state donated.

    n fused optimiser steps (lax.scan on accelerators); each step's randomness is
    fold_in(key, step) and its curriculum (N(k), mu(k)) a traced function of it. The method's
    loss gets the distance as an argument (networks.distance_fn, a pytree holding LPIPS's frozen
    params), so its weights are buffers, not constants. The state is sharded as
    state_shardings (state_sharding(): FSDP over the mesh's fsdp axis), the batch over every
    device; metrics['finite'] says whether every fused step's loss and gradient were finite (the
    parameters are checked again before each save).
    """
    lr_fn = train_state.learning_rate_schedule(spec.lr, spec.warmup_steps)
    scan = scan_loops()
    batches_sharding = sharding.stacked_batch_sharding(mesh)

    def one(state, batch, teacher_params, key, grad_fn):
        restart = method.restarts(state.step)
        if restart is not None:
            state = restart_stage(state, restart, tx)
        step_key = jax.random.fold_in(key, state.step)
        mu, num_scales = method.schedule(state.step)
        value, grads, per, aux = grad_fn(
            state.params, state.target_params, teacher_params, batch, step_key, state.step
        )
        grad_norm = optax.tree.norm(grads)
        rates = spec.ema_rates
        if spec.ema_warmup:
            rates = tuple(train_state.warmup_ema_rate(r, state.step) for r in rates)
        new_state = apply_gradients(state, grads, tx, target_ema=mu, ema_rates=rates)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        metrics = dict(
            loss=value,
            grad_norm=grad_norm,
            lr=lr_fn(state.step),
            num_scales=num_scales.astype(jnp.float32),
            target_ema=mu,
            finite=finite,
            # The noise axis, where the loss has one (not an autoencoder's).
            **(_quartile_losses(per, aux["sigma"], spec.grid) if "sigma" in aux else {}),
            # Loss-specific diagnostics (ECT's r, sCM's logvar and tangent norm), batch means.
            **{k: jnp.mean(v) for k, v in aux.items() if k not in ("sigma", "index")},
        )
        return new_state, metrics

    def steps(state, batches, teacher_params, distance, key):
        loss = functools.partial(method.loss, fns, distance)
        grad_fn = make_grad_fn(loss, spec.micro_batches, scan=scan, part_sharding=batches_sharding)
        body = lambda st, b: one(st, b, teacher_params, key, grad_fn)
        n = jax.tree.leaves(batches)[0].shape[0]
        state, metrics = loop(body, state, batches, scan=scan and n > 1)
        # Mean over the fused steps; finiteness must hold for every one of them.
        finite = jnp.all(metrics.pop("finite"))
        metrics = jax.tree.map(lambda v: jnp.mean(v, axis=0), metrics)
        return state, dict(metrics, finite=finite)

    rep = sharding.replicated(mesh)
    return jax.jit(
        steps,
        # The teacher keeps the sharding it was put with (None: no constraint).
        in_shardings=(state_shardings, batches_sharding, None, rep, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )


def step_spec(config) -> StepSpec:
    """The configured StepSpec."""
    t, o = config.training, config.optim
    return StepSpec(
        ema_rates=tuple(t.ema_rates),
        ema_warmup=t.ema_warmup,
        micro_batches=t.micro_batches,
        grid=methods.noise_grid(config),
        lr=o.lr,
        warmup_steps=o.warmup_steps,
    )


def loss_for(config, network, distance):
    """fn(params, target_params, teacher_params, batch, key, step) -> (per-example [B], metrics)
    of the configured method on the configured network."""
    fns = networks.model_fns(network, config)
    return functools.partial(methods.from_config(config).loss, fns, distance)


def train_step_for(config, network, tx, mesh, *, state_shardings=None):
    """make_train_step of the configured method, network and step settings."""
    if state_shardings is None:
        state_shardings = state_sharding(config, network, tx, mesh)
    return make_train_step(
        step_spec(config),
        methods.from_config(config),
        networks.model_fns(network, config),
        tx,
        mesh,
        state_shardings,
    )


def _create_fn(config, network, tx):
    """(key, teacher params or None, start params or None) -> a fresh TrainState (the student
    copies the teacher, or is `start`: training.init_checkpoint's network as it was saved)."""
    d, t = config.data, config.training
    x = jnp.zeros((1, d.image_size, d.image_size, d.num_channels), jnp.float32)
    y = jnp.zeros((1,), jnp.int32)
    with_target = methods.from_config(config).keeps_target
    num_ema = len(t.ema_rates)

    def create(key, teacher, start=None):
        if start is not None:
            return TrainState.create(start, tx, num_ema=num_ema, with_target=with_target)
        params = network.init(key, x, y) if teacher is None or network.guided else None
        if teacher is not None:
            params = networks.student_from_teacher(network, params, teacher)
        return TrainState.create(params, tx, num_ema=num_ema, with_target=with_target)

    return create


def abstract_state(config, network, tx, mesh) -> TrainState:
    """ShapeDtypeStructs of the TrainState with their shardings: restore templates, no memory."""
    shapes = jax.eval_shape(_create_fn(config, network, tx), jax.random.key(0), None)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        shapes,
        sharding.tree_sharding(mesh, shapes),
    )


def state_sharding(config, network, tx, mesh):
    """The TrainState's shardings: params, target, EMA and moments FSDP-sharded, the rest not."""
    return jax.tree.map(lambda a: a.sharding, abstract_state(config, network, tx, mesh))


def init_state(
    config, network, tx, mesh, teacher_params=None, *, start=None, shardings=None
) -> TrainState:
    """A fresh TrainState, sharded over the mesh (as state_sharding() unless given); the student
    copies the teacher if asked, or is `start` (params, target and EMA copies) when given."""
    teacher = teacher_params if config.training.init_from_teacher else None
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    # Init runs once: skip backend optimisation (on CPU it compiles several times faster).
    fast = {"xla_backend_optimization_level": 0}
    create = _create_fn(config, network, tx)
    out = state_sharding(config, network, tx, mesh) if shardings is None else shardings
    return jax.jit(create, out_shardings=out, compiler_options=fast)(key, teacher, start)


def loop(body, carry, xs, *, scan: bool):
    """lax.scan(body, carry, xs), or the same loop unrolled in Python."""
    if scan:
        return jax.lax.scan(body, carry, xs)
    outs = []
    for k in range(jax.tree.leaves(xs)[0].shape[0]):
        carry, out = body(carry, jax.tree.map(lambda v, k=k: v[k], xs))
        outs.append(out)
    return carry, jax.tree.map(lambda *v: jnp.stack(v), *outs)


def per_example_loss(loss):
    """The loss with example i's randomness drawn from fold_in(key, i), i its row in the batch.

    (params, target, teacher, batch [B], key, step, index [B]) -> (losses [B], aux of [B] leaves).
    Each example's noise then depends on (step, index) alone: the same for any number of
    devices, hosts or micro-batches. The loss runs once on the batch with the keys [B]: its
    draws (core/keys.py) give each example the bits it would draw alone, and its network runs
    on the whole batch (per example only where dropout draws masks: networks.Network.apply).
    """

    def fn(params, target_params, teacher_params, batch, key, step, index):
        example_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index)
        per, aux = loss(params, target_params, teacher_params, batch, example_keys, step)
        # A scalar metric (the same for every example) is given per example, as the others.
        per_row = lambda v: v if jnp.ndim(v) else jnp.broadcast_to(v, per.shape)
        return per, jax.tree.map(per_row, aux)

    return fn


def make_grad_fn(loss, micro_batches: int = 1, *, scan: bool = False, part_sharding=None):
    """(params, target, teacher, batch [B], key, step) -> (mean loss, grads, losses [B], aux).

    Gradient accumulation: the batch is processed in micro_batches sequential parts of
    b = B/micro_batches examples (part j: rows j, j + m, j + 2m, ..., so every device keeps its
    rows), and mean loss = (1/m) sum_j mean(part j) = the batch mean; with per-example
    randomness the accumulated gradient equals the full-batch one to float32 round-off.
    """
    per_example = per_example_loss(loss)

    def mean_loss(params, target, teacher, batch, index, key, step):
        per, aux = per_example(params, target, teacher, batch, key, step, index)
        return per.mean(), (per, aux)

    grad = jax.value_and_grad(mean_loss, has_aux=True)

    def fn(params, target_params, teacher_params, batch, key, step):
        size = jax.tree.leaves(batch)[0].shape[0]
        index = jnp.arange(size, dtype=jnp.uint32)
        if micro_batches == 1:
            (value, (per, aux)), grads = grad(
                params, target_params, teacher_params, batch, index, key, step
            )
            return value, grads, per, aux
        m = micro_batches
        parts = jax.tree.map(
            lambda v: jnp.swapaxes(v.reshape(size // m, m, *v.shape[1:]), 0, 1), (batch, index)
        )  # [m, B/m, ...]
        if part_sharding is not None:
            parts = jax.lax.with_sharding_constraint(parts, part_sharding)

        def body(acc, part):
            (value, (per, aux)), grads = grad(
                params, target_params, teacher_params, *part, key, step
            )
            return jax.tree.map(jnp.add, acc, (value, grads)), (per, aux)

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (total, grads), (per, aux) = loop(body, zero, parts, scan=scan)
        merge = lambda v: jnp.swapaxes(v, 0, 1).reshape(size, *v.shape[2:])
        grads = jax.tree.map(lambda g: g / m, grads)
        return total / m, grads, merge(per), jax.tree.map(merge, aux)

    return fn
