"""The torch-free .pt reader and the cm state-dict -> Flax ADMUNet mapping."""

import io
import json
import pickle
import re
import zipfile

import ml_dtypes
import numpy as np
import pytest
import refdata
from flax import traverse_util

from consistency.convert.cm_pt import cm_module_path, cm_state_dict_to_flax, load_cm_checkpoint
from consistency.io.torch_pt import load_torch_state_dict
from consistency.models.adm import adm_from_create_model_args, adm_param_shapes


def _placeholders(state_dict_shapes: list) -> dict:
    """Zero-stride stand-ins for a state dict: right names and shapes, no memory."""
    return {n: np.broadcast_to(np.float32(0), tuple(s)) for n, s, *_ in state_dict_shapes}


@pytest.mark.parametrize("case", refdata.cases("adm"))
def test_pt_reader_returns_the_npz_tensors_exactly(case):
    meta = json.loads(case["files"][".json"].read_text())
    ref = np.load(case["files"][".npz"])
    sd = load_torch_state_dict(case["files"][".pt"])
    names = [n for n, *_ in meta["state_dict"]]
    assert list(sd) == names == [k for k in ref.files if "/" not in k]
    for name in names:
        assert sd[name].dtype in (np.float16, np.float32), name
        assert sd[name].flags.owndata and sd[name].flags.c_contiguous, name
        np.testing.assert_array_equal(sd[name].astype(np.float32), ref[name], err_msg=name)


@pytest.mark.parametrize("case", refdata.cases("adm"))
def test_converted_params_are_the_npz_tensors_relaid(case):
    meta = json.loads(case["files"][".json"].read_text())
    ref = np.load(case["files"][".npz"])
    model = adm_from_create_model_args(meta["create_model_kwargs"])
    flat = traverse_util.flatten_dict(load_cm_checkpoint(case["files"][".pt"], model)["params"])
    assert all(v.dtype == np.float32 for v in flat.values())
    w = lambda name: ref[name]
    b = meta["attention_blocks"][0]["name"]
    qkv = flat[(b.replace(".", "_"), "qkv", "kernel")]
    np.testing.assert_array_equal(qkv, w(f"{b}.qkv.weight")[:, :, 0, 0].T)
    conv = flat[("input_blocks_0_0", "kernel")]
    np.testing.assert_array_equal(conv, w("input_blocks.0.0.weight").transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat[("time_embed_0", "kernel")], w("time_embed.0.weight").T)
    np.testing.assert_array_equal(flat[("out_0", "scale")], w("out.0.weight"))


@pytest.mark.parametrize("case", refdata.cases("adm"))
def test_unmapped_and_missing_keys_are_named(case):
    meta = json.loads(case["files"][".json"].read_text())
    model = adm_from_create_model_args(meta["create_model_kwargs"])
    target = adm_param_shapes(model)
    sd = _placeholders(meta["state_dict"])
    extra = dict(sd, **{"middle_block.1.qkv_extra.weight": np.zeros((1, 1))})
    with pytest.raises(KeyError, match="middle_block.1.qkv_extra.weight"):
        cm_state_dict_to_flax(extra, target)
    with pytest.raises(KeyError, match="not an ADM UNet parameter"):
        cm_state_dict_to_flax(dict(sd, **{"module.time_embed.0.weight": sd["out.2.bias"]}), target)
    missing = {k: v for k, v in sd.items() if k != "out.2.bias"}
    with pytest.raises(KeyError, match="out_2/bias"):
        cm_state_dict_to_flax(missing, target)
    wrong = dict(sd, **{"out.2.bias": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match="out.2.bias"):
        cm_state_dict_to_flax(wrong, target)


@pytest.mark.parametrize("case", refdata.cases("adm_shapes"))
def test_full_configs_map_one_to_one(case):
    """Full ImageNet-64 / LSUN-256 nets (shapes only): parameter count and name mapping."""
    models = json.loads(case["files"][".json"].read_text())["models"]
    for name, entry in models.items():
        model = adm_from_create_model_args(entry["create_model_kwargs"])
        assert model.channel_mult == tuple(entry["channel_mult"]), name
        assert model.attention_resolutions == tuple(entry["attention_ds"]), name
        target = adm_param_shapes(model)
        flat = traverse_util.flatten_dict(target["params"])
        assert sum(int(np.prod(v.shape)) for v in flat.values()) == entry["num_parameters"], name
        by_top = {}
        for path, v in flat.items():
            top = re.sub(r"(_\d+)+$", "", path[0])  # input_blocks_3_1 -> input_blocks
            by_top[top] = by_top.get(top, 0) + int(np.prod(v.shape))
        assert by_top == entry["parameters_by_top_level_module"], name
        assert len(entry["state_dict"]) == entry["num_state_dict_entries"] == len(flat), name
        converted = cm_state_dict_to_flax(_placeholders(entry["state_dict"]), target)
        conv_flat = traverse_util.flatten_dict(converted["params"])
        assert {k: v.shape for k, v in conv_flat.items()} == {k: v.shape for k, v in flat.items()}
        attn = {b["name"].replace(".", "_"): b["channels"] for b in entry["attention_blocks"]}
        assert {k[0]: v.shape[0] for k, v in flat.items() if k[1:] == ("qkv", "kernel")} == attn


def test_cm_module_path():
    assert cm_module_path("input_blocks.3.1.qkv.weight") == (("input_blocks_3_1", "qkv"), "weight")
    assert cm_module_path("label_emb.weight") == (("label_emb",), "weight")
    assert cm_module_path("out.2.bias") == (("out_2",), "bias")


def _zip_checkpoint(path, pickled: bytes, storages: dict | None = None) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)


