"""The diffusers UNet2DModel reader, on folders synthesised from the cm fixtures."""

import json
import struct

import jax
import numpy as np
import pytest
import refdata
from flax import traverse_util

from consistency.convert.cm_pt import load_cm_checkpoint
from consistency.convert.diffusers import load_diffusers_unet, read_safetensors
from consistency.io.torch_pt import load_torch_state_dict
from consistency.models.adm import adm_from_create_model_args

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb": "class_embedding",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


# the model is a static argument: equal models share one compilation
_apply = jax.jit(lambda model, *args: model.apply(*args), static_argnums=0)


def write_safetensors(path, tensors: dict) -> None:
    """The safetensors layout: u64 LE header size, JSON {name: dtype, shape, offsets}, raw bytes."""
    names = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape)}
        header[name]["data_offsets"] = [offset, offset + len(raw)]
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def diffusers_config(meta: dict) -> dict:
    """UNet2DModel config for the fixture's UNetModel args, as the cm conversion script sets it."""
    kw = meta["UNetModel_kwargs"]
    levels = len(kw["channel_mult"])
    attn = [2**i in kw["attention_resolutions"] for i in range(levels)]
    return {
        "_class_name": "UNet2DModel",
        "sample_size": kw["image_size"],
        "in_channels": kw["in_channels"],
        "out_channels": kw["out_channels"],
        "layers_per_block": kw["num_res_blocks"],
        "num_class_embeds": kw["num_classes"],
        "block_out_channels": [kw["model_channels"] * m for m in kw["channel_mult"]],
        "attention_head_dim": kw["num_head_channels"],
        "down_block_types": ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in attn[::-1]],
        "resnet_time_scale_shift": "scale_shift" if kw["use_scale_shift_norm"] else "default",
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "dropout": kw["dropout"],
    }


def cm_to_diffusers_blocks(config: dict) -> dict:
    """cm block prefix -> (diffusers prefix, kind), walking the blocks in the same order."""
    n = config["layers_per_block"]
    down = [t.startswith("Attn") for t in config["down_block_types"]]
    diff_down = []
    for i, a in enumerate(down):
        for j in range(n):
            diff_down.append([(f"down_blocks.{i}.resnets.{j}", "res")])
            if a:
                diff_down[-1].append((f"down_blocks.{i}.attentions.{j}", "attn"))
        if i < len(down) - 1:
            diff_down.append([(f"down_blocks.{i}.downsamplers.0", "res")])
    diff_up = []
    for i, a in enumerate(down[::-1]):
        for j in range(n + 1):
            diff_up.append([(f"up_blocks.{i}.resnets.{j}", "res")])
            if a:
                diff_up[-1].append((f"up_blocks.{i}.attentions.{j}", "attn"))
        if i < len(down) - 1:
            diff_up[-1].append((f"up_blocks.{i}.upsamplers.0", "res"))
    out = {}
    for cm, blocks in [("input_blocks", diff_down), ("output_blocks", diff_up)]:
        first = 1 if cm == "input_blocks" else 0
        for k, subs in enumerate(blocks, start=first):
            out.update({f"{cm}.{k}.{j}": s for j, s in enumerate(subs)})
    mid = ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    out.update({f"middle_block.{j}": (m, "attn" if j == 1 else "res") for j, m in enumerate(mid)})
    return out


def to_diffusers(state: dict, config: dict) -> dict:
    """Rename a cm state dict to diffusers names; qkv -> to_q/to_k/to_v with chunk(3, dim=0)."""
    blocks, out = cm_to_diffusers_blocks(config), {}
    for name, value in state.items():
        module, leaf = name.rsplit(".", 1)
        if module in _TOP:
            out[f"{_TOP[module]}.{leaf}"] = value
            continue
        parts = module.split(".")
        head = next(".".join(parts[:k]) for k in (3, 2) if ".".join(parts[:k]) in blocks)
        prefix, kind = blocks[head]
        sub = module[len(head) + 1 :]
        if kind == "res":
            out[f"{prefix}.{_RESNET[sub]}.{leaf}"] = value
        elif sub == "qkv":
            for part, chunk in zip(("to_q", "to_k", "to_v"), np.split(value, 3), strict=True):
                out[f"{prefix}.{part}.{leaf}"] = chunk.reshape(chunk.shape[:2])
        else:
            sub = {"norm": "group_norm", "proj_out": "to_out.0"}[sub]
            out[f"{prefix}.{sub}.{leaf}"] = value.reshape(value.shape[:2])  # 1x1 conv -> Linear
    return out


