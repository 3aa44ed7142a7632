"""Every config builds and overrides only base keys; paper configs run one step on mock data."""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import base
from consistency import builders, checkpoints, evaluate, train
from consistency.train_state import TrainState

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
NAMES.remove("base")
PAPER = [n for n in NAMES if not n.endswith("digits") and n != "test"]


def _flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _load(name):
    return importlib.import_module(f"configs.{name}").get_config()


def test_every_config_file_is_covered():
    assert {"test", "edm_digits", "cd_digits", "ct_digits"} <= set(NAMES)
    assert len(PAPER) == 9


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_and_only_overrides_base_keys(name):
    config, defaults = _flat(_load(name)), _flat(base.get_config())
    assert set(config) == set(defaults), set(config) ^ set(defaults)
    for key, value in config.items():
        assert type(value) is type(defaults[key]) or isinstance(value, (int, float)), key
    train.validate_config(_load(name)) if config["training.loss"] != "cd" else None


@pytest.mark.parametrize("metric", ["l1", "l2", "lpips"])
def test_cd_cifar10_metric_argument(metric):
    config = importlib.import_module("configs.cd_cifar10").get_config(metric)
    assert config.training.distance == metric
    assert config.optim.lr == (2e-4 if metric == "l1" else 4e-4)


def _reduce(config):
    """Tiny network at 32x32, batch 8, one step, l2 (no LPIPS weights offline).

    The data pipeline is the config's own (tfds source or image folder, centre crop, flips);
    only the crop size shrinks, so that a CPU compiles and runs the step in seconds.
    """
    config.data.image_size = min(config.data.image_size, 32)
    config.model.ncsnpp.update(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    # ADM's middle block always attends: downsample to 8x8 first.
    levels = int(np.log2(config.data.image_size // 8)) + 1
    config.model.adm.update(
        model_channels=32, channel_mult=(1,) * levels, num_res_blocks=1, attention_resolutions=(),
        num_head_channels=-1, num_heads=1,
    )  # fmt: skip
    config.model.dtype = "float32"
    config.training.update(batch_size=8, num_steps=1, log_every=1, snapshot_every=1,
                           distance="l2")  # fmt: skip
    config.sampling.update(grid_size=2, batch_size=2, ts=())
    config.data.num_threads = 1
    return config


def _write_teacher(config, directory):
    """A teacher checkpoint of the reduced network (EMA = a fresh init), as an EDM run writes."""
    network = builders.build_network(config)
    d = config.data
    x = jnp.zeros((1, d.image_size, d.image_size, d.num_channels))
    params = network.init(jax.random.key(3), x, jnp.zeros((1,), jnp.int32))
    state = TrainState.create(params, builders.optimizer(config), num_ema=1, with_target=False)
    meta = {
        "model": config.model.name,
        "params": checkpoints.param_fingerprint(evaluate.abstract_params(config, network)),
    }
    ckpt = checkpoints.Checkpointer(directory)
    ckpt.save(0, state, meta)
    ckpt.close()


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_runs_one_step_on_mock_data(name, tmp_path):
    config = _reduce(_load(name))
    if config.data.name == "image_folder":
        folder = tmp_path / "images"
        folder.mkdir()
        from PIL import Image

        rng = np.random.default_rng(0)
        for k in range(8):
            pixels = rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"cat_{k:07d}.png")
        config.data.folder = str(folder)
    if config.training.loss == "cd":
        _write_teacher(config, tmp_path / "teacher")
        config.training.teacher_checkpoint = str(tmp_path / "teacher")
    with tfds.testing.mock_data(num_examples=16):
        state = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 1
    leaves = jax.tree.leaves(state.params)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert (tmp_path / "run" / "samples" / "grid_0000001.png").exists()
