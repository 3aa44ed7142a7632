"""Discovery of the reference fixtures listed in MANIFEST.json, one test case per fixture."""

import json
import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def fixture_dir() -> pathlib.Path:
    """The fixture directory: $CONSISTENCY_FIXTURES, else ../shared/fixtures from the repo root."""
    env = os.environ.get("CONSISTENCY_FIXTURES")
    return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures"


def cases(kind: str) -> list:
    """pytest params, one per fixture of `kind`: each a dict {name, files: {suffix: path}}."""
    manifest_path = fixture_dir() / "MANIFEST.json"
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"no fixture manifest at {manifest_path}; set CONSISTENCY_FIXTURES to the fixture dir"
        )
    entries = json.loads(manifest_path.read_text())["kinds"].get(kind, [])
    if not entries:
        raise LookupError(f"MANIFEST.json lists no fixtures of kind {kind!r}")
    out = []
    for entry in entries:
        files = {}
        for f in entry["files"]:
            name = pathlib.Path(f).name
            suffix = name[len(entry["name"]) :] if name.startswith(entry["name"]) else name
            files[suffix] = fixture_dir() / f
        out.append(pytest.param({"name": entry["name"], "files": files}, id=entry["name"]))
    return out
