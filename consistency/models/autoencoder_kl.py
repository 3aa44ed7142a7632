"""The KL autoencoder of latent diffusion (diffusers' AutoencoderKL architecture), NHWC."""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from consistency.models.adm_layers import GroupNorm32, upsample_nearest
from consistency.models.attention import dot_product_attention

# diffusers' activation names (get_activation) for the resnets' `act_fn`; the encoder's and
# decoder's final activation is SiLU whatever act_fn says, as in diffusers.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "relu": nn.relu,
}
# Every GroupNorm of the VAE (resnets, attention, conv_norm_out) uses eps 1e-6, not 1e-5.
_EPS = 1e-6
_PAD1 = ((1, 1), (1, 1))
# The encoder's stride-2 conv pads right and bottom only (torch F.pad (0, 1, 0, 1)).
_PAD_DOWN = ((0, 1), (0, 1))
# logvar is clipped to this range before std = exp(logvar / 2).
LOGVAR_RANGE = (-30.0, 20.0)


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation: {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _conv(features: int, kernel: int, name: str, dtype: Any, **kw: Any) -> nn.Conv:
    pad = kw.pop("padding", _PAD1 if kernel == 3 else "VALID")
    return nn.Conv(features, (kernel, kernel), padding=pad, dtype=dtype, name=name, **kw)


@struct.dataclass
class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element, logvar clipped to [-30, 20]."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split [..., 2C] moments into mean (first C channels) and clipped logvar."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, noise: jax.Array) -> jax.Array:
        """z = mean + std * noise, noise ~ N(0, I) of the mean's shape."""
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) = 0.5 sum(mean^2 + var - 1 - logvar) per example, shape [B]."""
        per_elem = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        return 0.5 * jnp.sum(per_elem, axis=tuple(range(1, per_elem.ndim)))


class ResnetBlock(nn.Module):
    """x + conv2(act(GN(conv1(act(GN(x)))))), with a 1x1 conv_shortcut when widths differ."""

    out_channels: int
    groups: int
    act_fn: str = "silu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = _activation(self.act_fn)
        h = act(GroupNorm32(self.groups, _EPS, name="norm1")(x))
        h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
        h = act(GroupNorm32(self.groups, _EPS, name="norm2")(h))
        h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return x + h


class SpatialAttention(nn.Module):
    """x + to_out(softmax(q k^T / sqrt(C)) v), one head over the H*W positions of GN(x)."""

    groups: int
    attention_impl: str | None = "plain"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = GroupNorm32(self.groups, _EPS, name="group_norm")(x).reshape(b, hgt * wid, 1, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(h) for n in ("to_q", "to_k", "to_v"))
        h = dot_product_attention(q, k, v, implementation=self.attention_impl)
        h = nn.Dense(c, dtype=self.dtype, name="to_out_0")(h.reshape(b, hgt, wid, c))
        return x + h


class MidBlock(nn.Module):
    """resnet, attention (unless add_attention is False), resnet at constant width."""

    groups: int
    act_fn: str
    add_attention: bool = True
    dtype: Any = jnp.float32
    attention_impl: str | None = "plain"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, kw = x.shape[-1], dict(groups=self.groups, act_fn=self.act_fn, dtype=self.dtype)
        x = ResnetBlock(c, **kw, name="resnets_0")(x)
        if self.add_attention:
            attn = SpatialAttention(
                self.groups, self.attention_impl, self.dtype, name="attentions_0"
            )
            x = attn(x)
        return ResnetBlock(c, **kw, name="resnets_1")(x)


class Resample(nn.Module):
    """Stride-2 3x3 `conv` after right/bottom zero padding (down), or nearest x2 + `conv` (up)."""

    channels: int
    down: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.down:
            kw = dict(strides=(2, 2), padding=_PAD_DOWN)
            return _conv(self.channels, 3, "conv", self.dtype, **kw)(x)
        return _conv(self.channels, 3, "conv", self.dtype)(upsample_nearest(x))


class ResampleBlock(nn.Module):
    """num_layers resnets to out_channels, then one Resample unless it is the last level."""

    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    down: bool
    resample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(groups=self.groups, act_fn=self.act_fn, dtype=self.dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, **kw, name=f"resnets_{j}")(x)
        if self.resample:
            name = "downsamplers_0" if self.down else "upsamplers_0"
            x = Resample(self.out_channels, self.down, self.dtype, name=name)(x)
        return x


def _head(x: jax.Array, groups: int, out_channels: int, dtype: Any) -> jax.Array:
    """conv_out(SiLU(conv_norm_out(x))): SiLU here whatever the resnets' act_fn."""
    x = nn.silu(GroupNorm32(groups, _EPS, name="conv_norm_out")(x))
    return _conv(out_channels, 3, "conv_out", dtype)(x)


