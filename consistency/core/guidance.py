"""Classifier-free guidance: label dropout to a null class in training, guided combinations."""

import jax
import jax.numpy as jnp

from consistency.core import keys
from consistency.core.parameterization import broadcast_to


def drop_labels(y: jax.Array, key: jax.Array, *, rate: float, null_class: int) -> jax.Array:
    """y_i -> null_class with probability rate, independently per example (CFG teachers)."""
    drop = keys.bernoulli(key, rate, jnp.shape(y))
    return jnp.where(drop, jnp.asarray(null_class, jnp.asarray(y).dtype), y)


def guided_lcm(cond: jax.Array, uncond: jax.Array, *, w: jax.Array) -> jax.Array:
    """LCM's guidance: cond + w (cond - uncond) = uncond + (1 + w)(cond - uncond).

    Applied to both x0 and eps before the teacher step (train_lcm_distill_sd_wds.py); w is [B]
    or a scalar, and w = 0 is the conditional teacher.
    """
    return cond + broadcast_to(jnp.asarray(w, jnp.float32), cond) * (cond - uncond)


def guided_standard(cond: jax.Array, uncond: jax.Array, *, scale: jax.Array) -> jax.Array:
    """Imagen / Stable Diffusion guidance: uncond + scale (cond - uncond); scale = 1 + LCM's w."""
    return uncond + broadcast_to(jnp.asarray(scale, jnp.float32), cond) * (cond - uncond)
