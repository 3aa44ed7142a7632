"""A small UNet for the embedded and test configs: residual blocks, attention, class embedding."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency.models.attention import dot_product_attention
from consistency.models.guidance import GuidanceProjection


def sinusoidal_embedding(c: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """[cos(c f_k), sin(c f_k)] with f_k = exp(-ln(max_period) k / (dim/2)), k < dim/2."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = c.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _groups(channels: int) -> int:
    return min(32, max(1, channels // 4))


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-dropout-conv, with a 1x1 skip when widths differ."""

    channels: int
    dropout: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train: bool):
        h = nn.silu(nn.GroupNorm(_groups(x.shape[-1]))(x.astype(jnp.float32)))
        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(h)
        h = h + nn.Dense(self.channels, dtype=self.dtype)(nn.silu(emb))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(_groups(self.channels))(h.astype(jnp.float32)))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1), dtype=self.dtype)(x)
        return x + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions with a residual connection."""

    num_heads: int = 1
    attention_impl: str | None = "plain"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = nn.GroupNorm(_groups(c))(x.astype(jnp.float32))
        qkv = nn.Dense(3 * c, dtype=self.dtype)(y).reshape(b, h * w, 3, self.num_heads, -1)
        out = dot_product_attention(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=self.attention_impl
        )
        out = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros)(
            out.reshape(b, h, w, c)
        )
        return x + out


class UNet(nn.Module):
    """UNet F(x, c_noise, y, w): sinusoidal noise embedding, optional class embedding added to it.

    guidance_embed_dim > 0 adds LCM's guidance-scale input: features of w projected onto the
    sinusoidal noise features (`guidance.GuidanceProjection`, param "guidance_proj"); 0 builds
    exactly the unguided network.
    """

    out_channels: int
    channels: int = 32
    channel_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    attn_resolutions: Sequence[int] = ()
    num_heads: int = 1
    dropout: float = 0.0
    num_classes: int = 0
    attention_impl: str | None = "plain"
    guidance_embed_dim: int = 0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, noise_cond, y=None, train: bool = False, guidance=None):
        emb_dim = 4 * self.channels
        emb = sinusoidal_embedding(noise_cond, self.channels)
        if (guidance is None) != (not self.guidance_embed_dim):
            raise ValueError("pass guidance w exactly when guidance_embed_dim > 0")
        if self.guidance_embed_dim:
            proj = GuidanceProjection(self.channels, self.guidance_embed_dim, name="guidance_proj")
            emb = emb + proj(guidance)
        emb = nn.Dense(emb_dim)(nn.silu(nn.Dense(emb_dim)(emb)))
        if self.num_classes:
            if y is None:
                raise ValueError("this UNet is class-conditional: pass labels y")
            emb = emb + nn.Embed(self.num_classes, emb_dim)(y)
        block = lambda ch: ResBlock(ch, self.dropout, self.dtype)
        attn = lambda: SelfAttention(self.num_heads, self.attention_impl, self.dtype)
        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(x.astype(self.dtype))
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = block(self.channels * mult)(h, emb, train)
                h = attn()(h) if h.shape[1] in self.attn_resolutions else h
                skips.append(h)
            if level < len(self.channel_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(h)
                skips.append(h)
        h = attn()(block(h.shape[-1])(h, emb, train))
        h = block(h.shape[-1])(h, emb, train)
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = block(self.channels * mult)(jnp.concatenate([h, skips.pop()], -1), emb, train)
                h = attn()(h) if h.shape[1] in self.attn_resolutions else h
            if level > 0:
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
                h = nn.Conv(c, (3, 3), dtype=self.dtype)(h)
        h = nn.silu(nn.GroupNorm(_groups(h.shape[-1]))(h.astype(jnp.float32)))
        out = nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros)(h)
        return out.astype(jnp.float32)
