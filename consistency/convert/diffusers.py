"""Read diffusers UNet2DModel folders of the converted cm checkpoints into the Flax ADMUNet."""

import json
import pathlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from consistency.convert.cm_pt import cm_state_dict_to_flax
from consistency.io.torch_pt import load_torch_state_dict
from consistency.models.adm import ADMUNet, adm_param_shapes

_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}
# diffusers ResnetBlock2D / Attention submodules -> cm ResBlock / AttentionBlock submodules.
_RESNET_SUBS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Current diffusers names first, then the pre-0.20 ones (query/key/value/proj_attn).
_ATTN_SUBS = {"group_norm": "norm", "to_out.0": "proj_out", "proj_attn": "proj_out"}
_QKV_SUBS = {"to_q": 0, "to_k": 1, "to_v": 2, "query": 0, "key": 1, "value": 2}
_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "class_embedding": "label_emb",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# UNet2DModel settings that the ADM UNet hard-wires; any other value is refused.
_FIXED_CONFIG = {
    "time_embedding_type": "positional",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "class_embed_type": None,
    "center_input_sample": False,
    "downsample_padding": 1,
    "downsample_type": "resnet",
    "upsample_type": "resnet",
    "mid_block_scale_factor": 1,
    "add_attention": True,
    "time_embedding_dim": None,
    "mid_block_type": "UNetMidBlock2D",
}
_DOWN_TYPES = {"ResnetDownsampleBlock2D": False, "AttnDownBlock2D": True}
_UP_TYPES = {"ResnetUpsampleBlock2D": False, "AttnUpBlock2D": True}


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{name: array} from a .safetensors file: u64 LE header size, JSON header, raw LE bytes."""
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = memoryview(raw)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if info["dtype"] == "BF16":
            import ml_dtypes  # a jax dependency; numpy has no bfloat16

            arr = np.frombuffer(data[begin:end], "<u2").astype(np.uint16).view(ml_dtypes.bfloat16)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            arr = np.frombuffer(data[begin:end], _SAFETENSORS_DTYPES[info["dtype"]])
            arr = arr.astype(arr.dtype.newbyteorder("="))  # a native-order copy
        else:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        out[name] = arr.reshape(info["shape"])
    return out


def _block_types(unet_config: Mapping[str, Any]) -> list[bool]:
    """Per level, whether it has attention; checks that up blocks mirror the down blocks."""
    down, up = list(unet_config["down_block_types"]), list(unet_config["up_block_types"])
    for t in down + up:
        if t not in _DOWN_TYPES and t not in _UP_TYPES:
            choices = sorted(_DOWN_TYPES) + sorted(_UP_TYPES)
            raise ValueError(f"unsupported block type {t!r}; choose one of {choices}")
    attn = [_DOWN_TYPES[t] for t in down]
    if [_UP_TYPES.get(t) for t in reversed(up)] != attn:
        raise ValueError(f"up_block_types {up} do not mirror down_block_types {down}")
    return attn


def adm_from_diffusers_config(unet_config: Mapping[str, Any], **overrides: Any) -> ADMUNet:
    """ADMUNet equivalent to a diffusers UNet2DModel config of the cm conversion script."""
    for key, value in _FIXED_CONFIG.items():
        if key in unet_config and unet_config[key] != value:
            raise ValueError(
                f"UNet2DModel {key}={unet_config[key]!r} unsupported; ADM uses {value!r}"
            )
    attn = _block_types(unet_config)
    channels = list(unet_config["block_out_channels"])
    if any(c % channels[0] for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    fields = dict(
        model_channels=channels[0],
        out_channels=unet_config.get("out_channels", 3),
        num_res_blocks=int(unet_config["layers_per_block"]),
        attention_resolutions=tuple(2**i for i, a in enumerate(attn) if a),
        channel_mult=tuple(c // channels[0] for c in channels),
        num_classes=unet_config.get("num_class_embeds"),
        # attention_head_dim None means one head over all channels in diffusers
        num_head_channels=int(unet_config.get("attention_head_dim") or -1),
        num_heads=1,
        dropout=float(unet_config.get("dropout", 0.0)),
        use_scale_shift_norm=unet_config.get("resnet_time_scale_shift", "default") == "scale_shift",
        resblock_updown=True,
    )
    fields.update(overrides)
    return ADMUNet(**fields)


def _module_table(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> cm module prefix, following the cm conversion's block order."""
    attn, n = _block_types(unet_config), int(unet_config["layers_per_block"])
    table, cur = dict(_TOP), 1
    for i, has_attn in enumerate(attn):
        for j in range(n):
            table[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{cur}.0"
            if has_attn:
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{cur}.1"
            cur += 1
        if i != len(attn) - 1:
            table[f"down_blocks.{i}.downsamplers.0"] = f"input_blocks.{cur}.0"
            cur += 1
    for d, c in [("resnets.0", 0), ("attentions.0", 1), ("resnets.1", 2)]:
        table[f"mid_block.{d}"] = f"middle_block.{c}"
    cur = 0
    for i, has_attn in enumerate(reversed(attn)):
        for j in range(n + 1):
            table[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{cur}.0"
            if has_attn:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{cur}.1"
            cur += 1
        if i != len(attn) - 1:
            table[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{cur - 1}.{2 if has_attn else 1}"
    return table


def _split(name: str, table: Mapping[str, str]) -> tuple[str, str, str]:
    """'down_blocks.1.attentions.0.to_q.weight' -> (module prefix, 'to_q', 'weight')."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:k])
        if prefix in table:
            return prefix, ".".join(parts[k:-1]), parts[-1]
    raise KeyError(f"diffusers key {name!r} belongs to no known UNet2DModel module")


def diffusers_to_cm_state_dict(
    state: Mapping[str, np.ndarray], unet_config: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """cm state dict from diffusers UNet2DModel weights: renamed, q/k/v concatenated into qkv."""
    table, out, qkv = _module_table(unet_config), {}, {}
    for name, value in state.items():
        prefix, sub, leaf = _split(name, table)
        cm = table[prefix]
        if prefix in _TOP and not sub:
            out[f"{cm}.{leaf}"] = value
        elif ".attentions." in prefix and sub in _QKV_SUBS:
            qkv.setdefault(f"{cm}.qkv.{leaf}", [None] * 3)[_QKV_SUBS[sub]] = value
        elif ".attentions." in prefix and sub in _ATTN_SUBS:
            out[f"{cm}.{_ATTN_SUBS[sub]}.{leaf}"] = value
        elif ".attentions." not in prefix and sub in _RESNET_SUBS:
            out[f"{cm}.{_RESNET_SUBS[sub]}.{leaf}"] = value
        else:
            raise KeyError(f"diffusers key {name!r}: unknown submodule {sub!r} of {prefix}")
    for key, parts in qkv.items():
        if any(p is None for p in parts):
            raise KeyError(f"{key}: the diffusers folder lacks one of to_q/to_k/to_v")
        # the flash layout puts q/k/v outermost, so qkv = [q; k; v] along the output channels
        out[key] = np.concatenate(parts, axis=0)
    return out


def read_diffusers_folder(folder: str | pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(UNet2DModel config, diffusers state dict) of a folder: config.json + .safetensors/.bin."""
    folder = pathlib.Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected a UNet2DModel folder)")
    unet_config = json.loads((folder / "config.json").read_text())
    weights = folder / "diffusion_pytorch_model.safetensors"
    if weights.exists():
        return unet_config, read_safetensors(weights)
    if (folder / "diffusion_pytorch_model.bin").exists():
        return unet_config, load_torch_state_dict(folder / "diffusion_pytorch_model.bin")
    raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin")


def load_diffusers_unet(folder: str | pathlib.Path, **overrides: Any) -> tuple[ADMUNet, dict]:
    """(model, {'params': ...}) from a UNet2DModel folder (config.json + .safetensors or .bin)."""
    unet_config, state = read_diffusers_folder(folder)
    model = adm_from_diffusers_config(unet_config, **overrides)
    cm_state = diffusers_to_cm_state_dict(state, unet_config)
    return model, cm_state_dict_to_flax(
        cm_state, adm_param_shapes(model, unet_config.get("in_channels", 3))
    )
