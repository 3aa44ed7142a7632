"""NCSN++ building blocks: FIR resampling, time embeddings, NIN, DDPM attention, BigGAN blocks."""

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from consistency.models.attention import dot_product_attention

_NHWC = ("NHWC", "HWIO", "NHWC")


def default_init(scale: float = 1.0) -> Callable:
    """Variance scaling (fan_avg, uniform); scale 0 means 1e-10, so zero-init layers still train."""
    return nn.initializers.variance_scaling(scale if scale != 0 else 1e-10, "fan_avg", "uniform")


def group_norm(channels: int, dtype: jnp.dtype) -> nn.GroupNorm:
    """GroupNorm, min(C // 4, 32) groups, epsilon 1e-6 (flax's default, which jcm relies on)."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), epsilon=1e-6, dtype=dtype)


def conv3x3(out_ch: int, *, init_scale: float = 1.0, stride: int = 1, dtype=jnp.float32) -> nn.Conv:
    """3x3 'SAME' conv with bias, variance-scaling init."""
    return nn.Conv(
        out_ch,
        (3, 3),
        strides=(stride, stride),
        padding="SAME",
        dtype=dtype,
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
    )


def conv1x1(out_ch: int, *, dtype=jnp.float32) -> nn.Conv:
    """1x1 conv with bias, variance-scaling init."""
    return nn.Conv(
        out_ch,
        (1, 1),
        padding="SAME",
        dtype=dtype,
        kernel_init=default_init(),
        bias_init=nn.initializers.zeros,
    )


def _fir_2d(kernel: Sequence[int], gain: float = 1.0) -> np.ndarray:
    """Separable FIR k k^T / sum, times gain, flipped so that cross-correlation is convolution."""
    k = np.asarray(kernel, np.float32)
    k = np.outer(k, k)
    return (k / k.sum() * gain)[::-1, ::-1]


def _depthwise(x: jax.Array, k2d: np.ndarray, *, pad: tuple, stride: int = 1, dilate: int = 1):
    """The same 2-D filter applied to every channel (a grouped conv, so jvp and grad work)."""
    c = x.shape[-1]
    w = jnp.broadcast_to(jnp.asarray(k2d, x.dtype)[:, :, None, None], (*k2d.shape, 1, c))
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=(stride, stride),
        padding=(pad, pad),
        lhs_dilation=(dilate, dilate),
        dimension_numbers=_NHWC,
        feature_group_count=c,
    )


def fir_downsample(x: jax.Array, kernel: Sequence[int]) -> jax.Array:
    """x[B,H,W,C] -> [B,H/2,W/2,C]: FIR low-pass, keep every second pixel (StyleGAN2 upfirdn)."""
    p = len(kernel) - 2
    return _depthwise(x, _fir_2d(kernel), pad=((p + 1) // 2, p // 2), stride=2)


def fir_upsample(x: jax.Array, kernel: Sequence[int]) -> jax.Array:
    """x[B,H,W,C] -> [B,2H,2W,C]: zero insertion, then FIR with gain 4 (StyleGAN2 upfirdn)."""
    p = len(kernel) - 2
    # lhs_dilation omits the trailing inserted zero of upfirdn's zero insertion, so pad one more.
    pad = ((p + 1) // 2 + 1, p // 2 + 1)
    return _depthwise(x, _fir_2d(kernel, gain=4.0), pad=pad, dilate=2)


def naive_downsample(x: jax.Array) -> jax.Array:
    """2x2 mean pooling."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def naive_upsample(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Conv2d(nn.Module):
    """FIR low-pass, then a 3x3 conv with stride 2 (StyleGAN2 conv_downsample_2d)."""

    out_ch: int
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", default_init(), (3, 3, x.shape[-1], self.out_ch))
        b = self.param("bias", nn.initializers.zeros, (self.out_ch,))
        p = len(self.fir_kernel) - 2 + 2  # FIR taps minus the factor, plus conv size minus 1
        x = _depthwise(x, _fir_2d(self.fir_kernel), pad=((p + 1) // 2, p // 2))
        x = lax.conv_general_dilated(
            x, w.astype(self.dtype), (2, 2), "VALID", dimension_numbers=_NHWC
        )
        return x + b.astype(self.dtype)


class Downsample(nn.Module):
    """Learned 2x downsampling of the input pyramid: FIR conv (fir) or a stride-2 3x3 conv."""

    out_ch: int
    fir: bool = True
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.fir:
            return Conv2d(self.out_ch, self.fir_kernel, dtype=self.dtype)(x)
        return conv3x3(self.out_ch, stride=2, dtype=self.dtype)(x)


class GaussianFourierProjection(nn.Module):
    """[sin(2 pi W t), cos(2 pi W t)] with W ~ N(0, scale^2) stored in params but never trained."""

    embedding_size: int
    scale: float

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
        w = lax.stop_gradient(w)
        # float32 always: W*t reaches ~200 rad, where bf16 would scramble the phases.
        proj = t.astype(jnp.float32)[:, None] * w[None, :] * 2 * jnp.pi
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def positional_embedding(t: jax.Array, dim: int, max_positions: int = 10000) -> jax.Array:
    """[sin(t f_k), cos(t f_k)], f_k = max_positions^(-k/(dim/2-1)) (the DDPM/NCSN++ variant)."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(max_positions) / (half - 1)))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class NIN(nn.Module):
    """Per-pixel linear map x W + b over the channel axis (a 1x1 conv stored as W[in, out], b)."""

    num_units: int
    init_scale: float = 0.1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("W", default_init(self.init_scale), (x.shape[-1], self.num_units))
        b = self.param("b", nn.initializers.zeros, (self.num_units,))
        return jnp.einsum("...i,ij->...j", x, w.astype(self.dtype)) + b.astype(self.dtype)


class AttnBlockpp(nn.Module):
    """DDPM self-attention over all pixels, one head of width C, residual (optionally / sqrt 2)."""

    skip_rescale: bool = True
    init_scale: float = 0.0
    attention_impl: str | None = "plain"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = group_norm(c, self.dtype)(x)
        q, k, v = (NIN(c, dtype=self.dtype)(y).reshape(b, h * w, 1, c) for _ in range(3))
        y = dot_product_attention(q, k, v, implementation=self.attention_impl)
        y = NIN(c, init_scale=self.init_scale, dtype=self.dtype)(y.reshape(b, h, w, c))
        return (x + y) / math.sqrt(2.0) if self.skip_rescale else x + y


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN residual block with time bias, dropout, optional FIR up/down inside, 1x1 skip conv."""

    out_ch: int | None = None
    up: bool = False
    down: bool = False
    dropout: float = 0.0
    fir: bool = True
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: jnp.dtype = jnp.float32

    def _resample(self, x: jax.Array) -> jax.Array:
        if self.up:
            return fir_upsample(x, self.fir_kernel) if self.fir else naive_upsample(x)
        if self.down:
            return fir_downsample(x, self.fir_kernel) if self.fir else naive_downsample(x)
        return x

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None, train: bool) -> jax.Array:
        in_ch = x.shape[-1]
        out_ch = self.out_ch or in_ch
        h = nn.swish(group_norm(in_ch, self.dtype)(x))
        h, x = self._resample(h), self._resample(x)
        h = conv3x3(out_ch, dtype=self.dtype)(h)
        if temb is not None:
            dense = nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype)
            h = h + dense(nn.swish(temb))[:, None, None, :]
        h = nn.swish(group_norm(out_ch, self.dtype)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(out_ch, init_scale=self.init_scale, dtype=self.dtype)(h)
        if in_ch != out_ch or self.up or self.down:
            x = conv1x1(out_ch, dtype=self.dtype)(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h
