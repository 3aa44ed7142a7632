"""ADM UNet blocks: timestep embedding, GroupNorm32, ResBlock, attention, resampling."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency.models.attention import dot_product_attention

# 3x3 convs pad 1 on every side (torch padding=1); Flax "SAME" pads stride-2 convs asymmetrically.
_PAD1 = ((1, 1), (1, 1))


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """[cos(t f_k), sin(t f_k)] with f_k = exp(-ln(max_period) k / half), k < half = dim // 2.

    t is whatever conditioning value the caller passes (cm uses 250 ln sigma); computed in float32,
    zero-padded by one column when dim is odd.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm32(nn.Module):
    """(x - mean_g) / sqrt(var_g + eps) * scale + bias over 32 channel groups, in float32.

    Written out rather than nn.GroupNorm so the params sit directly under the module's name
    (scale, bias) and the two-pass variance matches torch; returned in the input's dtype.
    """

    num_groups: int = 32
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"{c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xg = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = (*range(1, xg.ndim - 2), xg.ndim - 1)
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (y * scale + bias).astype(x.dtype)


def _conv(features: int, kernel: int, name: str, dtype: Any, zero: bool = False, **kw) -> nn.Conv:
    """Conv with torch's symmetric padding; `zero` mirrors cm's zero_module init."""
    init = nn.initializers.zeros if zero else nn.linear.default_kernel_init
    pad = _PAD1 if kernel == 3 else "VALID"
    return nn.Conv(
        features, (kernel, kernel), padding=pad, dtype=dtype, kernel_init=init, name=name, **kw
    )


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling of an NHWC map."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2 of an NHWC map."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`) when use_conv, else 2x2 average pooling."""

    channels: int
    use_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return _conv(self.channels, 3, "op", self.dtype, strides=(2, 2))(x)
        return downsample_avg(x)


class Upsample(nn.Module):
    """Nearest x2 upsampling, then a 3x3 conv (`conv`) when use_conv."""

    channels: int
    use_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest(x)
        return _conv(self.channels, 3, "conv", self.dtype)(x) if self.use_conv else x


class ResBlock(nn.Module):
    """ADM residual block: GN-SiLU-(resample)-conv, + embedding (add or FiLM), GN-SiLU-drop-conv.

    Submodule names follow cm's state dict (in_layers.0 -> in_layers_0, ...).
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        h = nn.silu(GroupNorm32(name="in_layers_0")(x))
        # resblock_updown resamples after GN+SiLU and on the skip path, before in_layers.2
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = downsample_avg(h), downsample_avg(x)
        h = _conv(self.out_channels, 3, "in_layers_2", self.dtype)(h)
        # cm keeps the embedding Linear in float32 under fp16 and casts its output to h's dtype
        n_emb = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = nn.Dense(n_emb, name="emb_layers_1")(nn.silu(emb)).astype(h.dtype)
        emb_out = emb_out[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = GroupNorm32(name="out_layers_0")(h) * (1 + scale) + shift
        else:
            h = GroupNorm32(name="out_layers_0")(h + emb_out)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = _conv(self.out_channels, 3, "out_layers_3", self.dtype, zero=True)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "skip_connection", self.dtype)(x)
        return x + h


class AttentionBlock(nn.Module):
    """x + proj_out(attention(qkv(GN(x)))) over the H*W positions, qkv in the flash layout.

    The qkv output channel is c = three*(heads*D) + head*D + d (q/k/v outermost), and the
    attention output channel is head*D + d, as in the released cm checkpoints.
    """

    num_heads: int
    attention_impl: str | None = "plain"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"{c} channels do not split into {self.num_heads} heads")
        d = c // self.num_heads
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(GroupNorm32(name="norm")(x))
        qkv = qkv.reshape(b, hgt * wid, 3, self.num_heads, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        h = dot_product_attention(q, k, v, implementation=self.attention_impl)
        h = h.reshape(b, hgt, wid, c)
        zeros = nn.initializers.zeros
        return x + nn.Dense(c, dtype=self.dtype, kernel_init=zeros, name="proj_out")(h)
