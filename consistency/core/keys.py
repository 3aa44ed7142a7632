"""Random draws from one key, or from keys [B] (one per example) as each example draws alone.

With one key each function is its jax.random namesake; with keys [B], row i is what the call
gives on a batch of one with key i (normal(keys, (B, ...))[i] = normal(keys[i], (1, ...))[0]),
so a loss can draw per example while its network runs on the batch (update.per_example_loss).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def is_batch(key: jax.Array) -> bool:
    """Whether `key` is a batch of keys: typed keys [B], or raw uint32 keys [B, 2]."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return jnp.ndim(key) > (0 if typed else 1)


def per_example(fn: Callable, key: jax.Array, *args):
    """fn(key, *args) with batch-first array args; with keys [B], fn(keys[i], *example i's args
    as a batch of one) for every i, stacked (jax.vmap). None args stay None."""
    if not is_batch(key):
        return fn(key, *args)

    def one(k, *example):
        out = fn(k, *jax.tree.map(lambda v: v[None], example))
        return jax.tree.map(lambda v: v[0], out)

    return jax.vmap(one)(key, *args)


def _draw(draw: Callable, key: jax.Array, shape) -> jax.Array:
    """draw(key, shape); with keys [B], draw(keys[i], (1, *shape[1:]))[0] for every i."""
    shape = tuple(shape)
    if not is_batch(key):
        return draw(key, shape)
    if not shape or shape[0] != key.shape[0]:
        raise ValueError(f"{key.shape[0]} keys (one per example) draw shape (B, ...); got {shape}")
    return jax.vmap(lambda k: draw(k, (1, *shape[1:]))[0])(key)


def split(key: jax.Array, num: int = 2) -> jax.Array:
    """[num] keys, or for keys [B] their [num, B] splits (so a, b = split(key) still unpacks)."""
    if not is_batch(key):
        return jax.random.split(key, num)
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num))(key), 0, 1)


def fold_in(key: jax.Array, data) -> jax.Array:
    """jax.random.fold_in of the key, or of each of the keys [B] (the same `data` for all)."""
    if not is_batch(key):
        return jax.random.fold_in(key, data)
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)


def normal(key: jax.Array, shape, dtype=float) -> jax.Array:
    return _draw(lambda k, s: jax.random.normal(k, s, dtype), key, shape)


def uniform(key: jax.Array, shape, dtype=float, minval=0.0, maxval=1.0) -> jax.Array:
    return _draw(lambda k, s: jax.random.uniform(k, s, dtype, minval, maxval), key, shape)


def randint(key: jax.Array, shape, minval, maxval, dtype=int) -> jax.Array:
    return _draw(lambda k, s: jax.random.randint(k, s, minval, maxval, dtype), key, shape)


def bernoulli(key: jax.Array, p, shape) -> jax.Array:
    return _draw(lambda k, s: jax.random.bernoulli(k, p, s), key, shape)