class _Coder(nn.Module):
    """The fields the encoder and the decoder share (diffusers' Encoder / Decoder arguments)."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32
    attention_impl: str | None = "plain"


class Encoder(_Coder):
    """conv_in, down levels (resnets + asymmetric stride-2 conv), mid block, conv head."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chans, kw = self.block_out_channels, dict(groups=self.norm_num_groups, act_fn=self.act_fn)
        x = _conv(chans[0], 3, "conv_in", self.dtype)(x)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            block = ResampleBlock(
                c,
                self.layers_per_block,
                **kw,
                down=True,
                resample=not last,
                dtype=self.dtype,
                name=f"down_blocks_{i}",
            )
            x = block(x)
        x = MidBlock(
            **kw,
            add_attention=self.mid_block_add_attention,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            name="mid_block",
        )(x)
        return _head(x, self.norm_num_groups, self.out_channels, self.dtype)


class Decoder(_Coder):
    """conv_in, mid block, up levels (layers_per_block + 1 resnets, nearest x2 + conv), head."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        chans = tuple(reversed(self.block_out_channels))
        kw = dict(groups=self.norm_num_groups, act_fn=self.act_fn)
        x = _conv(chans[0], 3, "conv_in", self.dtype)(z)
        x = MidBlock(
            **kw,
            add_attention=self.mid_block_add_attention,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            name="mid_block",
        )(x)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            block = ResampleBlock(
                c,
                self.layers_per_block + 1,
                **kw,
                down=False,
                resample=not last,
                dtype=self.dtype,
                name=f"up_blocks_{i}",
            )
            x = block(x)
        return _head(x, self.norm_num_groups, self.out_channels, self.dtype)


class AutoencoderKL(nn.Module):
    """x -> q(z|x) = N(mean, exp(logvar)) -> z -> x_hat, NHWC, float32 params and outputs.

    `dtype` is the compute dtype of convs and dense layers (GroupNorm and softmax run in float32);
    `attention_impl` picks the mid blocks' attention kernel (models.attention).
    latents = (z - shift_factor) * scaling_factor is what a latent diffusion model sees; with
    per-channel statistics (latents_mean, latents_std: one value per latent channel, as SDXL-style
    diffusers configs give them) latents = (z - mean) * scaling_factor / std instead, diffusers'
    convention (its pipelines decode latents * std / scaling_factor + mean).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    dtype: Any = jnp.float32
    attention_impl: str | None = "plain"

    def setup(self):
        arch = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            act_fn=self.act_fn,
            mid_block_add_attention=self.mid_block_add_attention,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
        )
        self.encoder = Encoder(2 * self.latent_channels, **arch)
        self.decoder = Decoder(self.out_channels, **arch)
        n = 2 * self.latent_channels
        self.quant_conv = _conv(n, 1, "quant_conv", self.dtype) if self.use_quant_conv else None
        self.post_quant_conv = (
            _conv(self.latent_channels, 1, "post_quant_conv", self.dtype)
            if self.use_post_quant_conv
            else None
        )

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """The posterior q(z|x) of images x [B, H, W, in_channels]; float32 moments."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        """Images [B, H, W, out_channels] (float32) of unscaled latents z."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        """decode(mode) of q(z|x), or decode(mean + std * noise) when noise is given."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if noise is None else posterior.sample(noise))

    def encode_latents(self, x: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        """Scaled latents of images: the mean, or a sample with the given noise."""
        posterior = self.encode(x)
        return self.scale_latents(posterior.mode() if noise is None else posterior.sample(noise))

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Images of scaled latents."""
        return self.decode(self.unscale_latents(latents))

    def _latent_statistics(self) -> tuple[Any, Any]:
        """(shift, scale) per latent channel (last axis) or as scalars."""
        if self.latents_mean is None and self.latents_std is None:
            return self.shift_factor, self.scaling_factor
        mean, std = (jnp.asarray(v, jnp.float32) for v in (self.latents_mean, self.latents_std))
        return mean, self.scaling_factor / std

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """latents = (z - shift_factor) * scaling_factor, or (z - mean) * scaling_factor / std."""
        shift, scale = self._latent_statistics()
        return (z - shift) * scale

    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        """z = latents / scaling_factor + shift_factor, or latents * std / scaling_factor + mean."""
        shift, scale = self._latent_statistics()
        return latents / scale + shift

    def downsampling_factor(self) -> int:
        """Image side / latent side: 2 per level but the last."""
        return 2 ** (len(self.block_out_channels) - 1)
