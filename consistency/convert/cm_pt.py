"""Map the paper's PyTorch ADM state dicts (cm .pt checkpoints) onto the Flax ADMUNet param tree."""

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from consistency.io.torch_pt import load_torch_state_dict
from consistency.models.adm import ADMUNet, adm_param_shapes

# How many leading dotted parts of a cm module path form one Flax block name
# (input_blocks.3.1 -> input_blocks_3_1); the rest names the submodule inside it.
_BLOCK_PARTS = {
    "time_embed": 2,
    "label_emb": 1,
    "input_blocks": 3,
    "middle_block": 2,
    "output_blocks": 3,
    "out": 2,
}
# torch's `weight` is a Flax kernel, GroupNorm scale or embedding table, whichever the module has.
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def cm_module_path(name: str) -> tuple[tuple[str, ...], str]:
    """'input_blocks.3.1.qkv.weight' -> (('input_blocks_3_1', 'qkv'), 'weight')."""
    *module, leaf = name.split(".")
    n = _BLOCK_PARTS.get(module[0]) if module else None
    if n is None or len(module) < n or leaf not in ("weight", "bias"):
        raise KeyError(f"state-dict key {name!r} is not an ADM UNet parameter name")
    rest = module[n:]
    return ("_".join(module[:n]), *(("_".join(rest),) if rest else ())), leaf


def _to_flax(value: np.ndarray, leaf: str, shape: tuple, name: str) -> np.ndarray:
    """Torch layout -> Flax layout: OIHW -> HWIO, (out, in[,1,1]) -> (in, out), else as is."""
    value = np.asarray(value)
    if value.dtype != np.float32:  # float16/bfloat16 checkpoints: exact upcast
        value = value.astype(np.float32)
    if leaf == "kernel" and len(shape) == 4:
        if value.ndim != 4:
            raise ValueError(f"{name}: conv weight of shape {value.shape}, expected OIHW")
        value = value.transpose(2, 3, 1, 0)
    elif leaf == "kernel" and len(shape) == 2:
        # qkv/proj_out are 1x1 convs in cm (O, I, 1[, 1]); diffusers stores Linear (O, I)
        if value.ndim < 2 or any(d != 1 for d in value.shape[2:]):
            raise ValueError(f"{name}: weight of shape {value.shape} is not a dense (O, I[,1,1])")
        value = value.reshape(value.shape[:2]).T
    if value.shape != tuple(shape):
        raise ValueError(f"{name}: converted shape {value.shape} != model parameter shape {shape}")
    return value


def _target_leaf(flat: Mapping, path: tuple, leaf: str, name: str) -> tuple:
    """The flattened target key for cm's `leaf` ('weight' or 'bias') of module `path`."""
    options = _WEIGHT_LEAVES if leaf == "weight" else ("bias",)
    keys = [(*path, o) for o in options if (*path, o) in flat]
    if len(keys) != 1:
        raise KeyError(f"state-dict key {name!r} has no parameter {'/'.join(path)} in the model")
    return keys[0]


def cm_state_dict_to_flax(
    state_dict: Mapping[str, np.ndarray],
    target: Any,
    module_path: Callable[[str], tuple[tuple[str, ...], str]] = cm_module_path,
) -> dict:
    """Flax params {'params': ...} (numpy float32) from a cm UNet state dict, shaped like `target`.

    `target` is the model's param tree (arrays or jax.ShapeDtypeStruct, with or without the
    'params' level). Every state-dict key must land on a parameter of matching shape and every
    parameter must be filled: anything else raises an error naming the key or parameter. Works on
    zero-stride placeholders (np.broadcast_to) too, so shapes can be checked without memory.
    `module_path` maps a key to (Flax module path, torch leaf); other torch networks pass theirs.
    """
    params = target.get("params", target) if isinstance(target, Mapping) else target
    flat = traverse_util.flatten_dict(params)
    out: dict[tuple, np.ndarray] = {}
    for name, value in state_dict.items():
        path, leaf = module_path(name)
        key = _target_leaf(flat, path, leaf, name)
        if key in out:
            raise KeyError(f"state-dict key {name!r} fills {'/'.join(key)} a second time")
        out[key] = _to_flax(value, key[-1], tuple(flat[key].shape), name)
    missing = ["/".join(k) for k in flat if k not in out]
    if missing:
        raise KeyError(f"model parameters not in the state dict: {missing}")
    return {"params": traverse_util.unflatten_dict(out)}


def load_cm_checkpoint(path: str, model: ADMUNet, in_channels: int = 3) -> dict:
    """{'params': ...} for `model` from a cm .pt file (model, EMA or target weights), no torch."""
    state_dict = load_torch_state_dict(path)
    return cm_state_dict_to_flax(state_dict, adm_param_shapes(model, in_channels))