def _updown(case) -> bool:
    return json.loads(case.values[0]["files"][".json"].read_text())["UNetModel_kwargs"][
        "resblock_updown"
    ]


# diffusers' cm converter (and so our reader and exporter) covers resblock_updown=True ADMs;
# the exporter refuses the others by name (tests/test_diffusers_export.py).
@pytest.fixture(scope="module", params=[c for c in refdata.cases("adm") if _updown(c)])
def folder(request, tmp_path_factory):
    """A diffusers folder from the fixture's weights, in the .pt's dtype, plus cm-path results."""
    files = request.param["files"]
    meta = json.loads(files[".json"].read_text())
    ref = np.load(files[".npz"])
    dtype = next(iter(load_torch_state_dict(files[".pt"]).values())).dtype
    state = {k: ref[k].astype(dtype) for k in ref.files if "/" not in k}
    config = diffusers_config(meta)
    path = tmp_path_factory.mktemp(request.param["name"])
    (path / "config.json").write_text(json.dumps(config))
    write_safetensors(path / "diffusion_pytorch_model.safetensors", to_diffusers(state, config))
    model = adm_from_create_model_args(meta["create_model_kwargs"])
    cm_params = load_cm_checkpoint(files[".pt"], model)
    return dict(path=path, ref=ref, model=model, cm_params=cm_params, state=state, config=config)


def test_safetensors_roundtrip(folder):
    tensors = read_safetensors(folder["path"] / "diffusion_pytorch_model.safetensors")
    expected = to_diffusers(folder["state"], folder["config"])
    assert list(tensors) == list(expected)
    for name, value in expected.items():
        assert tensors[name].dtype == value.dtype
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)


def test_diffusers_folder_gives_the_cm_params_and_output(folder):
    model, params = load_diffusers_unet(folder["path"])
    flat = traverse_util.flatten_dict(params["params"])
    cm_flat = traverse_util.flatten_dict(folder["cm_params"]["params"])
    assert flat.keys() == cm_flat.keys()
    for key in flat:
        np.testing.assert_array_equal(flat[key], cm_flat[key], err_msg="/".join(key))
    ref = folder["ref"]
    y = ref["io/labels"] if model.num_classes is not None else None
    x = ref["io/model_input"].transpose(0, 2, 3, 1)
    out = np.asarray(_apply(model, params, x, ref["io/t_input"], y))
    # num_heads is inert once num_head_channels is set; every other field must agree
    cm_model = folder["model"].clone(num_heads=model.num_heads)
    assert model == cm_model
    cm_out = _apply(cm_model, folder["cm_params"], x, ref["io/t_input"], y)
    np.testing.assert_allclose(out, cm_out, rtol=0, atol=1e-6)
    want = ref["io/model_output"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_missing_and_unknown_keys_and_configs_are_refused(folder, tmp_path):
    config, state = folder["config"], to_diffusers(folder["state"], folder["config"])
    (tmp_path / "config.json").write_text(json.dumps(dict(config, freq_shift=1)))
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", state)
    with pytest.raises(ValueError, match="freq_shift"):
        load_diffusers_unet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    v = next(k for k in state if k.endswith("to_v.weight"))
    write_safetensors(
        tmp_path / "diffusion_pytorch_model.safetensors", {k: a for k, a in state.items() if k != v}
    )
    with pytest.raises(KeyError, match="to_v"):
        load_diffusers_unet(tmp_path)
    extra = dict(state, **{"down_blocks.0.resnets.0.norm3.weight": state[v]})
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", extra)
    with pytest.raises(KeyError, match="norm3"):
        load_diffusers_unet(tmp_path)
