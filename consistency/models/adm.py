"""The ADM UNet of the paper's ImageNet-64 / LSUN-256 code (cm/unet.py), sigma-agnostic, NHWC."""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency.models.adm_layers import (
    AttentionBlock,
    Downsample,
    GroupNorm32,
    ResBlock,
    Upsample,
    timestep_embedding,
)
from consistency.models.guidance import GuidanceProjection

# create_model's class count for class_cond=True (ImageNet).
NUM_CLASSES = 1000
# create_model's channel_mult when the argument is "" (by image size).
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
# create_model arguments that shape the network, and those that may be given but change no values.
_REQUIRED_ARGS = (
    "image_size",
    "num_channels",
    "num_res_blocks",
    "attention_resolutions",
    "channel_mult",
    "class_cond",
    "num_heads",
    "num_head_channels",
    "use_scale_shift_norm",
    "resblock_updown",
)
_OPTIONAL_ARGS = (
    "learn_sigma",
    "dropout",
    "num_heads_upsample",
    "use_checkpoint",
    "use_fp16",
    "use_new_attention_order",
)


class ADMUNet(nn.Module):
    """ADM UNet F(x, c_noise, y): the network knows nothing of sigma, only of `noise_cond`.

    attention_resolutions are downsample factors (1 = full resolution); use `attention_ds` to
    convert cm's feature-map sizes. Parameter names mirror cm's state dict with '.' -> '_' at the
    block level (input_blocks.3.1.qkv -> input_blocks_3_1/qkv), so `consistency.convert.cm_pt`
    maps checkpoints one-to-one. Params are float32; `dtype` is the compute dtype of the blocks
    (GroupNorm, the time/label embeddings and the output head stay float32).
    guidance_embed_dim > 0 adds LCM's guidance-scale input w (diffusers' time_cond_proj_dim):
    its features, projected by "guidance_proj", are added to the sinusoidal time features
    before time_embed_0; 0 (the default) builds exactly cm's network.
    """

    model_channels: int
    out_channels: int = 3
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = ()
    channel_mult: tuple[float, ...] = (1, 2, 4, 8)
    dropout: float = 0.0
    dropout_min_ds: int = 1  # dropout only in blocks at downsample factor >= this (iCT, sCM)
    conv_resample: bool = True
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = "plain"
    guidance_embed_dim: int = 0

    def _heads(self, channels: int, upsample: bool) -> int:
        """Heads of an attention block: channels // num_head_channels when that is set."""
        if self.num_head_channels != -1:
            if channels % self.num_head_channels:
                raise ValueError(f"{channels} channels not divisible by {self.num_head_channels}")
            return channels // self.num_head_channels
        if upsample and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return self.num_heads

    def _attn(self, ch: int, name: str, upsample: bool = False) -> AttentionBlock:
        heads = self._heads(ch, upsample)
        return AttentionBlock(
            heads, attention_impl=self.attention_impl, dtype=self.dtype, name=name
        )

    def _res(
        self, out_ch: int, name: str, ds: int, up: bool = False, down: bool = False
    ) -> ResBlock:
        return ResBlock(
            out_ch,
            dropout=self.dropout if ds >= self.dropout_min_ds else 0.0,
            use_scale_shift_norm=self.use_scale_shift_norm,
            up=up,
            down=down,
            dtype=self.dtype,
            name=name,
        )

    def _embed(
        self, noise_cond: jax.Array, y: jax.Array | None, guidance: jax.Array | None
    ) -> jax.Array:
        """emb = MLP(sinusoid(noise_cond) [+ proj(emb(w))]) [+ label_emb(y)], float32."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass labels y exactly when the model is class-conditional")
        if (guidance is None) != (not self.guidance_embed_dim):
            raise ValueError("pass guidance w exactly when guidance_embed_dim > 0")
        ted = 4 * self.model_channels
        emb = timestep_embedding(noise_cond, self.model_channels)
        if self.guidance_embed_dim:
            proj = GuidanceProjection(
                self.model_channels, self.guidance_embed_dim, name="guidance_proj"
            )
            emb = emb + proj(guidance)
        emb = nn.Dense(ted, name="time_embed_0")(emb)
        emb = nn.Dense(ted, name="time_embed_2")(nn.silu(emb))
        if self.num_classes is not None:
            emb = emb + nn.Embed(self.num_classes, ted, name="label_emb")(y)
        return emb

    def _down(self, h: jax.Array, emb: jax.Array, train: bool) -> tuple[jax.Array, list]:
        """Input blocks; returns the last map and every block's output for the skips."""
        ch = int(self.channel_mult[0] * self.model_channels)
        h = nn.Conv(
            ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="input_blocks_0_0"
        )(h)
        hs, i, ds = [h], 1, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = self._res(int(mult * self.model_channels), f"input_blocks_{i}_0", ds)(
                    h, emb, train
                )
                if ds in self.attention_resolutions:
                    h = self._attn(h.shape[-1], f"input_blocks_{i}_1")(h)
                hs.append(h)
                i += 1
            if level != len(self.channel_mult) - 1:
                name, ch = f"input_blocks_{i}_0", h.shape[-1]
                if self.resblock_updown:
                    h = self._res(ch, name, ds, down=True)(h, emb, train)
                else:
                    h = Downsample(ch, self.conv_resample, dtype=self.dtype, name=name)(h)
                hs.append(h)
                i, ds = i + 1, ds * 2
        return h, hs

    def _up(self, h: jax.Array, hs: list, emb: jax.Array, train: bool) -> jax.Array:
        """Output blocks: concat skip, ResBlock, optional attention, optional upsampling."""
        i, ds = 0, 2 ** (len(self.channel_mult) - 1)
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = self._res(int(mult * self.model_channels), f"output_blocks_{i}_0", ds)(
                    h, emb, train
                )
                k = 1
                if ds in self.attention_resolutions:
                    h = self._attn(h.shape[-1], f"output_blocks_{i}_1", upsample=True)(h)
                    k = 2
                if level and j == self.num_res_blocks:
                    name, ch = f"output_blocks_{i}_{k}", h.shape[-1]
                    if self.resblock_updown:
                        h = self._res(ch, name, ds, up=True)(h, emb, train)
                    else:
                        h = Upsample(ch, self.conv_resample, dtype=self.dtype, name=name)(h)
                    ds //= 2
                i += 1
        return h

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        noise_cond: jax.Array,
        y: jax.Array | None = None,
        train: bool = False,
        guidance: jax.Array | None = None,
    ) -> jax.Array:
        """F(x [B,H,W,C], noise_cond [B], y [B] or None, w [B] or None) -> [B,H,W,out] float32."""
        emb = self._embed(noise_cond, y, guidance)
        h, hs = self._down(x.astype(self.dtype), emb, train)
        ch, ds = h.shape[-1], 2 ** (len(self.channel_mult) - 1)
        h = self._res(ch, "middle_block_0", ds)(h, emb, train)
        h = self._attn(ch, "middle_block_1")(h)
        h = self._res(ch, "middle_block_2", ds)(h, emb, train)
        h = self._up(h, hs, emb, train).astype(jnp.float32)
        h = nn.silu(GroupNorm32(name="out_0")(h))
        zeros = nn.initializers.zeros
        out = nn.Conv(
            self.out_channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=zeros, name="out_2"
        )
        return out(h)


