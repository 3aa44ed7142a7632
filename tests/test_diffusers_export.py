"""The diffusers exporter, against the real ConsistencyModelPipeline folders of the fixtures."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import refdata
from flax import traverse_util

from configs import quick_digits
from consistency.convert.cm_pt import load_cm_checkpoint
from consistency.convert.diffusers import (
    adm_from_diffusers_config,
    load_diffusers_unet,
    read_safetensors,
)
from consistency.convert.diffusers_export import (
    SCHEDULER_KEYS,
    export_diffusers,
    unet_config_from_adm,
    write_safetensors,
)
from consistency.experiment import networks, sample, train
from consistency.experiment.pipeline import ConsistencyPipeline
from consistency.models.adm import adm_from_create_model_args

REPO = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = refdata.cases("diffusers_cm_folder")
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
# Keys of the saved configs not compared: the writer's version and where it was loaded from.
SKIPPED_KEYS = ("_diffusers_version", "_name_or_path")


def _read_json(path) -> dict:
    return json.loads(path.read_text())


def _export(params, model, unet_config, scheduler_config, out):
    return export_diffusers(
        params,
        model,
        out,
        in_channels=unet_config["in_channels"],
        sample_size=unet_config["sample_size"],
        scheduler={k: scheduler_config[k] for k in SCHEDULER_KEYS},
    )


@pytest.fixture(scope="module", params=refdata.cases("diffusers_cm_folder"))
def case(request, tmp_path_factory):
    """The fixture folder, its import, and its export."""
    files = request.param["files"]
    folder = files["model_index.json"].parent
    unet_config = _read_json(folder / "unet" / "config.json")
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    model, params = load_diffusers_unet(folder / "unet")
    out = tmp_path_factory.mktemp(request.param["name"]) / "export"
    _export(params, model, unet_config, scheduler_config, out)
    return dict(
        folder=folder,
        meta=_read_json(files[".json"]),
        unet_config=unet_config,
        scheduler_config=scheduler_config,
        model=model,
        params=params,
        out=out,
    )


def _assert_same_tensors(written: dict, fixture: dict) -> None:
    """Same names and shapes; float32 values bit for bit after casting the fixture's up."""
    assert sorted(written) == sorted(fixture)
    for name, value in fixture.items():
        assert written[name].dtype == np.float32, name
        assert written[name].shape == value.shape, name
        want = value.astype(np.float32)
        np.testing.assert_array_equal(written[name].view(np.uint32), want.view(np.uint32), name)


def test_export_writes_the_fixture_tensors(case):
    written = read_safetensors(case["out"] / WEIGHTS)
    fixture = read_safetensors(case["folder"] / WEIGHTS)
    _assert_same_tensors(written, fixture)
    if all(v.dtype == np.float32 for v in fixture.values()):
        # the layout is safetensors' own: header order, offsets, padding, metadata
        assert (case["out"] / WEIGHTS).read_bytes() == (case["folder"] / WEIGHTS).read_bytes()


def test_export_of_the_source_adm_checkpoint_gives_the_folder(case, tmp_path):
    """The cm .pt the folder was converted from, exported here, gives diffusers' own folder."""
    meta = case["meta"]
    model = adm_from_create_model_args(meta["source_create_model_kwargs"])
    params = load_cm_checkpoint(refdata.fixture_dir() / meta["source_checkpoint_file"], model)
    _export(params["params"], model, case["unet_config"], case["scheduler_config"], tmp_path / "x")
    written = read_safetensors(tmp_path / "x" / WEIGHTS)
    _assert_same_tensors(written, read_safetensors(case["folder"] / WEIGHTS))
    assert len(written) == meta["num_state_dict_keys"]
    config = _read_json(tmp_path / "x" / "unet" / "config.json")
    want = {k: v for k, v in meta["unet_config_saved"].items() if k not in SKIPPED_KEYS}
    assert {k: v for k, v in config.items() if k not in SKIPPED_KEYS} == want


def test_unet_config_matches_the_fixture(case):
    """Every key diffusers saved (those the importer reads among them), bar SKIPPED_KEYS."""
    config = _read_json(case["out"] / "unet" / "config.json")
    want = case["unet_config"]
    assert config.keys() - set(SKIPPED_KEYS) == want.keys() - set(SKIPPED_KEYS)
    for key in want.keys() - set(SKIPPED_KEYS):
        assert config[key] == want[key], key
    assert config["_class_name"] == "UNet2DModel"


def test_export_then_import_gives_the_params_bit_for_bit(case):
    model, params = load_diffusers_unet(case["out"] / "unet")
    assert model == case["model"]
    flat = traverse_util.flatten_dict(params["params"])
    want = traverse_util.flatten_dict(case["params"]["params"])
    assert flat.keys() == want.keys()
    for key, value in want.items():
        assert flat[key].dtype == value.dtype == np.float32
        np.testing.assert_array_equal(flat[key].view(np.uint32), value.view(np.uint32), key)


def test_scheduler_and_model_index_match_the_fixture(case):
    for path in ("scheduler/scheduler_config.json", "model_index.json"):
        got, want = _read_json(case["out"] / path), _read_json(case["folder"] / path)
        assert got.keys() == want.keys(), path
        assert {k: got[k] for k in want if k not in SKIPPED_KEYS} == {
            k: want[k] for k in want if k not in SKIPPED_KEYS
        }, path


