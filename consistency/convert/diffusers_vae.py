"""Read diffusers AutoencoderKL folders (config.json + safetensors, no torch) into Flax."""

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from consistency.convert.cm_pt import cm_state_dict_to_flax
from consistency.convert.diffusers import read_safetensors
from consistency.convert.diffusers_export import DIFFUSERS_VERSION, write_safetensors
from consistency.io.torch_pt import load_torch_state_dict
from consistency.models.autoencoder_kl import ACTIVATIONS, AutoencoderKL

# AutoencoderKL config key -> (network field, diffusers' default when the key is absent).
_FIELDS = {
    "in_channels": ("in_channels", 3),
    "out_channels": ("out_channels", 3),
    "block_out_channels": ("block_out_channels", (64,)),
    "layers_per_block": ("layers_per_block", 1),
    "latent_channels": ("latent_channels", 4),
    "norm_num_groups": ("norm_num_groups", 32),
    "act_fn": ("act_fn", "silu"),
    "mid_block_add_attention": ("mid_block_add_attention", True),
    "use_quant_conv": ("use_quant_conv", True),
    "use_post_quant_conv": ("use_post_quant_conv", True),
    "scaling_factor": ("scaling_factor", 0.18215),
}
# The only block types the architecture has; one per level of block_out_channels.
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
# Keys that change nothing in the network: bookkeeping, the tiling size, a pipeline dtype hint
# (the caller picks the compute dtype).
_IGNORED = ("_class_name", "_diffusers_version", "_name_or_path", "sample_size", "force_upcast")
# Per-channel latent statistics (SDXL-style configs): one value per latent channel, both or none.
_STATISTICS = ("latents_mean", "latents_std")
# Pre-0.14 attention names (diffusers renames them on load).
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}
_KNOWN = {*_FIELDS, *_BLOCK_TYPES, *_IGNORED, *_STATISTICS, "shift_factor"}
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _unsupported(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"AutoencoderKL config {key}={value!r} is not supported: {why}")


def _check_block_types(diffusers_config: Mapping[str, Any], levels: int) -> None:
    for key, want in _BLOCK_TYPES.items():
        types = list(diffusers_config.get(key, [want]))
        if any(t != want for t in types):
            raise _unsupported(key, types, f"every level must be {want!r}")
        if len(types) != levels:
            raise _unsupported(key, types, f"need one per block_out_channels level ({levels})")


def _statistics(diffusers_config: Mapping[str, Any], channels: int) -> dict[str, Any]:
    """latents_mean / latents_std as tuples (one per latent channel), or {} when both are null."""
    given = {k: diffusers_config.get(k) for k in _STATISTICS}
    if all(v is None for v in given.values()):
        return {}
    for key, value in given.items():
        other = _STATISTICS[1 - _STATISTICS.index(key)]
        if value is None:
            raise _unsupported(other, given[other], f"give {key} too (both or neither)")
        if not isinstance(value, (list, tuple)) or len(value) != channels:
            raise _unsupported(key, value, f"need one value per latent channel ({channels})")
    if any(not float(v) > 0 for v in given["latents_std"]):
        raise _unsupported("latents_std", given["latents_std"], "every value must be > 0")
    if diffusers_config.get("shift_factor"):
        raise _unsupported(
            "shift_factor", diffusers_config["shift_factor"], "give it or latents_mean, not both"
        )
    return {k: tuple(float(v) for v in given[k]) for k in _STATISTICS}