def attention_ds(image_size: int, attention_resolutions: str | Sequence[int]) -> tuple[int, ...]:
    """ds = image_size // res for each attention feature-map size res (create_model's rule)."""
    if isinstance(attention_resolutions, str):
        attention_resolutions = [int(r) for r in attention_resolutions.split(",") if r.strip()]
    return tuple(image_size // int(r) for r in attention_resolutions)


def default_channel_mult(image_size: int, channel_mult: str | Sequence[float] = "") -> tuple:
    """create_model's channel_mult: parsed from "1,2,3,4", or the per-image-size default for ""."""
    if isinstance(channel_mult, str):
        if channel_mult:
            return tuple(int(m) for m in channel_mult.split(","))
        if image_size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image_size {image_size}; "
                f"choose one of {sorted(_DEFAULT_CHANNEL_MULT)} or pass channel_mult"
            )
        return _DEFAULT_CHANNEL_MULT[image_size]
    return tuple(channel_mult)


def adm_from_create_model_args(args: Mapping[str, Any], **overrides: Any) -> ADMUNet:
    """ADMUNet for cm's create_model(**args) (image_size, num_channels, class_cond, ...).

    Every argument that shapes the network is required (a missing or unknown one is an error).
    use_fp16 and use_checkpoint change no values (pass dtype=... / remat yourself);
    use_new_attention_order only concerns the non-flash attention the released models did not use.
    `overrides` set ADMUNet fields directly (dtype, attention_impl, dropout, ...).
    """
    missing = [k for k in _REQUIRED_ARGS if k not in args]
    unknown = [k for k in args if k not in _REQUIRED_ARGS + _OPTIONAL_ARGS]
    if missing or unknown:
        raise ValueError(f"create_model args: missing {missing}, unknown {unknown}")
    size = int(args["image_size"])
    fields = dict(
        model_channels=int(args["num_channels"]),
        out_channels=6 if args.get("learn_sigma", False) else 3,
        num_res_blocks=int(args["num_res_blocks"]),
        attention_resolutions=attention_ds(size, args["attention_resolutions"]),
        channel_mult=default_channel_mult(size, args["channel_mult"]),
        dropout=float(args.get("dropout", 0.0)),
        num_classes=NUM_CLASSES if args["class_cond"] else None,
        num_heads=int(args["num_heads"]),
        num_head_channels=int(args["num_head_channels"]),
        num_heads_upsample=int(args.get("num_heads_upsample", -1)),
        use_scale_shift_norm=bool(args["use_scale_shift_norm"]),
        resblock_updown=bool(args["resblock_updown"]),
    )
    fields.update(overrides)
    return ADMUNet(**fields)


def adm_param_shapes(model: ADMUNet, in_channels: int = 3) -> Any:
    """{'params': ...} of jax.ShapeDtypeStruct for `model`, from tracing init (no memory used)."""
    size = 2 ** (len(model.channel_mult) - 1)  # smallest map that survives every downsampling
    x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = None if model.num_classes is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    w = jax.ShapeDtypeStruct((1,), jnp.float32) if model.guidance_embed_dim else None
    return jax.eval_shape(model.init, jax.random.key(0), x, t, y, guidance=w)
