"""Orbax checkpoints: atomic saves, keep-N, resume from the newest sound one, integrity checks."""

import collections
import json
import logging
import pathlib
import sys
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


class StructureMismatchError(ValueError):
    """The checkpoint's state differs in tree structure or shapes from the template: not corrupt.

    `differences` names the state paths (grouped) that differ; nothing was restored or moved.
    """

    def __init__(self, message: str, step: int, differences: list[str]):
        super().__init__(message)
        self.step, self.differences = step, differences


class CheckpointWriteError(RuntimeError):
    """An asynchronous checkpoint save failed (e.g. a full disk); earlier checkpoints are intact."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message', cut to `limit` characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:limit]


class _OneLineOrbaxErrors(logging.Filter):
    """Orbax logs each failure of a background save with a traceback from several threads: keep
    one line per distinct cause (the Checkpointer raises it at the next step)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname or not record.exc_info:
            return True
        cause = one_line(record.exc_info[1])
        record.msg, record.args = f"orbax: {cause}", None
        record.exc_info = record.exc_text = None
        if cause in self.seen:
            return False
        self.seen.add(cause)
        return True


class _AbandonedReads(logging.Filter):
    """Drops asyncio's 'Future exception was never retrieved' for tensorstore reads of a
    checkpoint already reported as corrupt (orbax abandons the rest of its reads; each one
    would log the same DATA_LOSS error when its future is collected)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(("Future exception", "Task exception")):
            return True
        error = record.exc_info[1] if record.exc_info else None
        text = str(error) if error is not None else message
        return not ("DATA_LOSS" in text or "tensorstore_spec" in text)


def _closed_loop_hook(previous):
    """Drops 'Event loop is closed' reports: tensorstore reads still in flight when orbax gives up
    on a truncated checkpoint complete into the closed asyncio loop, once per array."""

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook.quiet_closed_loop = True
    return hook


def _quiet_orbax() -> None:
    """One line per checkpoint event on the console, not thousands (installed once)."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OneLineOrbaxErrors) for f in absl_logger.filters):
        absl_logger.addFilter(_OneLineOrbaxErrors())
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReads) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_AbandonedReads())
    if not getattr(sys.unraisablehook, "quiet_closed_loop", False):
        sys.unraisablehook = _closed_loop_hook(sys.unraisablehook)


def _manager(directory: str | pathlib.Path, max_to_keep: int | None = None):
    _quiet_orbax()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(
        pathlib.Path(directory).absolute(), options=options, item_names=("state", "meta")
    )


def param_fingerprint(params) -> list:
    """[[path, shape], ...] of a parameter tree: identifies the network a checkpoint belongs to."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [[jax.tree_util.keystr(path), list(np.shape(leaf))] for path, leaf in flat]


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def tree_paths(tree) -> list[str]:
    """'a/b/0' per leaf: the same for a dataclass or tuple and for the dicts orbax restores."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(_key_name(k) for k in path) for path, _ in flat]


def structure(tree) -> dict[str, tuple]:
    """{path: (shape, dtype name)} of a tree of arrays or array metadata."""
    leaves = jax.tree.leaves(tree)
    return {
        p: (tuple(x.shape), np.dtype(x.dtype).name)
        for p, x in zip(tree_paths(tree), leaves, strict=True)
    }


def first_key(path: str) -> str:
    return path.split("/")[0]


def structure_differences(found: dict, want: dict, group=first_key) -> list[str]:
    """'group (what differs)' per part of the state (`group(path)`) whose arrays differ in
    paths, shapes or dtypes."""
    out = collections.defaultdict(lambda: [0, 0, 0])  # missing, extra, other shape/dtype
    for path in want.keys() - found.keys():
        out[group(path)][0] += 1
    for path in found.keys() - want.keys():
        out[group(path)][1] += 1
    for path in want.keys() & found.keys():
        if want[path] != found[path]:
            out[group(path)][2] += 1
    words = ("not in the checkpoint", "only in the checkpoint", "of another shape or dtype")
    return [
        f"{group} ({', '.join(f'{n} arrays {w}' for n, w in zip(counts, words, strict=True) if n)})"
        for group, counts in sorted(out.items())
    ]


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