def autoencoder_kwargs(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKL fields of a diffusers AutoencoderKL config.json; unsupported keys raise."""
    unknown = sorted(set(diffusers_config) - _KNOWN)
    if unknown:
        raise _unsupported(unknown[0], diffusers_config[unknown[0]], f"unknown keys {unknown}")
    cls = diffusers_config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise _unsupported("_class_name", cls, "only AutoencoderKL folders are read")
    kwargs = {
        field: diffusers_config.get(key, default) for key, (field, default) in _FIELDS.items()
    }
    kwargs.update(_statistics(diffusers_config, int(kwargs["latent_channels"])))
    kwargs["block_out_channels"] = tuple(int(c) for c in kwargs["block_out_channels"])
    kwargs["shift_factor"] = float(diffusers_config.get("shift_factor") or 0.0)
    kwargs["scaling_factor"] = float(kwargs["scaling_factor"])
    _check_block_types(diffusers_config, len(kwargs["block_out_channels"]))
    if kwargs["act_fn"] not in ACTIVATIONS:
        raise _unsupported("act_fn", kwargs["act_fn"], f"choose one of {sorted(ACTIVATIONS)}")
    groups = kwargs["norm_num_groups"]
    if any(c % groups for c in kwargs["block_out_channels"]):
        raise _unsupported("norm_num_groups", groups, "it must divide every block_out_channels")
    return kwargs


def vae_module_path(name: str) -> tuple[tuple[str, ...], str]:
    """'encoder.mid_block.attentions.0.to_out.0.weight' -> ((..., 'attentions_0', 'to_out_0'),
    'weight'): index parts join their module's name; legacy attention names are renamed."""
    *parts, leaf = name.split(".")
    if leaf not in ("weight", "bias") or not parts or parts[0].isdigit():
        raise KeyError(f"state-dict key {name!r} is not an AutoencoderKL parameter name")
    path: list[str] = []
    for part in parts:
        if part.isdigit():
            path[-1] = f"{path[-1]}_{part}"
        elif path and path[-1].startswith("attentions_") and part in _LEGACY_ATTN:
            path.append(_LEGACY_ATTN[part])
        else:
            path.append(part)
    return tuple(path), leaf


def param_shapes(model: AutoencoderKL) -> Any:
    """The model's param tree as jax.ShapeDtypeStruct (no memory, no compute)."""
    side = model.downsampling_factor()
    x = jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


def state_dict_to_flax(state: Mapping[str, np.ndarray], model: AutoencoderKL) -> dict:
    """{'params': ...} (numpy float32) of `model` from diffusers AutoencoderKL weights.

    Conv weights OIHW -> HWIO; attention weights (O, I) or legacy 1x1 convs (O, I, 1, 1) -> (I, O).
    A key that fits no parameter, a misshapen tensor or an unfilled parameter raises, naming it.
    """
    return cm_state_dict_to_flax(state, param_shapes(model), module_path=vae_module_path)


def read_vae_folder(folder: str | pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, diffusers state dict) of a vae/ folder: config.json + .safetensors (or .bin)."""
    folder = pathlib.Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected an AutoencoderKL folder)")
    diffusers_config = json.loads((folder / "config.json").read_text())
    if (folder / WEIGHTS[0]).exists():
        return diffusers_config, read_safetensors(folder / WEIGHTS[0])
    if (folder / WEIGHTS[1]).exists():
        return diffusers_config, load_torch_state_dict(str(folder / WEIGHTS[1]))
    raise FileNotFoundError(f"{folder}: no {' or '.join(WEIGHTS)}")


def load_diffusers_vae(
    folder: str | pathlib.Path, *, dtype: Any = jnp.float32, attention_impl: str | None = "plain"
) -> tuple[AutoencoderKL, dict, dict]:
    """(network computing in `dtype`, {'params': ...} in float32, config) of a vae/ folder."""
    diffusers_config, state = read_vae_folder(folder)
    kwargs = autoencoder_kwargs(diffusers_config)
    model = AutoencoderKL(**kwargs, dtype=dtype, attention_impl=attention_impl)
    return model, state_dict_to_flax(state, model), diffusers_config


def _torch_name(path: tuple[str, ...]) -> str:
    """('decoder', 'up_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'decoder.up_blocks.0.(...)'."""
    *module, leaf = path
    parts = []
    for part in module:
        head, _, index = part.rpartition("_")
        parts.extend([head, index] if head and index.isdigit() else [part])
    return ".".join([*parts, "bias" if leaf == "bias" else "weight"])


def flax_to_state_dict(params: Any) -> dict[str, np.ndarray]:
    """diffusers AutoencoderKL state dict (float32; convs OIHW, linears (O, I)) of Flax params."""
    params = params.get("params", params) if isinstance(params, Mapping) else params
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value, np.float32)
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[_torch_name(path)] = np.ascontiguousarray(value)
    return out


def config_of(model: AutoencoderKL, *, sample_size: int, force_upcast: bool = True) -> dict:
    """The config.json diffusers' save_pretrained writes for an AutoencoderKL like `model`."""
    levels = len(model.block_out_channels)
    kwargs = {field: getattr(model, field) for field, _ in _FIELDS.values()}
    kwargs["block_out_channels"] = [int(c) for c in model.block_out_channels]
    out = dict(
        kwargs,
        _class_name="AutoencoderKL",
        _diffusers_version=DIFFUSERS_VERSION,
        down_block_types=[_BLOCK_TYPES["down_block_types"]] * levels,
        up_block_types=[_BLOCK_TYPES["up_block_types"]] * levels,
        shift_factor=float(model.shift_factor) if model.shift_factor else None,
        sample_size=int(sample_size),
        force_upcast=bool(force_upcast),
        latents_mean=None if model.latents_mean is None else list(model.latents_mean),
        latents_std=None if model.latents_std is None else list(model.latents_std),
    )
    autoencoder_kwargs(out)  # what we write, we read
    return dict(sorted(out.items()))


def export_diffusers_vae(
    params: Any, model: AutoencoderKL, out_dir: str | pathlib.Path, *, sample_size: int
) -> pathlib.Path:
    """Write a vae/ folder (config.json + float32 safetensors) AutoencoderKL.from_pretrained loads.

    The inverse of load_diffusers_vae; the params must fill `model` exactly. `out_dir` must be
    absent or empty.
    """
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    config = config_of(model, sample_size=sample_size)
    state = flax_to_state_dict(params)
    state_dict_to_flax(state, model)  # every parameter there, in its shape
    out_dir.mkdir(parents=True, exist_ok=True)
    # As diffusers' to_json_string: indent 2, sorted keys, a final newline.
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_safetensors(out_dir / WEIGHTS[0], state, metadata={"format": "pt"})
    return out_dir
