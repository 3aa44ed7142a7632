"""launch.sh: every line, as printed with its paths set, validates (--check, in-process)."""

import os
import pathlib
import shlex
import subprocess
import sys

from test_errors import _in_process

REPO = pathlib.Path(__file__).resolve().parents[1]


def _lines(*args) -> list[list[str]]:
    env = dict(os.environ, LAUNCH_PRINT="1", RUNS="/tmp/runs", DATA="/tmp/data")
    out = subprocess.run(
        ["bash", "launch.sh", *args], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    return [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("main.py ")]


def test_every_launch_line_validates():
    lines = _lines("all")
    configs = {next(a for a in argv if a.startswith("--config=")) for argv in lines}
    assert len(lines) >= 30 and len(configs) >= 25  # every paper row and digits run
    for argv in lines:
        done = _in_process([sys.executable, *argv, "--check"])
        assert done.returncode == 0 and "ok: train" in done.stdout, (argv, done.stderr)
    lpips = [argv for argv in lines if "lpips" in " ".join(argv) and "cd_" in " ".join(argv)]
    assert lpips and all(any("lpips_vgg=" in a for a in argv) for argv in lpips)


def test_a_bad_line_is_caught():
    (argv,) = _lines("ct_cifar10")
    done = _in_process([sys.executable, *argv, "--config.training.loss=gan", "--check"])
    assert done.returncode == 1 and "training.loss" in done.stderr
