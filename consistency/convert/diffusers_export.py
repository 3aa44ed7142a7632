"""Write a trained ADMUNet as a diffusers ConsistencyModelPipeline folder, without torch."""

import json
import pathlib
import struct
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from consistency.convert.cm_pt import _BLOCK_PARTS, _WEIGHT_LEAVES, cm_module_path
from consistency.convert.diffusers import (
    _ATTN_SUBS,
    _FIXED_CONFIG,
    _RESNET_SUBS,
    _SAFETENSORS_DTYPES,
    _module_table,
)
from consistency.models.adm import ADMUNet, adm_param_shapes

# The diffusers release whose save_pretrained folders this layout was checked against (fixtures).
DIFFUSERS_VERSION = "0.42.1"
# safetensors' Dtype enum order: it writes tensors by descending dtype, then by name.
_DTYPE_ORDER = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64")
_NUMPY_TO_SAFETENSORS = {
    (np.dtype(v).kind, np.dtype(v).itemsize): k for k, v in _SAFETENSORS_DTYPES.items()
}
# Flax submodule names inside a cm block -> cm's dotted names (in_layers_0 -> in_layers.0).
_CM_SUBS = {s.replace(".", "_"): s for s in (*_RESNET_SUBS.values(), *_ATTN_SUBS.values(), "qkv")}
_RESNET_NAMES = {cm: d for d, cm in _RESNET_SUBS.items()}
_ATTN_NAMES = {"norm": "group_norm", "proj_out": "to_out.0"}
_QKV_NAMES = ("to_q", "to_k", "to_v")
SCHEDULER_KEYS = ("num_train_timesteps", "sigma_min", "sigma_max", "rho", "sigma_data")


def _safetensors_dtype(arr: np.ndarray, name: str) -> str:
    if arr.dtype.name == "bfloat16":
        return "BF16"
    key = (arr.dtype.kind, arr.dtype.itemsize)
    if key not in _NUMPY_TO_SAFETENSORS:
        raise ValueError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors name")
    return _NUMPY_TO_SAFETENSORS[key]


