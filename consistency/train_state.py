"""The one TrainState (step, params, target, EMA copies, opt state), its update and gradient."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
    """Everything a resumed run needs; teachers are never part of it.

    target_params is None for losses without a target network (EDM); ema_params holds one copy
    per configured EMA rate, in the config's order.
    """

    step: jax.Array
    params: Any
    target_params: Any
    ema_params: tuple
    opt_state: Any

    @classmethod
    def create(
        cls, params, tx: optax.GradientTransformation, *, num_ema: int, with_target: bool
    ) -> "TrainState":
        """Fresh state: target and every EMA copy start equal to the online params."""
        copy = lambda: jax.tree.map(jnp.array, params)  # noqa: E731
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            target_params=copy() if with_target else None,
            ema_params=tuple(copy() for _ in range(num_ema)),
            opt_state=tx.init(params),
        )


def ema(old, new, rate: jax.Array | float):
    """rate * old + (1 - rate) * new, leaf by leaf."""
    return jax.tree.map(lambda o, n: rate * o + (1.0 - rate) * n, old, new)


def warmup_ema_rate(rate: float, step: jax.Array) -> jax.Array:
    """min(rate, (1 + k)/(10 + k)) at step k: the EMA's early average forgets the init quickly."""
    k = jnp.asarray(step, jnp.float32)
    return jnp.minimum(rate, (1.0 + k) / (10.0 + k))


def apply_gradients(
    state: TrainState,
    grads,
    tx: optax.GradientTransformation,
    *,
    target_ema: jax.Array | float,
    ema_rates: Sequence[float],
) -> TrainState:
    """One optimiser step, then theta- <- mu theta- + (1 - mu) theta and every EMA copy.

    mu (target_ema) is the curriculum value at the pre-increment step, as the references use it
    for both the loss and the target update.
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    target = None if state.target_params is None else ema(state.target_params, params, target_ema)
    emas = tuple(ema(e, params, r) for e, r in zip(state.ema_params, ema_rates, strict=True))
    return state.replace(
        step=state.step + 1, params=params, target_params=target, ema_params=emas,
        opt_state=opt_state,
    )  # fmt: skip


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
    devices, hosts or micro-batches.
    """

    def fn(params, target_params, teacher_params, batch, key, step, index):
        def one(example, i):
            single = jax.tree.map(lambda v: v[None], example)
            k = jax.random.fold_in(key, i)
            per, aux = loss(params, target_params, teacher_params, single, k, step)
            return per[0], jax.tree.map(lambda v: v[0] if jnp.ndim(v) else v, aux)

        return jax.vmap(one)(batch, index)

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
        merge = lambda v: jnp.swapaxes(v, 0, 1).reshape(size, *v.shape[2:])  # noqa: E731
        grads = jax.tree.map(lambda g: g / m, grads)
        return total / m, grads, merge(per), jax.tree.map(merge, aux)

    return fn
