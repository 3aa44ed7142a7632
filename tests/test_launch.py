"""launch.sh: every line, as printed with its paths set, validates (--check, in-process)."""

import os
import pathlib
import re
import runpy
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
        mode = next((a.split("=", 1)[1] for a in argv if a.startswith("--mode=")), "train")
        assert done.returncode == 0 and f"ok: {mode}" in done.stdout, (argv, done.stderr)
    lpips = [argv for argv in lines if "lpips" in " ".join(argv) and "cd_" in " ".join(argv)]
    assert lpips and all(any("lpips_vgg=" in a for a in argv) for argv in lpips)


def test_a_bad_line_is_caught():
    (argv,) = _lines("ct_cifar10")
    done = _in_process([sys.executable, *argv, "--config.training.loss=gan", "--check"])
    assert done.returncode == 1 and "training.loss" in done.stderr


def _readme_rows() -> list[tuple[str, str]]:
    """(launch name, FID protocol) of every row of the README's table-row reproduction table."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Each table row:", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[1].startswith("`") or cells[0] == "table row":
            continue
        for spec in re.findall(r"`([^`]+)`", cells[1]):
            stem, _, alts = spec.partition("{")
            names = [stem + a for a in alts.rstrip("}").split(",")] if alts else [spec]
            rows += [(name, cells[4]) for name in names]
    return rows


def test_readme_reproduction_table_names_real_lines_and_their_protocol():
    rows = _readme_rows()
    assert len(rows) >= 17
    protocol, reference = "clean_legacy", ""
    for name, column in rows:
        (argv,) = _lines(name)
        config_arg = next(a for a in argv if a.startswith("--config="))[len("--config=") :]
        path, _, arg = config_arg.partition(":")
        module = runpy.run_path(str(REPO / path))
        config = module["get_config"](arg) if arg else module["get_config"]()
        if column != "as above":
            protocol = column.split(",")[0].strip("` ")
            npz = re.findall(r"`(\w+\.npz)`", column)
            reference = npz[0] if npz else ""
        assert config.eval.resize == protocol, (name, config.eval.resize, column)
        assert config.eval.reference.endswith(reference), (name, config.eval.reference, column)
        assert bool(config.eval.reference) == bool(reference), (name, config.eval.reference)
