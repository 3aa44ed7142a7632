"""The trainer: resume equals an uninterrupted run, checkpoints, samples, and clear errors."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import test as test_config
from consistency import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(**training):
    config = test_config.get_config()
    config.training.update(**training)
    return config


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    return workdir, train.train_and_evaluate(_config(num_steps=4), str(workdir))


def test_resumed_run_equals_uninterrupted_run(uninterrupted, tmp_path):
    _, full = uninterrupted
    first = train.train_and_evaluate(_config(num_steps=2), str(tmp_path))
    assert int(first.step) == 2
    resumed = train.train_and_evaluate(_config(num_steps=4), str(tmp_path))
    assert int(resumed.step) == 4
    for name in ("params", "target_params", "ema_params", "opt_state"):
        a, b = _leaves(getattr(full, name)), _leaves(getattr(resumed, name))
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), name
    # The run really moved: params differ from the step-2 state.
    assert not all(
        np.array_equal(x, y)
        for x, y in zip(_leaves(first.params), _leaves(full.params), strict=True)
    )


def test_run_writes_checkpoints_grids_config_and_tensorboard(uninterrupted):
    workdir, _ = uninterrupted
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "4",
    ]
    assert (workdir / "samples" / "grid_0000004.png").exists()
    assert (workdir / "config.json").exists()
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoint_of_another_model_is_refused(uninterrupted):
    workdir, _ = uninterrupted
    config = _config(num_steps=6)
    config.model.unet.channels = 16
    with pytest.raises(ValueError, match="use a fresh --workdir"):
        train.train_and_evaluate(config, str(workdir))


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("data", "name", "mnist", "data.name: unknown 'mnist'"),
        ("model", "name", "dit", "model.name: unknown 'dit'"),
        ("training", "loss", "gan", "training.loss: unknown 'gan'"),
        ("training", "teacher_checkpoint", "/no/such/dir", "no such path '/no/such/dir'"),
        ("training", "log_every", 3, "multiple of training.n_jitted_steps"),
    ],
)
def test_bad_config_names_the_key(section, key, value, match, tmp_path):
    config = _config()
    config[section][key] = value
    if key == "log_every":
        config.training.n_jitted_steps = 2
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(config, str(tmp_path))


def test_batch_not_divisible_by_devices(tmp_path):
    with pytest.raises(ValueError, match="training.batch_size=12 must be divisible"):
        train.train_and_evaluate(_config(batch_size=12), str(tmp_path))


def test_cd_without_teacher_is_refused(tmp_path):
    with pytest.raises(ValueError, match="CD needs the EDM teacher"):
        train.train_and_evaluate(_config(loss="cd"), str(tmp_path))


def test_command_line_trains_then_samples(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [sys.executable, str(REPO / "main.py"), "--config=configs/test.py"]
    base += [f"--workdir={tmp_path}", "--config.training.num_steps=2"]
    out = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2/2" in out.stdout and "steps/s" in out.stdout and "ETA" in out.stdout
    out = subprocess.run(
        [*base, "--mode=sample"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    samples = np.load(tmp_path / "samples" / "step_2" / "samples_6x8x8x1.npz")
    assert samples["arr_0"].dtype == np.uint8 and samples["arr_0"].shape == (6, 8, 8, 1)
    assert samples["arr_0"].std() > 0
