"""The TrainState (params, target, EMA copies, optimiser state), its update, and the optimiser."""

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
        copy = lambda: jax.tree.map(jnp.array, params)
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
        step=state.step + 1,
        params=params,
        target_params=target,
        ema_params=emas,
        opt_state=opt_state,
    )


OPTIMIZERS = ("radam", "adam")


def learning_rate_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
    """Constant lr, reached linearly from 0 over warmup_steps when warmup_steps > 0."""
    if warmup_steps > 0:
        return optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.constant_schedule(lr)


def make_optimizer(
    name: str,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    grad_clip: float = 0.0,
) -> optax.GradientTransformation:
    """RAdam (the CM runs) or Adam (the EDM teacher), decoupled weight decay, optional clipping.

    The references' CM runs use RAdam(0.9, 0.999, 1e-8) with a constant learning rate and no
    warm-up or clipping; those stay off unless configured.
    """
    if name == "radam":
        scale = optax.scale_by_radam(b1=beta1, b2=beta2, eps=eps)
    elif name == "adam":
        scale = optax.scale_by_adam(b1=beta1, b2=beta2, eps=eps)
    else:
        raise ValueError(f"unknown optimizer: {name!r}; choose one of {OPTIMIZERS}")
    chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    chain.append(scale)
    if weight_decay > 0:
        chain.append(optax.add_decayed_weights(weight_decay))
    chain.append(optax.scale_by_learning_rate(learning_rate_schedule(lr, warmup_steps)))
    return optax.chain(*chain)


def optimizer(config):
    """The configured optax optimiser."""
    o = config.optim
    return make_optimizer(
        o.optimizer,
        lr=o.lr,
        beta1=o.beta1,
        beta2=o.beta2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps,
        grad_clip=o.grad_clip,
    )


def learning_rate(config):
    """step -> learning rate of the configured optimiser."""
    return learning_rate_schedule(config.optim.lr, config.optim.warmup_steps)
