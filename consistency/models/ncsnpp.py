"""NCSN++ (Song et al. 2021) as configured for CIFAR-10 in the Consistency Models JAX code."""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency.models.ncsnpp_layers import (
    AttnBlockpp,
    Downsample,
    GaussianFourierProjection,
    ResnetBlockBigGANpp,
    conv3x3,
    default_init,
    group_norm,
    positional_embedding,
)

EMBEDDING_TYPES = ("fourier", "positional")
PROGRESSIVE_INPUTS = ("none", "residual")


class NCSNpp(nn.Module):
    """F(x, noise_cond): the raw network output; it knows nothing of sigma or preconditioning.

    Defaults are the paper's CIFAR-10 model (56,395,651 parameters at 32x32x3). Submodule names
    follow flax's auto-naming (ResnetBlockBigGANpp_k, AttnBlockpp_k, Conv_0, ...), which is the
    parameter layout of the official jcm checkpoints.
    """

    nf: int = 128
    ch_mult: Sequence[int] = (2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.0
    fir: bool = True
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    progressive_input: str = "residual"  # "none" | "residual" (pyramid of the input, summed in)
    embedding_type: str = "fourier"  # "fourier" | "positional"
    fourier_scale: float = 16.0  # 16 in the paper, 0.02 for iCT
    attention_impl: str | None = "plain"  # see models.attention; "plain" supports jax.jvp
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

    def _time_embedding(self, noise_cond: jax.Array) -> jax.Array:
        """noise_cond[B] -> [B, 4 nf]: fixed features, then Dense-swish-Dense."""
        if self.embedding_type == "fourier":
            temb = GaussianFourierProjection(self.nf, self.fourier_scale)(noise_cond)
        elif self.embedding_type == "positional":
            temb = positional_embedding(noise_cond, self.nf)
        else:
            raise ValueError(
                f"unknown embedding_type: {self.embedding_type!r}; choose one of {EMBEDDING_TYPES}"
            )
        temb = nn.Dense(4 * self.nf, kernel_init=default_init(), dtype=self.dtype)(temb)
        return nn.Dense(4 * self.nf, kernel_init=default_init(), dtype=self.dtype)(nn.swish(temb))

    def _block(self, **kwargs) -> ResnetBlockBigGANpp:
        return ResnetBlockBigGANpp(
            dropout=self.dropout,
            fir=self.fir,
            fir_kernel=self.fir_kernel,
            skip_rescale=self.skip_rescale,
            init_scale=self.init_scale,
            dtype=self.dtype,
            **kwargs,
        )

    def _attn(self) -> AttnBlockpp:
        return AttnBlockpp(
            skip_rescale=self.skip_rescale,
            init_scale=self.init_scale,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
        )

    def _down_path(self, x: jax.Array, temb: jax.Array, train: bool) -> list:
        """Encoder; returns every activation the decoder concatenates back in, in order."""
        hs = [conv3x3(self.nf, dtype=self.dtype)(x)]
        pyramid = x
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = self._block(out_ch=self.nf * mult)(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = self._attn()(h)
                hs.append(h)
            if level == len(self.ch_mult) - 1:
                break
            h = self._block(down=True)(hs[-1], temb, train)
            if self.progressive_input == "residual":
                pyramid = Downsample(h.shape[-1], self.fir, self.fir_kernel, self.dtype)(pyramid)
                pyramid = (pyramid + h) / math.sqrt(2.0) if self.skip_rescale else pyramid + h
                h = pyramid
            hs.append(h)
        return hs

    def _up_path(self, h: jax.Array, hs: list, temb: jax.Array, train: bool) -> jax.Array:
        """Decoder: num_res_blocks + 1 blocks per level, each eating one encoder activation."""
        for level in reversed(range(len(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h_cat = jnp.concatenate([h, hs.pop()], axis=-1)
                h = self._block(out_ch=self.nf * self.ch_mult[level])(h_cat, temb, train)
            if h.shape[1] in self.attn_resolutions:
                h = self._attn()(h)
            if level != 0:
                h = self._block(up=True)(h, temb, train)
        assert not hs, f"{len(hs)} encoder activations left unused"
        return h

    @nn.compact
    def __call__(self, x: jax.Array, noise_cond: jax.Array, train: bool) -> jax.Array:
        """x[B,H,W,C] (NHWC), noise_cond[B] (e.g. 0.25 ln sigma) -> F[B,H,W,C] in float32.

        train=True enables dropout, which draws from the 'dropout' rng collection.
        """
        if self.progressive_input not in PROGRESSIVE_INPUTS:
            raise ValueError(
                f"unknown progressive_input: {self.progressive_input!r}; "
                f"choose one of {PROGRESSIVE_INPUTS}"
            )
        assert noise_cond.shape == x.shape[:1], (noise_cond.shape, x.shape)
        temb = self._time_embedding(noise_cond)
        hs = self._down_path(x.astype(self.dtype), temb, train)
        h = self._block()(hs[-1], temb, train)
        h = self._attn()(h)
        h = self._block()(h, temb, train)
        h = self._up_path(h, hs, temb, train)
        h = nn.swish(group_norm(h.shape[-1], self.dtype)(h))
        h = conv3x3(x.shape[-1], init_scale=self.init_scale, dtype=self.dtype)(h)
        return h.astype(jnp.float32)