def test_one_head_per_block_round_trips_as_attention_head_dim_none(case):
    model = case["model"].clone(num_head_channels=-1, num_heads=1)
    config = unet_config_from_adm(model, 3, case["unet_config"]["sample_size"])
    assert config["attention_head_dim"] is None
    assert adm_from_diffusers_config(config) == model


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(resblock_updown=False), "resblock_updown"),
        (dict(channel_mult=(2, 4)), "channel_mult"),
        (dict(channel_mult=(1, 1.5)), "channel_mult"),
        (dict(dropout=0.1, dropout_min_ds=2), "dropout_min_ds"),
        (dict(num_head_channels=-1, num_heads=2, num_heads_upsample=4), "num_heads"),
        (dict(num_head_channels=-1, num_heads=2, attention_resolutions=(1, 2)), "num_heads"),
        (dict(num_head_channels=48), "num_head_channels"),
    ],
)
def test_unexpressible_configurations_name_the_field(case, fields, match):
    model = case["model"].clone(**fields)
    with pytest.raises(ValueError, match=match):
        unet_config_from_adm(model, 3, case["unet_config"]["sample_size"])


def test_bad_arguments_are_refused(case, tmp_path):
    unet_config, scheduler_config = case["unet_config"], case["scheduler_config"]
    with pytest.raises(ValueError, match="sigma_data"):
        export_diffusers(
            case["params"],
            case["model"],
            tmp_path / "a",
            in_channels=unet_config["in_channels"],
            sample_size=unet_config["sample_size"],
            scheduler={k: scheduler_config[k] for k in SCHEDULER_KEYS if k != "sigma_data"},
        )
    with pytest.raises(ValueError, match="input_blocks_0_0/kernel"):
        wrong = dict(unet_config, in_channels=unet_config["in_channels"] + 1)
        _export(case["params"], case["model"], wrong, scheduler_config, tmp_path / "b")
    with pytest.raises(FileExistsError):
        _export(case["params"], case["model"], unet_config, scheduler_config, case["out"])


def test_write_safetensors_orders_like_safetensors(tmp_path):
    """Descending dtype, then name; every dtype reads back bit for bit."""
    tensors = {
        "b": np.arange(6, dtype=">f4").reshape(2, 3),
        "a": np.arange(3, dtype=np.float16),
        "c": np.array([True, False]),
        "d": np.arange(4, dtype=np.int64),
        "e": np.ones((2, 0), np.float32),
        "f": np.array([1.5, -2], ml_dtypes.bfloat16),
    }
    write_safetensors(tmp_path / "t.safetensors", tensors)
    raw = (tmp_path / "t.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    assert list(json.loads(raw[8 : 8 + n])) == ["d", "b", "e", "f", "a", "c"]
    back = read_safetensors(tmp_path / "t.safetensors")
    for name, value in tensors.items():
        assert back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value, name)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """configs/quick_digits.py:adm trained one step on the digits, exported by the CLI."""
    run = tmp_path_factory.mktemp("quick_digits_adm")
    config = quick_digits.get_config("adm")
    config.training.update(num_steps=1, batch_size=16, log_every=1, snapshot_every=1)
    config.sampling.grid_size = 0
    config.eval.every_steps = 0  # no FID
    config.data.num_threads = 1
    train.train_and_evaluate(config, str(run))
    out = run.parent / "diffusers"
    cmd = [sys.executable, "-m", "consistency.convert", "--to=diffusers",
           f"--config={REPO / 'configs' / 'quick_digits.py'}:adm", f"--workdir={run}",
           f"--out={out}"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return config, run, out


def _fixture_json(case, path) -> dict:
    return _read_json(case.values[0]["files"]["model_index.json"].parent / path)


def test_quick_digits_adm_exports_what_diffusers_writes(digits_run):
    """The listing and the config keys of diffusers' save_pretrained folders (the fixtures')."""
    config, _, out = digits_run
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    for case in FOLDERS:
        for path in ("unet/config.json", "scheduler/scheduler_config.json", "model_index.json"):
            want = _fixture_json(case, path).keys() - {"_name_or_path"}  # where it was loaded from
            assert _read_json(out / path).keys() == want, (case.id, path)
    unet = _read_json(out / "unet" / "config.json")
    assert unet["_class_name"] == "UNet2DModel"
    assert (unet["in_channels"], unet["out_channels"], unet["sample_size"]) == (1, 1, 8)
    assert unet["block_out_channels"] == [32, 64]
    assert unet["down_block_types"] == ["ResnetDownsampleBlock2D", "AttnDownBlock2D"]
    scheduler = _read_json(out / "scheduler" / "scheduler_config.json")
    assert scheduler["num_train_timesteps"] == config.sampling.steps


def test_quick_digits_adm_reimports_bit_for_bit(digits_run):
    config, run, out = digits_run
    network = networks.build_network(config)
    params, _, _ = sample.load_checked(
        config, run / "checkpoints", network, ema_index=config.sampling.ema_index, step=None
    )
    module, back = load_diffusers_unet(out / "unet")
    # num_heads is unused when num_head_channels is set (the reader writes diffusers' default)
    assert module == network.module.clone(num_heads=module.num_heads)
    want = traverse_util.flatten_dict(jax.device_get(params))
    got = traverse_util.flatten_dict(back["params"])
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype == np.float32, key
        np.testing.assert_array_equal(got[key].view(np.uint32), value.view(np.uint32), key)


def test_quick_digits_adm_folder_samples_the_run_images(digits_run):
    _, run, out = digits_run
    ours, theirs = ConsistencyPipeline.from_workdir(run), ConsistencyPipeline.from_diffusers(out)
    theirs.batch_per_call = ours.batch_per_call
    for levels in (dict(num_inference_steps=1), dict(timesteps=[22, 0])):
        kwargs = dict(batch_size=8, seed=5, output_type="np", **levels)
        images = ours(**kwargs)
        assert images.std() > 1e-3  # one step has moved the zero-initialised output layer
        np.testing.assert_array_equal(theirs(**kwargs), images)