def write_safetensors(
    path: str | pathlib.Path,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """A .safetensors file as the safetensors library writes it.

    u64 LE header length, compact JSON header ({"__metadata__": ...} first, then each tensor's
    dtype/shape/data_offsets, ordered by descending dtype then name, like the data), padded with
    spaces to a multiple of 8, then the raw little-endian bytes.
    """
    if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"safetensors metadata values must be strings: {dict(metadata)}")
    items = []
    for name, value in tensors.items():
        arr = np.asarray(value)
        items.append((name, _safetensors_dtype(arr, name), arr))
    items.sort(key=lambda item: (-_DTYPE_ORDER.index(item[1]), item[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata is not None else {}
    blobs, offset = [], 0
    for name, dtype, arr in items:
        big = arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big")
        raw = np.ascontiguousarray(arr.byteswap() if big else arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape)}
        header[name]["data_offsets"] = [offset, offset + len(raw)]
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def _cm_block(name: str) -> str:
    """Flax block name -> cm's dotted one: 'input_blocks_3_1' -> 'input_blocks.3.1'."""
    for head, n in _BLOCK_PARTS.items():
        if n == 1 and name == head:
            return head
        rest = name[len(head) + 1 :].split("_")
        if name.startswith(head + "_") and len(rest) == n - 1 and all(r.isdigit() for r in rest):
            return ".".join([head, *rest])
    raise KeyError(f"Flax module {name!r} is no ADM UNet block")


def flax_to_cm_state_dict(params: Any) -> dict[str, np.ndarray]:
    """cm state dict (float32) of ADMUNet params: the inverse of cm_state_dict_to_flax.

    Conv kernels HWIO -> OIHW, Dense (in, out) -> (out, in) 2-D (cm's 1x1 conv1d qkv/proj_out
    without their trailing 1), GroupNorm scale and embedding tables -> weight.
    """
    params = params.get("params", params) if isinstance(params, Mapping) else params
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        *module, leaf = path
        subs = module[1:]
        if len(subs) > 1 or (subs and subs[0] not in _CM_SUBS):
            raise KeyError(f"parameter {'/'.join(path)} is no ADM UNet parameter")
        cm_leaf = "weight" if leaf in _WEIGHT_LEAVES else leaf
        name = ".".join([_cm_block(module[0]), *(_CM_SUBS[s] for s in subs), cm_leaf])
        if cm_module_path(name) != (tuple(module), cm_leaf):  # raises on a bad leaf, too
            raise KeyError(f"parameter {'/'.join(path)} does not map back from {name!r}")
        value = np.asarray(value).astype(np.float32)
        if leaf == "kernel" and value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif leaf == "kernel" and value.ndim == 2:
            value = value.T
        out[name] = np.ascontiguousarray(value)
    return out


def cm_to_diffusers_state_dict(
    cm_state: Mapping[str, np.ndarray], unet_config: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """diffusers UNet2DModel weights of a cm state dict: diffusers_to_cm_state_dict's inverse.

    qkv is split into to_q/to_k/to_v along the output channels (cm's flash layout puts q/k/v
    outermost), attention weights are Linear (O, I).
    """
    inverse = {cm: d for d, cm in _module_table(unet_config).items()}
    out = {}
    for name, value in cm_state.items():
        parts = name.split(".")
        k = next((k for k in range(len(parts) - 1, 0, -1) if ".".join(parts[:k]) in inverse), 0)
        if not k:
            raise KeyError(f"cm key {name!r} belongs to no module of the UNet2DModel config")
        prefix, sub, leaf = inverse[".".join(parts[:k])], ".".join(parts[k:-1]), parts[-1]
        attention = ".attentions." in prefix
        if not sub:
            out[f"{prefix}.{leaf}"] = value
        elif attention and sub == "qkv":
            for part, chunk in zip(_QKV_NAMES, np.split(value, 3, axis=0), strict=True):
                out[f"{prefix}.{part}.{leaf}"] = np.ascontiguousarray(chunk)
        elif attention and sub in _ATTN_NAMES:
            out[f"{prefix}.{_ATTN_NAMES[sub]}.{leaf}"] = value
        elif not attention and sub in _RESNET_NAMES:
            out[f"{prefix}.{_RESNET_NAMES[sub]}.{leaf}"] = value
        else:
            raise KeyError(f"cm key {name!r}: submodule {sub!r} has no diffusers counterpart")
    return out


def _attention_head_dim(model: ADMUNet, attn: list[bool]) -> int | None:
    """UNet2DModel's one attention_head_dim for every attention block (None: one head each)."""
    mult = zip(model.channel_mult, attn, strict=True)
    blocks = [(model.model_channels * m, False) for m, a in mult if a]
    blocks += [(model.model_channels * model.channel_mult[-1], False)]  # the middle block
    blocks += [(ch, True) for ch, _ in blocks[:-1]]
    if model.num_head_channels != -1:
        bad = sorted({ch for ch, _ in blocks if ch % model.num_head_channels})
        if bad:
            raise ValueError(f"num_head_channels={model.num_head_channels} does not divide {bad}")
        return model.num_head_channels
    heads = [(ch, model._heads(ch, upsample)) for ch, upsample in blocks]
    if all(h == 1 for _, h in heads):
        return None  # diffusers' None: attention_head_dim = the block's channels
    dims = {ch // h for ch, h in heads}
    if len(dims) != 1 or any(ch % h for ch, h in heads):
        raise ValueError(
            f"num_heads={model.num_heads}, num_heads_upsample={model.num_heads_upsample} give "
            f"head widths {sorted(dims)} at the attention blocks {heads} (channels, heads); "
            "UNet2DModel has one attention_head_dim: set num_head_channels instead"
        )
    return dims.pop()


def _check_expressible(model: ADMUNet, sample_size: int) -> None:
    """ValueError naming the ADMUNet field that UNet2DModel (as cm's converter uses it) lacks."""
    if not model.resblock_updown:
        raise ValueError(
            "resblock_updown=False is not exported: diffusers' cm conversion and its reader here "
            "map only residual up/downsamplers (downsample_type/upsample_type 'resnet')"
        )
    mult = tuple(model.channel_mult)
    if mult[0] != 1 or any(m != int(m) or m < 1 for m in mult):
        raise ValueError(
            f"channel_mult={mult} is not expressible: UNet2DModel's conv_in and time projection "
            "are block_out_channels[0] wide (channel_mult must start at 1) and its widths must be "
            "whole multiples of the first"
        )
    if model.dropout > 0 and model.dropout_min_ds > 1:
        raise ValueError(
            f"dropout_min_ds={model.dropout_min_ds} with dropout={model.dropout} is not "
            "expressible: UNet2DModel applies one dropout in every block (set dropout=0.0 to "
            "export for inference)"
        )
    if sample_size % 2 ** (len(mult) - 1):
        raise ValueError(f"sample_size={sample_size} does not halve {len(mult) - 1} times")


def unet_config_from_adm(model: ADMUNet, in_channels: int, sample_size: int) -> dict:
    """UNet2DModel config.json for `model`, with every key diffusers' save_pretrained writes.

    As cm's conversion script: attention levels become AttnDown/AttnUpBlock2D, the others
    ResnetDownsample/ResnetUpsampleBlock2D. attention_resolutions entries that are no level's
    downsample factor select no block in ADMUNet either and are dropped. dtype and
    attention_impl are compute settings, not part of the network.
    """
    _check_expressible(model, sample_size)
    levels = len(model.channel_mult)
    attn = [2**i in model.attention_resolutions for i in range(levels)]
    down = ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn]
    up = ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)]
    config = dict(
        _FIXED_CONFIG,
        _class_name="UNet2DModel",
        _diffusers_version=DIFFUSERS_VERSION,
        sample_size=int(sample_size),
        in_channels=int(in_channels),
        out_channels=int(model.out_channels),
        layers_per_block=int(model.num_res_blocks),
        block_out_channels=[int(model.model_channels * m) for m in model.channel_mult],
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=_attention_head_dim(model, attn),
        # diffusers' middle attention drops its GroupNorm for scale_shift unless this is set
        attn_norm_num_groups=32 if model.use_scale_shift_norm else None,
        resnet_time_scale_shift="scale_shift" if model.use_scale_shift_norm else "default",
        num_class_embeds=model.num_classes,
        dropout=float(model.dropout),
        num_train_timesteps=None,
    )
    return dict(sorted(config.items()))


def scheduler_config(scheduler: Mapping[str, Any]) -> dict:
    """CMStochasticIterativeScheduler's scheduler_config.json (s_noise 1, clip_denoised)."""
    if sorted(scheduler) != sorted(SCHEDULER_KEYS):
        raise ValueError(f"scheduler needs exactly the keys {SCHEDULER_KEYS}: {sorted(scheduler)}")
    n = scheduler["num_train_timesteps"]
    if int(n) != n or n < 2:
        raise ValueError(f"scheduler num_train_timesteps={n!r} is not an integer >= 2")
    if not 0 < scheduler["sigma_min"] < scheduler["sigma_max"]:
        raise ValueError(f"scheduler needs 0 < sigma_min < sigma_max, got {dict(scheduler)}")
    config = {k: float(scheduler[k]) for k in SCHEDULER_KEYS[1:]}
    config.update(
        _class_name="CMStochasticIterativeScheduler",
        _diffusers_version=DIFFUSERS_VERSION,
        num_train_timesteps=int(n),
        s_noise=1.0,
        clip_denoised=True,
    )
    return dict(sorted(config.items()))


def model_index() -> dict:
    """model_index.json of a ConsistencyModelPipeline (unet + scheduler)."""
    return {
        "_class_name": "ConsistencyModelPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "CMStochasticIterativeScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }


def _check_params(params: Any, model: ADMUNet, in_channels: int) -> None:
    """The params fill `model` exactly: same parameters, same shapes."""
    params = params.get("params", params) if isinstance(params, Mapping) else params
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
    shapes = traverse_util.flatten_dict(adm_param_shapes(model, in_channels)["params"])
    want = {k: tuple(v.shape) for k, v in shapes.items()}
    for key in sorted(got.keys() | want.keys()):
        if got.get(key) != want.get(key):
            raise ValueError(
                f"param {'/'.join(key)}: shape {got.get(key)} in params, {want.get(key)} in the "
                f"model with in_channels={in_channels} (None: absent)"
            )


def _write_json(path: pathlib.Path, value: dict) -> None:
    """As diffusers' to_json_string: indent 2, sorted keys, a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def export_diffusers(
    params: Any,
    model: ADMUNet,
    out_dir: str | pathlib.Path,
    *,
    in_channels: int,
    sample_size: int,
    scheduler: Mapping[str, Any],
) -> pathlib.Path:
    """Write a folder ConsistencyModelPipeline.from_pretrained loads (float32 weights, no torch).

    params: ADMUNet's param tree (with or without the 'params' level); scheduler: the keys
    SCHEDULER_KEYS. The pipeline computes c_in, c_skip, c_out with the boundary scalings and feeds
    the UNet 250 ln(sigma), so only consistency functions with those are meaningful there.
    `out_dir` must be absent or empty.
    """
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    unet_config = unet_config_from_adm(model, in_channels, sample_size)
    sched = scheduler_config(scheduler)
    _check_params(params, model, in_channels)
    state = cm_to_diffusers_state_dict(flax_to_cm_state_dict(params), unet_config)
    _write_json(out_dir / "unet" / "config.json", unet_config)
    # save_pretrained's metadata, so readers that check the format accept the file
    weights = out_dir / "unet" / "diffusion_pytorch_model.safetensors"
    write_safetensors(weights, state, metadata={"format": "pt"})
    _write_json(out_dir / "scheduler" / "scheduler_config.json", sched)
    _write_json(out_dir / "model_index.json", model_index())
    return out_dir
