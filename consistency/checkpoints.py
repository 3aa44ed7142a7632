"""Orbax checkpoints: atomic saves, keep-N, resume from the latest, checks of what is restored."""

import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _manager(directory: str | pathlib.Path, max_to_keep: int | None = None):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(
        pathlib.Path(directory).absolute(), options=options, item_names=("state", "meta")
    )


def param_fingerprint(params) -> list:
    """[[path, shape], ...] of a parameter tree: identifies the network a checkpoint belongs to."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [[jax.tree_util.keystr(path), list(np.shape(leaf))] for path, leaf in flat]


class Checkpointer:
    """Saves {state, meta} every call to save(); restores the latest one into a template."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int | None = 3):
        self.directory = pathlib.Path(directory)
        self._manager = _manager(directory, max_to_keep)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, template, expected_meta: dict | None = None):
        """Restore `step` into the (abstract) template, after checking it holds the same network."""
        meta = self.read_meta(step)
        if expected_meta is not None:
            check_same_model(meta, expected_meta, f"{self.directory} step {step}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(template))
        return self._manager.restore(step, args=args)["state"], meta

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def check_same_model(found: dict, expected: dict, where: str) -> None:
    """Raise a clear error when a checkpoint was written by another network than the config's."""
    if found.get("model") != expected.get("model") or found.get("params") != expected.get("params"):
        raise ValueError(
            f"the checkpoint at {where} holds a {found.get('model')!r} network whose parameters "
            f"differ from the {expected.get('model')!r} network this config builds; use a fresh "
            "--workdir or the config the checkpoint was trained with"
        )


def load_params(directory: str | pathlib.Path, *, ema_index: int = 0, step: int | None = None):
    """EMA params (copy `ema_index`) of a checkpoint dir, and its meta, without a template.

    Used for CD teachers and for sampling: optimiser state and online params are not needed.
    """
    directory = pathlib.Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    manager = _manager(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory} holds no checkpoint")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    emas = restored["state"]["ema_params"]
    emas = [emas[k] for k in sorted(emas, key=int)] if isinstance(emas, dict) else list(emas)
    if not 0 <= ema_index < len(emas):
        raise ValueError(f"ema_index {ema_index} out of range: the checkpoint has {len(emas)}")
    manager.close()
    return emas[ema_index], meta, step


def write_json(path: str | pathlib.Path, obj: Any) -> None:
    """Write JSON atomically (write a temporary file, then rename)."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)
