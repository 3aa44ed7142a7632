"""Scaled dot-product attention: JAX's fused kernel where available, else a plain einsum."""

import jax
import jax.numpy as jnp


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = "plain"
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over [B, S, H, D] inputs; returns [B, S, H, D].

    implementation: "plain" (einsum, float32 softmax; differentiable in forward and reverse mode),
    or one of jax.nn.dot_product_attention's: None (let JAX pick, cuDNN flash attention on GPU
    where it applies), "xla", "cudnn".
    """
    if implementation == "plain":
        scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    if implementation not in (None, "xla", "cudnn"):
        raise ValueError(
            f"unknown attention implementation: {implementation!r}; "
            "choose one of 'plain', None, 'xla', 'cudnn'"
        )
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