def verify(tree, meta: dict) -> None:
    """Raise CorruptCheckpointError when a restored tree differs from the digest saved with it.

    The digests are compared as a multiset: a tree restored without a template has its leaves
    in another order (sorted keys) than the state that was saved.
    """
    digest, finite = integrity(tree)
    saved = meta.get("digest")
    if saved is not None and sorted(saved) != sorted(digest):
        unmatched = collections.Counter(saved)
        bad = []
        for path, d in zip(tree_paths(tree), digest, strict=True):
            if unmatched[d] > 0:
                unmatched[d] -= 1
            else:
                bad.append(path)
        raise CorruptCheckpointError(
            f"{len(bad)} of {len(digest)} arrays differ from what was saved: {bad[:3]}"
        )
    if not finite:
        raise CorruptCheckpointError("it holds non-finite values")


class Checkpointer:
    """Saves {state, meta} every call to save(); restores into a template, checking integrity.

    Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
    killed save leaves no step behind; every process calls save() and restore() (orbax
    coordinates the writes). A digest of the state saved in meta detects later corruption. A
    save runs in the background: check() raises CheckpointWriteError once it has failed.
    """

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int | None = 3):
        self.directory = pathlib.Path(directory)
        self._manager = _manager(directory, max_to_keep)
        self._pending = None  # the step of a save that may still be running

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Save `state` at `step`; a state with a non-finite leaf is refused, never written."""
        self.wait()  # a failure of the previous save is raised before another one starts
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
        self._pending = step

    def check(self) -> None:
        """CheckpointWriteError when the last save has failed; cheap while it is still running."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until the last save is written; CheckpointWriteError (one line) if it failed."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            if step is None:
                raise
            self._manager.reload()
            steps = self.all_steps()
            kept = f"checkpoint step {steps[-1]} is intact" if steps else "no checkpoint is kept"
            raise CheckpointWriteError(
                f"saving checkpoint step {step} in {self.directory} failed ({one_line(e)}); "
                f"{kept}. Free disk space (or fix the cause) and run the same command to resume"
            ) from None

    def saved_structure(self, step: int) -> dict[str, tuple]:
        """{path: (shape, dtype)} of a checkpoint's state, from its metadata (nothing restored)."""
        handler = ocp.StandardCheckpointHandler()
        return structure(handler.metadata(self.directory / str(step) / "state"))

    def restore(self, step: int, template, expected_meta: dict | None = None):
        """Restore `step` into the (abstract) template, after checking it holds the same network
        and a state of the template's structure (StructureMismatchError, before any restore).

        Raises CorruptCheckpointError when the restored state does not match its saved digest.
        """
        meta = self.read_meta(step)
        if expected_meta is not None:
            check_same_model(meta, expected_meta, f"{self.directory} step {step}")
        differences = structure_differences(self.saved_structure(step), structure(template))
        if differences:
            raise StructureMismatchError(
                f"checkpoint step {step} in {self.directory} holds a state of another structure "
                f"than this config's: {'; '.join(differences)}",
                step,
                differences,
            )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(template))
        state = self._manager.restore(step, args=args)["state"]
        verify(state, meta)
        return state, meta

    def restore_raw(self, step: int):
        """(state as saved: nested dicts of host arrays, meta), integrity-checked; no template."""
        meta = self.read_meta(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        state = self._manager.restore(step, args=args)["state"]
        verify(state, meta)
        return state, meta

    def restore_latest(self, template, expected_meta: dict | None = None, *, restore=None):
        """(state, meta, step) of the newest sound checkpoint, or None when there is none.

        An unreadable, partial or corrupt checkpoint is skipped for the previous one; once a
        sound one is found, the skipped ones are reported (one line each) and moved to
        `corrupt/` beside the steps (kept for inspection, out of orbax's way). When none is
        sound, CorruptCheckpointError is raised and nothing is moved. Another network
        (ModelMismatchError) or another state structure (StructureMismatchError) is not
        corruption: raised at once, nothing moved. `restore(step)` replaces self.restore.
        """
        restore = restore or (lambda step: self.restore(step, template, expected_meta))
        failed = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = restore(step)
            except (ModelMismatchError, StructureMismatchError):
                raise
            except Exception as e:
                failed.append((step, e))
                continue
            for bad, e in failed:
                moved = self._quarantine(bad)
                if jax.process_index() == 0:
                    print(
                        f"WARNING: checkpoint step {bad} in {self.directory} is corrupt or "
                        f"incomplete ({one_line(e)}); moved it to {moved} and falling back to "
                        f"the previous checkpoint, step {step}",
                        flush=True,
                    )
            return state, meta, step
        if failed:
            causes = "; ".join(f"step {s}: {one_line(e, 200)}" for s, e in failed)
            raise CorruptCheckpointError(
                f"no sound checkpoint in {self.directory} ({causes}); nothing was moved. "
                "Inspect or move them away to start afresh"
            )
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
        try:
            self.wait()
        finally:
            self._manager.close()


def check_same_model(found: dict, expected: dict, where: str) -> None:
    """Raise a clear error when a checkpoint was written by another network than the config's."""
    if found.get("model") != expected.get("model") or found.get("params") != expected.get("params"):
        raise ModelMismatchError(
            f"the checkpoint at {where} holds a {found.get('model')!r} network whose parameters "
            f"differ from the {expected.get('model')!r} network this config builds; use a fresh "
            "--workdir or the config the checkpoint was trained with"
        )


def _ema_copy(state, ema_index: int):
    emas = state["ema_params"]
    emas = [emas[k] for k in sorted(emas, key=int)] if isinstance(emas, dict) else list(emas)
    if not 0 <= ema_index < len(emas):
        raise ValueError(f"ema_index {ema_index} out of range: the checkpoint has {len(emas)}")
    return emas[ema_index]


def load_params(directory: str | pathlib.Path, *, ema_index: int = 0, step: int | None = None):
    """(EMA params (copy `ema_index`), meta, step) of a checkpoint dir, without a template.

    Used for CD teachers, sampling, editing and evaluation: optimiser state and online params
    are not needed. The state is checked against its saved digest. With step None the newest
    sound checkpoint is used (a corrupt or partial newer one is skipped with a one-line
    warning and left in place); an explicit step that is corrupt raises CorruptCheckpointError.
    """
    directory = pathlib.Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    ckpt = Checkpointer(directory, max_to_keep=None)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{directory} holds no checkpoint")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{directory} has no checkpoint step {step} (it has {steps})")
        for s in [step] if step is not None else reversed(steps):
            try:
                state, meta = ckpt.restore_raw(s)
            except Exception as e:
                if step is not None:
                    raise CorruptCheckpointError(
                        f"checkpoint step {s} in {directory} is corrupt or incomplete "
                        f"({one_line(e)}); choose another step (it has {steps}) or -1 for the "
                        "newest sound one"
                    ) from None
                if jax.process_index() == 0:
                    print(
                        f"WARNING: checkpoint step {s} in {directory} is corrupt or incomplete "
                        f"({one_line(e)}); using the previous one",
                        flush=True,
                    )
                continue
            return _ema_copy(state, ema_index), meta, s
        raise CorruptCheckpointError(f"no sound checkpoint in {directory} (steps {steps})")
    finally:
        ckpt.close()


def write_json(path: str | pathlib.Path, obj: Any) -> None:
    """Write JSON atomically (write a temporary file, then rename)."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)
