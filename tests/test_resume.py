"""Resuming: a changed state structure stops (or, asked, continues), runs are recorded, save
failures and truncated checkpoints are one line each."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import test as test_config
from consistency.experiment import resume, train
from consistency.io import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), JAX_DEFAULT_MATMUL_PRECISION="highest")
# The test config with a one-level UNet and no PNG grids: quick to compile.
SMALL = {"model.unet.channels": 4, "model.unet.channel_mult": (1,),
         "model.unet.attn_resolutions": (), "sampling.grid_size": 0}  # fmt: skip


def _config(**flags):
    config = test_config.get_config()
    for key, value in {**SMALL, **flags}.items():
        section, *rest = key.split(".")
        node = config[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    return config


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run (checkpoint step 2) and its state."""
    workdir = tmp_path_factory.mktemp("base")
    state = train.train_and_evaluate(_config(**{"training.num_steps": 2}), str(workdir))
    return workdir, jax.device_get(state)


@pytest.fixture
def workdir(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run"


def _files(workdir):
    return {name: (workdir / name).read_bytes() for name in ("config.json", "runs.jsonl")}


def test_a_run_is_recorded_once_it_has_started(trained):
    runs = (trained[0] / "runs.jsonl").read_text().splitlines()
    assert len(runs) == 1
    record = json.loads(runs[0])
    assert record["start_step"] == 0 and record["config"]["training"]["num_steps"] == 2
    assert (
        record["time"]
        and json.loads((trained[0] / "config.json").read_text()) == (record["config"])
    )


@pytest.mark.parametrize(
    "flags, key, part",
    [
        ({"optim.grad_clip": 1.0}, "optim.grad_clip: 0.0 -> 1.0", "opt_state ("),
        (
            {"training.ema_rates": (0.9999, 0.99)},
            "training.ema_rates: [0.9999] -> [0.9999, 0.99]",
            "ema_params/1 (",
        ),  # fmt: skip
    ],
)
def test_a_structural_change_stops_naming_what_changed(workdir, flags, key, part):
    before = _files(workdir)
    config = _config(**{"training.num_steps": 4, **flags})
    with pytest.raises(resume.ResumeMismatchError) as error:
        train.train_and_evaluate(config, str(workdir))
    message = str(error.value)
    assert key in message and part in message and "resume_reinit_changed=True" in message
    assert "training.num_steps: 2 -> 4" in message  # every changed key is named
    # Nothing moved, nothing recorded.
    assert checkpoints.Checkpointer(workdir / "checkpoints").all_steps() == [2]
    assert not (workdir / "checkpoints" / "corrupt").exists()
    assert _files(workdir) == before


def test_resume_reinit_changed_keeps_params_with_a_fresh_optimiser(workdir, trained, capsys):
    _, old = trained
    flags = {"optim.grad_clip": 1.0, "training.ema_rates": (0.9999, 0.99)}
    config = _config(**{"training.num_steps": 2, "training.resume_reinit_changed": True, **flags})
    state = train.train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    assert "re-initialised ema_params/1 (from the restored params), opt_state (fresh)" in out
    assert int(state.step) == 2
    for name in ("params", "target_params"):
        for a, b in zip(_leaves(getattr(state, name)), _leaves(getattr(old, name)), strict=True):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(state.ema_params[0]), _leaves(old.ema_params[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(state.ema_params[1]), _leaves(old.params), strict=True):
        np.testing.assert_array_equal(a, b)
    # A fresh optimiser: the clip's state, then RAdam's count and moments at zero.
    assert int(state.opt_state[1].count) == 0 and int(old.opt_state[0].count) == 2
    assert all(not np.any(x) for x in _leaves(state.opt_state[1].mu))
    record = json.loads((workdir / "runs.jsonl").read_text().splitlines()[-1])
    assert record["start_step"] == 2 and record["resume_reinit_changed"] == {
        "ema_params/1": "from the restored params",
        "opt_state": "fresh",
    }
    # Training on records it in the next checkpoint's metadata.
    config.training.num_steps = 3
    train.train_and_evaluate(config, str(workdir))
    meta = checkpoints.Checkpointer(workdir / "checkpoints").read_meta(3)
    assert meta["resume_reinit_changed"]["step"] == 2 and meta["method"] == "ct"


def test_num_steps_below_the_checkpoint_step_stops(workdir):
    before = _files(workdir)
    with pytest.raises(ValueError, match="training.num_steps=1 is below step 2 of the checkpoint"):
        train.train_and_evaluate(_config(**{"training.num_steps": 1}), str(workdir))
    assert _files(workdir) == before


def _main(workdir, *flags, limit_kb=0):
    """main.py in a child process; limit_kb > 0: a full disk, where writes past that size fail
    (`ulimit -f`; Python ignores SIGXFSZ, so the write raises EFBIG)."""
    args = [f"--config.{k}={v}" for k, v in SMALL.items()] + list(flags)
    command = [sys.executable, str(REPO / "main.py"), "--config=configs/test.py"]
    command += [f"--workdir={workdir}", *args]
    if limit_kb:
        command = ["bash", "-c", f'ulimit -f {limit_kb} && exec "$0" "$@"', *command]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_a_failed_save_stops_the_run_at_the_next_step(workdir):
    flags = ["--config.training.num_steps=12", "--config.training.snapshot_every=4"]
    out = _main(workdir, *flags, "--config.training.log_every=1", limit_kb=60)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    # The state's metadata file (~110 kB) cannot be written: the save at step 4 fails in the
    # background and stops the run at a step after it (at the latest at the next save).
    lines = [line for line in text.splitlines() if "File too large" in line]
    assert 1 <= len(lines) <= 3, text[-3000:]
    assert any(
        "CheckpointWriteError: saving checkpoint step 4" in line and "step 2 is intact" in line
        for line in lines
    ), text[-3000:]
    assert "step 4/12" in out.stdout and "step 9/12" not in out.stdout, text[-3000:]
    assert len(text.splitlines()) < 40, text[-3000:]
    assert checkpoints.Checkpointer(workdir / "checkpoints").all_steps() == [2]
    checkpoints.load_params(workdir / "checkpoints", step=2)  # intact: its digest verifies


def test_a_truncated_newest_checkpoint_is_one_warning(workdir):
    out = _main(workdir, "--config.training.num_steps=4")
    assert out.returncode == 0, out.stderr[-3000:]
    for f in (workdir / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.name != "_METADATA":  # the data, not the tree's metadata
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = _main(workdir, "--config.training.num_steps=4")
    assert out.returncode == 0, out.stderr[-3000:]
    text = (out.stdout + out.stderr).splitlines()
    assert "Event loop is closed" not in out.stderr
    assert sum("WARNING: checkpoint step 4" in line for line in text) == 1
    assert "resumed from step 2" in out.stdout and len(text) <= 6, "\n".join(text[:50])
