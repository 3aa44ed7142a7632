"""The one TrainState: step, online params, target params, EMA copies (one per rate), opt state."""

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
