"""Orbax checkpoints: atomic saves, keep-N, resume from the newest sound one, integrity checks."""

import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# Odd multipliers of the index along each axis in the digest's position weights.
_MIX = (2654435761, 2246822519, 3266489917, 668265263, 374761393, 3144134277)


class ModelMismatchError(ValueError):
    """The checkpoint holds another network than the configured one."""


class NonFiniteStateError(ValueError):
    """A state with a NaN or infinity, which is never written."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint whose contents differ from what was saved, or that holds non-finite values."""


def _manager(directory: str | pathlib.Path, max_to_keep: int | None = None):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(
        pathlib.Path(directory).absolute(), options=options, item_names=("state", "meta")
    )


def param_fingerprint(params) -> list:
    """[[path, shape], ...] of a parameter tree: identifies the network a checkpoint belongs to."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [[jax.tree_util.keystr(path), list(np.shape(leaf))] for path, leaf in flat]


def _owned_shards(x: jax.Array):
    """(numpy data, index offsets) of each shard of x this process owns (one replica of each)."""
    for shard in x.addressable_shards:
        if shard.replica_id == 0:
            offsets = tuple(s.indices(n)[0] for s, n in zip(shard.index, x.shape, strict=True))
            yield np.asarray(shard.data), offsets


def _piece_digest(a: np.ndarray, offsets) -> int:
    """sum_i bits_i (1 + sum_k M_k idx_k,i) mod 2^32; floats as float32 bits, ints as int32.

    Linear in the bits, so the pieces of a sharded array add up to the whole array's digest.
    """
    if jnp.issubdtype(a.dtype, jnp.floating):
        w = np.ascontiguousarray(a, np.float32).view(np.uint32)
    else:
        w = np.ascontiguousarray(a).astype(np.int32).view(np.uint32)
    digest = int(np.sum(w, dtype=np.uint32))
    for k, offset in enumerate(offsets):
        along = np.sum(w, axis=tuple(j for j in range(w.ndim) if j != k), dtype=np.uint32)
        index = np.arange(offset, offset + w.shape[k], dtype=np.uint32)
        digest += _MIX[k % len(_MIX)] * int(np.sum(along * index, dtype=np.uint32))
    return digest % 2**32


def _all_finite(a: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(a))) if jnp.issubdtype(a.dtype, jnp.floating) else True


def integrity(tree) -> tuple[list[int], bool]:
    """(digest per leaf, all finite), computed on the host from each process's own shards.

    The digest is a position-weighted uint32 sum of every leaf's bits: exact in any order, so
    it does not depend on the device count or sharding; a state restored on another mesh has
    the digest it was saved with. All processes must call it together.
    """
    leaves = jax.tree.leaves(tree)
    whole = [not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves]
    # One transfer for all that this process sees whole; shards only for multi-host arrays.
    host = iter(jax.device_get([x for x, w in zip(leaves, whole, strict=True) if w]))
    digests, finite = [], True
    for leaf, w in zip(leaves, whole, strict=True):
        if not w:
            pieces = list(_owned_shards(leaf))
        else:  # counted once: by process 0 when several processes add up their pieces
            a = np.asarray(next(host))
            pieces = [(a, (0,) * a.ndim)] if jax.process_index() == 0 else []
        digests.append(sum(_piece_digest(a, o) for a, o in pieces) % 2**32)
        finite = finite and all(_all_finite(a) for a, _ in pieces)
    if jax.process_count() > 1:
        local = np.asarray([*digests, not finite], np.uint32)
        gathered = multihost_utils.process_allgather(local)
        digests = [int(v) for v in np.sum(gathered[:, :-1], axis=0, dtype=np.uint32)]
        finite = not np.any(gathered[:, -1])
    return digests, finite


class Checkpointer:
    """Saves {state, meta} every call to save(); restores into a template, checking integrity.

    Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
    killed save leaves no step behind; every process calls save() and restore() (orbax
    coordinates the writes). A digest of the state saved in meta detects later corruption.
    """

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int | None = 3):
        self.directory = pathlib.Path(directory)
        self._manager = _manager(directory, max_to_keep)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Save `state` at `step`; a state with a non-finite leaf is refused, never written."""
        leaves = jax.tree.leaves(state)
        if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
            # One host transfer, shared by the digest and the write. Orbax saving arrays
            # replicated over many devices compiles a slice per array (33 s for the digits
            # state on 8 CPU devices, 0.5 s this way); restore() still places the values with
            # the template's shardings.
            state = jax.device_get(state)
        digest, finite = integrity(state)
        if not finite:
            raise NonFiniteStateError(f"refusing to save a non-finite state at step {step}")
        meta = dict(meta, digest=digest)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, template, expected_meta: dict | None = None):
        """Restore `step` into the (abstract) template, after checking it holds the same network.

        Raises CorruptCheckpointError when the restored state does not match its saved digest.
        """
        meta = self.read_meta(step)
        if expected_meta is not None:
            check_same_model(meta, expected_meta, f"{self.directory} step {step}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(template))
        state = self._manager.restore(step, args=args)["state"]
        digest, finite = integrity(state)
        saved = meta.get("digest")
        if saved is not None and saved != digest:
            paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
            bad = [p for p, a, b in zip(paths, saved, digest, strict=False) if a != b]
            raise CorruptCheckpointError(
                f"{len(bad)} of {len(digest)} arrays differ from what was saved: {bad[:3]}"
            )
        if not finite:
            raise CorruptCheckpointError("it holds non-finite values")
        return state, meta

    def restore_latest(self, template, expected_meta: dict | None = None):
        """(state, meta, step) of the newest sound checkpoint, or None when there is none.

        An unreadable, partial or corrupt checkpoint is reported, moved to `corrupt/` beside the
        steps (kept for inspection, out of orbax's way) and the previous one is tried.
        """
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, template, expected_meta)
            except ModelMismatchError:
                raise
            except Exception as e:
                moved = self._quarantine(step)
                if jax.process_index() == 0:
                    print(
                        f"WARNING: checkpoint step {step} in {self.directory} is corrupt or "
                        f"incomplete ({type(e).__name__}: {str(e)[:300]}); moved it to {moved} "
                        "and falling back to the previous checkpoint",
                        flush=True,
                    )
                continue
            return state, meta, step
        return None

    def _quarantine(self, step: int) -> pathlib.Path:
        dest = self.directory / "corrupt" / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self._manager.reload()
        return dest

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
        raise ModelMismatchError(
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