def test_forbidden_global_is_refused(tmp_path):
    # GLOBAL 'os system', then STOP: loading it would hand out os.system
    path = tmp_path / "evil.pt"
    _zip_checkpoint(path, b"\x80\x02cos\nsystem\nq\x00.")
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        load_torch_state_dict(path)


def test_legacy_and_non_zip_files_are_refused(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(ValueError, match="legacy"):
        load_torch_state_dict(legacy)
    other = tmp_path / "other.pth"
    other.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a zip"):
        load_torch_state_dict(other)


def _rebuild(storage_pid: tuple, offset: int, size: tuple, stride: tuple) -> bytes:
    """Pickle of {'a': {'t': tensor}} written opcode by opcode, as torch.save would."""
    buf = io.BytesIO()
    buf.write(b"\x80\x02}q\x00X\x01\x00\x00\x00a}q\x01X\x01\x00\x00\x00t")
    buf.write(b"ctorch._utils\n_rebuild_tensor_v2\n(")
    kind, dtype_cls, key, loc, numel = storage_pid
    buf.write(b"(X" + len(kind).to_bytes(4, "little") + kind.encode())
    buf.write(b"ctorch\n" + dtype_cls.encode() + b"\n")
    for s in (key, loc):
        buf.write(b"X" + len(s).to_bytes(4, "little") + s.encode())
    buf.write(b"J" + numel.to_bytes(4, "little") + b"tQ")
    buf.write(b"J" + offset.to_bytes(4, "little"))
    for tup in (size, stride):
        buf.write(b"(" + b"".join(b"J" + v.to_bytes(4, "little") for v in tup) + b"t")
    buf.write(b"\x89ccollections\nOrderedDict\n)RtRss.")
    return buf.getvalue()


@pytest.mark.parametrize("storage_type", ["DoubleStorage", "HalfStorage", "BFloat16Storage"])
def test_strided_views_dtypes_and_nested_dicts(tmp_path, storage_type):
    """A transposed view at an offset into a shared storage, inside a nested dict."""
    dtype = {"DoubleStorage": np.float64, "HalfStorage": np.float16}.get(storage_type)
    storage = np.arange(20, dtype=dtype or ml_dtypes.bfloat16)
    path = tmp_path / "view.pt"
    pickled = _rebuild(("storage", storage_type, "0", "cpu", 20), 2, (3, 4), (1, 3))
    _zip_checkpoint(path, pickled, {"0": storage.tobytes()})
    out = load_torch_state_dict(path)
    assert list(out) == ["a.t"]
    item = storage.itemsize
    expected = np.lib.stride_tricks.as_strided(storage[2:], (3, 4), (item, 3 * item))
    assert out["a.t"].dtype == storage.dtype
    np.testing.assert_array_equal(out["a.t"].astype(np.float32), expected.astype(np.float32))
