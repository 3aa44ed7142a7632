"""Guidance-scale conditioning (LCM): sinusoidal features of w, projected into the time features."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def guidance_frequencies(dim: int) -> jax.Array:
    """f_k = exp(-k ln(1e4)/(half - 1)) for k < half = dim // 2, float32 (ln(1e4) in float32)."""
    half = dim // 2
    return jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(jnp.log(jnp.float32(1e4)) / (half - 1)))


def guidance_scale_embedding(w: jax.Array, dim: int = 256) -> jax.Array:
    """[sin(1000 w f_k), cos(1000 w f_k)], f_k = exp(-k ln(1e4)/(half - 1)), k < half = dim // 2.

    LCM's get_guidance_scale_embedding (from VDM): note half - 1, sin before cos (unlike the
    timestep embeddings here) and a zero column when dim is odd; float32 throughout.
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 1:
        raise ValueError(f"w must be [B], got shape {w.shape}")
    args = (w * 1000.0)[:, None] * guidance_frequencies(dim)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GuidanceProjection(nn.Module):
    """cond_proj(emb(w)): a bias-free Dense from the w features to the time features' width.

    Added to the sinusoidal time features before the time MLP, as LCM's UNet does with
    time_cond_proj_dim. Zero-initialised (LCM's is random), so a student initialised from its
    teacher starts as the teacher at every w.
    """

    features: int
    embed_dim: int = 256

    @nn.compact
    def __call__(self, w: jax.Array) -> jax.Array:
        proj = nn.Dense(self.features, use_bias=False, kernel_init=nn.initializers.zeros)
        return proj(guidance_scale_embedding(w, self.embed_dim))
