"""Per-example distances d(x, y) -> [B]: l1, l2 (per-sample means), l2 norm, pseudo-Huber."""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

DISTANCES = ("l1", "l2", "l2_norm", "pseudo_huber")


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


def l1(x: jax.Array, y: jax.Array) -> jax.Array:
    """mean |x - y| over all but the batch axis."""
    return jnp.mean(jnp.abs(_flat(x) - _flat(y)), axis=1)


def l2(x: jax.Array, y: jax.Array) -> jax.Array:
    """mean (x - y)^2 over all but the batch axis (the official code's 'l2': a per-sample mean)."""
    return jnp.mean((_flat(x) - _flat(y)) ** 2, axis=1)


def _safe_sqrt(v: jax.Array) -> jax.Array:
    """sqrt(v), v >= 0, with gradient 0 at v = 0 (jnp.sqrt's is inf there: NaN after 0 * inf)."""
    positive = v > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, v, 1.0)), 0.0)


def l2_norm(x: jax.Array, y: jax.Array) -> jax.Array:
    """||x - y||_2 over all but the batch axis (jcm's continuous-time 'l2': a norm, not squared).

    Its gradient at x = y is 0 (a subgradient), not NaN: a perfectly consistent example must not
    stop the run.
    """
    return _safe_sqrt(jnp.sum((_flat(x) - _flat(y)) ** 2, axis=1))


def pseudo_huber(x: jax.Array, y: jax.Array, *, c: float) -> jax.Array:
    """sqrt(||x - y||^2 + c^2) - c (iCT); the squared norm sums all but the batch axis.

    c = 0 is the l2 norm (ECT's CIFAR-10 setting), with the same gradient 0 at x = y.
    """
    return _safe_sqrt(jnp.sum((_flat(x) - _flat(y)) ** 2, axis=1) + c**2) - c


def ict_pseudo_huber_c(data_dim: int) -> float:
    """c = 0.00054 sqrt(d), iCT's constant for data of dimension d."""
    return 0.00054 * math.sqrt(data_dim)


def get_distance(
    name: str, *, data_dim: int | None = None, huber_c: float | None = None
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The distance by name; pseudo_huber takes c, or iCT's 0.00054 sqrt(d) when c is None.

    LPIPS is not built here: it is a network, made by the models and passed in as a callable
    with this same signature.
    """
    if name == "l1":
        return l1
    if name == "l2":
        return l2
    if name == "l2_norm":
        return l2_norm
    if name == "pseudo_huber":
        if huber_c is None:
            if data_dim is None:
                raise ValueError("pseudo_huber needs huber_c or data_dim (for c = 0.00054 sqrt(d))")
            huber_c = ict_pseudo_huber_c(data_dim)
        return lambda x, y: pseudo_huber(x, y, c=huber_c)
    raise ValueError(f"unknown distance: {name!r}; choose one of {DISTANCES + ('lpips',)}")
