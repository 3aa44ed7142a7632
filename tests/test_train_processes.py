"""The trainer as processes: SIGTERM, SIGKILL at random points, two hosts, a bad config."""

import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import test as test_config
from consistency.experiment import networks, train, train_state, update
from consistency.io import checkpoints, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
# The test process's settings (conftest), so that the children hit the same compilation cache.
ENV = dict(os.environ, PYTHONPATH=str(REPO), JAX_DEFAULT_MATMUL_PRECISION="highest")
MAIN = [sys.executable, str(REPO / "main.py"), "--config=configs/test.py"]


# The test config with a smaller UNet still (quicker to trace and compile), and no PNG grids.
SMALL = {"model.unet.channels": 4, "model.unet.channel_mult": (1,),
         "model.unet.attn_resolutions": (), "sampling.grid_size": 0}  # fmt: skip


def _overrides(**training):
    flags = {**SMALL, **{f"training.{k}": v for k, v in training.items()}}
    return [f"--config.{k}={v}" for k, v in flags.items()]


def _config(**training):
    config = test_config.get_config()
    for key, value in {**SMALL, **{f"training.{k}": v for k, v in training.items()}}.items():
        section, *rest = key.split(".")
        node = config[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    return config


def _start(workdir, *args, env=ENV):
    return subprocess.Popen(
        [*MAIN, f"--workdir={workdir}", *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_for_steps(proc, count: int) -> list[str]:
    """Read the child's output until it has printed `count` progress lines (or exited)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if sum(x.startswith("step ") for x in lines) >= count:
            break
    return lines


def _restored(workdir, config, step):
    network, tx = networks.build_network(config), train_state.optimizer(config)
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    template = update.abstract_state(config, network, tx, mesh)
    ckpt = checkpoints.Checkpointer(pathlib.Path(workdir) / "checkpoints")
    state, _ = ckpt.restore(step, template)
    ckpt.close()
    return state


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_a_final_checkpoint(tmp_path):
    proc = _start(tmp_path, *_overrides(num_steps=1000, log_every=1, snapshot_every=1000))
    lines = _wait_for_steps(proc, 2)
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out[-3000:]
    saved = re.search(r"preempted: saved checkpoint step (\d+)", out)
    assert saved, out[-3000:]
    step = int(saved.group(1))
    assert step >= 2 and checkpoints.Checkpointer(tmp_path / "checkpoints").all_steps() == [step]


def test_runs_killed_at_random_points_resume_to_the_uninterrupted_result(tmp_path):
    """Three SIGKILLs, each a random number of steps (and a random fraction of one) into a run
    that checkpoints every step, then a run to the end: the same state as one run."""
    steps = 12
    args = _overrides(num_steps=steps, log_every=1, snapshot_every=1, keep_checkpoints=2)
    rng = random.Random(0)
    for _ in range(3):
        proc = _start(tmp_path / "killed", *args)
        lines = _wait_for_steps(proc, rng.randint(1, 3))
        # A random point within the next step (often during its asynchronous checkpoint write).
        try:
            proc.wait(timeout=rng.uniform(0.0, 0.3))
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    out = subprocess.run(
        [*MAIN, f"--workdir={tmp_path / 'killed'}", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and "resumed from step" in out.stdout, out.stderr[-3000:]
    config = _config(num_steps=steps, snapshot_every=steps, log_every=steps)
    want = train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
    _assert_same(_restored(tmp_path / "killed", config, steps), want)


WORKER = """
import sys
import numpy as np
import jax
from absl import flags
import main
from consistency.experiment import train

run = train.train_and_evaluate

def keep_params(config, workdir):
    state = run(config, workdir)
    local = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
    np.savez(f"{workdir}/params_{jax.process_index()}.npz", *local)
    return state

train.run = keep_params  # main.py calls the mode module's run
flags.FLAGS(sys.argv)
main.main([sys.argv[0]])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker(workdir, devices: int, *flags):
    env = dict(
        ENV,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0",
    )
    args = _overrides(num_steps=3, log_every=1, snapshot_every=3)
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            WORKER,
            "--config=configs/test.py",
            f"--workdir={workdir}",
            *flags,
            *args,
        ],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_two_processes_train_as_one(tmp_path):
    """2 processes x 1 CPU device (gloo) end with the params of 1 process x 2 devices, exactly.

    The reference runs in its own process too: XLA:CPU splits its thread pool by the client's
    device count, so the test process's 8-device client rounds a few last bits differently.
    """
    address = f"localhost:{_free_port()}"
    procs = [
        _worker(
            tmp_path / "two",
            1,
            f"--coordinator_address={address}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ] + [_worker(tmp_path / "one", 2)]
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the processes did not finish")
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    assert "step 3/3" in outs[0] and "step 3/3" not in outs[1]  # process 0 reports
    two = [list(np.load(tmp_path / "two" / f"params_{i}.npz").values()) for i in range(2)]
    one = list(np.load(tmp_path / "one" / "params_0.npz").values())
    assert len(one) > 20
    for a, b, c in zip(*two, one, strict=True):
        np.testing.assert_array_equal(a, b)  # the two processes agree ...
        np.testing.assert_array_equal(a, c)  # ... and with one process
    assert checkpoints.Checkpointer(tmp_path / "two" / "checkpoints").all_steps() == [3]


def test_a_bad_config_is_one_line_per_key_not_a_traceback(tmp_path):
    out = subprocess.run(
        [
            *MAIN,
            f"--workdir={tmp_path}",
            "--config.training.micro_batches=0",
            "--config.optim.lr=-1.0",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    for text in (
        "training.micro_batches=0: must be a positive integer",
        "optim.lr=-1.0: must be a number > 0",
    ):
        assert text in out.stderr
