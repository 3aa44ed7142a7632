"""Reader for the paper's JAX (jcm) checkpoints: flax msgpack State, raw or xz-wrapped."""

import lzma
import os
from collections.abc import Mapping
from typing import Any

import flax.serialization
import numpy as np

from consistency.models.ncsnpp import NCSNpp

STATE_KEYS = (
    "step",
    "lr",
    "ema_rate",
    "params",
    "params_ema",
    "model_state",
    "opt_state",
    "rng_state",
)
OPTIONAL_STATE_KEYS = ("target_params",)  # present in StateWithTarget (CT checkpoints)
PARAM_TREES = ("params_ema", "params", "target_params")
_XZ_MAGIC = b"\xfd7zXZ\x00"

# jcm model-config fields that must hold these values: the only ones this NCSN++ implements.
_FIXED_JCM_FIELDS = {
    "name": "ncsnpp",
    "resblock_type": "biggan",
    "attention_type": "ddpm",
    "progressive": "none",
    "nonlinearity": "swish",
    "normalization": "GroupNorm",
    "conditional": True,
    "resamp_with_conv": True,
    "conv_size": 3,
    "double_heads": False,
}


def read_jcm_bytes(path: str | os.PathLike) -> bytes:
    """The raw flax msgpack bytes of a jcm checkpoint file, unwrapping xz if the magic says so."""
    with open(path, "rb") as f:
        data = f.read()
    return lzma.decompress(data) if data.startswith(_XZ_MAGIC) else data


def load_jcm_state(path: str | os.PathLike) -> dict[str, Any]:
    """The whole jcm State / StateWithTarget as nested dicts of numpy arrays and Python scalars.

    The keys are checked against jcm's State: a missing or unexpected key raises naming it.
    """
    state = flax.serialization.msgpack_restore(read_jcm_bytes(path))
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a jcm State (top level is {type(state).__name__})")
    missing = [k for k in STATE_KEYS if k not in state]
    unexpected = [k for k in state if k not in STATE_KEYS + OPTIONAL_STATE_KEYS]
    if missing or unexpected:
        raise KeyError(f"{path}: not a jcm State; missing keys {missing}, unexpected {unexpected}")
    return state


def load_jcm_params(path: str | os.PathLike, which: str = "params_ema") -> dict[str, Any]:
    """One parameter tree of a jcm checkpoint, in the layout of `NCSNpp` (the same flax names).

    which: "params_ema" (what jcm samples and evaluates with), "params" (the online weights) or
    "target_params" (the CT target network, StateWithTarget only).
    """
    if which not in PARAM_TREES:
        raise ValueError(f"unknown parameter tree: {which!r}; choose one of {PARAM_TREES}")
    state = load_jcm_state(path)
    if which not in state:
        available = [k for k in PARAM_TREES if k in state]
        raise KeyError(f"{path} has no {which!r}; available: {available}")
    return _as_numpy(state[which])


def _as_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _as_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def check_params(params: Mapping, template: Mapping, prefix: str = "") -> None:
    """Raise naming the first path that is missing, unexpected, or of the wrong shape.

    template: the model's parameter tree or its shapes (e.g. from jax.eval_shape of init).
    """
    missing = sorted(set(template) - set(params))
    unexpected = sorted(set(params) - set(template))
    if missing or unexpected:
        raise KeyError(
            f"parameter tree mismatch under {prefix or '/'}: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for key, ref in template.items():
        path = f"{prefix}/{key}"
        if isinstance(ref, Mapping) != isinstance(params[key], Mapping):
            raise KeyError(f"parameter tree mismatch at {path}: module vs array")
        if isinstance(ref, Mapping):
            check_params(params[key], ref, path)
        elif tuple(np.shape(params[key])) != tuple(ref.shape):
            raise ValueError(f"{path}: shape {np.shape(params[key])}, model expects {ref.shape}")


def ncsnpp_from_jcm_config(model_config: Mapping[str, Any], **overrides: Any) -> NCSNpp:
    """The NCSNpp a jcm `config.model` block describes (values NCSNpp does not implement raise).

    overrides: NCSNpp fields jcm has no key for (attention_impl, dtype). progressive_combine is
    not read: it only acts with progressive_input="input_skip", which NCSNpp does not implement.
    The SDE/sampling keys (sigma_min, num_scales, ...) belong to the caller, not the network.
    """
    for key, value in _FIXED_JCM_FIELDS.items():
        if key in model_config and model_config[key] != value:
            raise ValueError(
                f"jcm model.{key}={model_config[key]!r} is not implemented; only {value!r}"
            )
    c = model_config
    return NCSNpp(
        nf=int(c["nf"]),
        ch_mult=tuple(int(m) for m in c["ch_mult"]),
        num_res_blocks=int(c["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in c["attn_resolutions"]),
        dropout=float(c["dropout"]),
        fir=bool(c["fir"]),
        fir_kernel=tuple(int(k) for k in c["fir_kernel"]),
        skip_rescale=bool(c["skip_rescale"]),
        init_scale=float(c["init_scale"]),
        progressive_input=str(c["progressive_input"]).lower(),
        embedding_type=str(c["embedding_type"]).lower(),
        fourier_scale=float(c["fourier_scale"]),
        **overrides,
    )
