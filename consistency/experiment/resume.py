"""Resuming a run: what a checkpoint records, the teacher and start checkpoints it loads, the
restore of the newest sound checkpoint (or a changed one, re-initialising what changed) and the
record of each run in the workdir."""

import json
import pathlib
import subprocess
import time

import jax

from consistency.experiment import methods, update
from consistency.experiment.train_state import TrainState
from consistency.io import checkpoints, sharding


class ResumeMismatchError(ValueError):
    """The workdir's checkpoint holds a state of another structure than this config builds."""


def checkpoint_meta(config, expected_params) -> dict:
    """What a checkpoint records of what it is: network, parameter fingerprint, method."""
    loss = config.training.loss
    return {
        "model": config.model.name,
        "params": expected_params,
        "method": loss,
        "samples_as": methods.row(loss).samples_as,
        "parameterization": config.model.parameterization,
    }


def check_teacher(meta: dict, config, where) -> None:
    """A teacher is a diffusion model: an 'edm' (or, VP, 'ddpm') run with the student's
    parameterization (the teacher's network is applied with the student's scalings)."""
    wanted = config.model.parameterization
    method, found = meta.get("method"), meta.get("parameterization")
    if method is None:  # written before checkpoints recorded what they are
        if jax.process_index() == 0:
            print(
                f"WARNING: teacher checkpoint {where} does not record its method (an older "
                f"checkpoint); assuming a training.loss='edm' run with "
                f"model.parameterization={wanted!r}",
                flush=True,
            )
        return
    if method not in methods.TEACHERS or found != wanted:
        raise checkpoints.ModelMismatchError(
            f"training.teacher_checkpoint {where} holds a training.loss={method!r} model "
            f"(samples as {meta.get('samples_as')!r}, model.parameterization={found!r}); a "
            f"{config.training.loss!r} teacher must be a diffusion model: a training.loss='edm' "
            f"run (VP: 'ddpm') with model.parameterization={wanted!r}"
        )


def load_teacher(config, network, expected_params):
    """Frozen EMA params of the CD teacher's checkpoint, checked against the configured network."""
    t = config.training
    params, meta, step = checkpoints.load_params(
        t.teacher_checkpoint, ema_index=t.teacher_ema_index
    )
    found = {"model": meta.get("model"), "params": meta.get("params")}
    checkpoints.check_same_model(
        found, {"model": config.model.name, "params": expected_params}, t.teacher_checkpoint
    )
    check_teacher(meta, config, t.teacher_checkpoint)
    if jax.process_index() == 0:
        print(f"teacher: {t.teacher_checkpoint} step {step} (EMA copy {t.teacher_ema_index})")
    return params


def load_start(config, expected_params, mesh):
    """training.init_checkpoint's EMA copy (training.init_ema_index): the params, target and EMA
    copies this run starts from (LCF: a guided_cd student's, guidance_proj included). It must
    hold this very network (model and parameter fingerprint) and parameterization."""
    t = config.training
    params, meta, step = checkpoints.load_params(t.init_checkpoint, ema_index=t.init_ema_index)
    wanted, method = config.model.parameterization, meta.get("method")
    if meta.get("model") != config.model.name or meta.get("params") != expected_params:
        raise checkpoints.ModelMismatchError(
            f"training.init_checkpoint {t.init_checkpoint} holds a {meta.get('model')!r} network "
            f"(training.loss={method!r}) of other parameters than this config's "
            f"{config.model.name!r}: give the run the checkpoint's network (its model.* and "
            "data.* overrides; LCF: model.guidance_embed_dim of the guided student)"
        )
    if meta.get("parameterization", wanted) != wanted:
        raise checkpoints.ModelMismatchError(
            f"training.init_checkpoint {t.init_checkpoint} holds a training.loss={method!r} "
            f"model of model.parameterization={meta.get('parameterization')!r}; this run's is "
            f"{wanted!r}"
        )
    if jax.process_index() == 0:
        print(f"start: {t.init_checkpoint} step {step} ({method}, EMA copy {t.init_ema_index})")
    return jax.device_put(params, sharding.tree_sharding(mesh, params))


def _group(path: str) -> str:
    """The parts of the state that are kept or re-initialised as a whole: each EMA copy alone."""
    parts = path.split("/")
    return "/".join(parts[:2]) if parts[0] == "ema_params" and len(parts) > 1 else parts[0]


def _merge(raw, template, fresh) -> tuple[TrainState, dict]:
    """The template's state from a restored tree of another structure: each part whose arrays
    all match is kept; a target or EMA copy that does not starts from the restored params; the
    rest (an optimiser state of another structure) is fresh. Returns (state, {part: how})."""
    found = dict(zip(checkpoints.tree_paths(raw), jax.tree.leaves(raw), strict=True))
    have, want = checkpoints.structure(raw), checkpoints.structure(template)
    paths = checkpoints.tree_paths(template)
    whole = {}
    for g in {_group(p) for p in paths}:
        mine = [p for p in paths if _group(p) == g]
        theirs = [p for p in have if _group(p) == g]
        whole[g] = len(mine) == len(theirs) and all(have.get(p) == want[p] for p in mine)
    values, reinit = [], {}
    for path, new in zip(paths, jax.tree.leaves(fresh), strict=True):
        g = _group(path)
        source = "params" + path[len(g) :]
        if whole[g]:
            values.append(found[path])
        elif g.startswith(("ema_params", "target_params")) and have.get(source) == want[path]:
            values.append(found[source])
            reinit[g] = "from the restored params"
        else:
            values.append(new)
            reinit[g] = "fresh"
    shardings = jax.tree.map(lambda a: a.sharding, template)
    state = jax.tree.unflatten(jax.tree.structure(template), values)
    return jax.device_put(state, shardings), reinit


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def recorded_config(workdir: pathlib.Path) -> tuple[dict | None, str]:
    """(config, where) of the workdir's last started run: runs.jsonl, else an older config.json."""
    runs = workdir / "runs.jsonl"
    if runs.exists():
        lines = [line for line in runs.read_text().splitlines() if line.strip()]
        if lines:
            return json.loads(lines[-1])["config"], str(runs)
    path = workdir / "config.json"
    return (json.loads(path.read_text()), str(path)) if path.exists() else (None, "")


def config_changes(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every config key whose value differs (absent keys included)."""
    a, b = _flat(old), _flat(new)
    gone = "(absent)"
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, gone) != b.get(k, gone))
    return [f"{k}: {a.get(k, gone)!r} -> {b.get(k, gone)!r}" for k in keys]


def _mismatch(config, workdir, checkpointer, template, error) -> ResumeMismatchError:
    """The refusal naming the changed config keys and the parts of the state that differ."""
    found = checkpointer.saved_structure(error.step)
    parts = checkpoints.structure_differences(found, checkpoints.structure(template), _group)
    old, where = recorded_config(workdir)
    changed = config_changes(old, _config_json(config)) if old is not None else []
    keys = "; ".join(changed[:12]) + (" ..." if len(changed) > 12 else "") or "none"
    if old is None:
        keys = "unknown (no recorded config in the workdir)"
    return ResumeMismatchError(
        f"cannot resume from checkpoint step {error.step} in {checkpointer.directory}: its state "
        f"differs in structure from the one this config builds: {'; '.join(parts)}. Config keys "
        f"that differ from the run's recorded config ({where or 'none'}): {keys}. Nothing was "
        "restored or moved. To continue from its params, target and EMA copies with what "
        "changed re-initialised (a fresh optimiser state; a new EMA copy starts from the "
        "params), add --config.training.resume_reinit_changed=True; or use a fresh --workdir"
    )


def restore_or_init(config, workdir, network, tx, mesh, teacher, checkpointer, meta, template):
    """(state, what a changed resume re-initialised or None): the newest sound checkpoint
    (corrupt ones are reported and skipped), else a fresh state (training.init_checkpoint's).

    A checkpoint whose state differs in structure (another optimiser, another number of EMA
    copies) stops the run (ResumeMismatchError), unless training.resume_reinit_changed.
    """
    shardings = jax.tree.map(lambda a: a.sharding, template)

    def fresh():  # training.init_checkpoint is read only when the run starts afresh
        start = (
            load_start(config, meta["params"], mesh) if config.training.init_checkpoint else None
        )
        return update.init_state(
            config, network, tx, mesh, teacher, start=start, shardings=shardings
        )

    notes = {}

    def changed(step):  # a restore into the template's structure from another one
        checkpoints.check_same_model(
            checkpointer.read_meta(step), meta, f"{checkpointer.directory} step {step}"
        )
        raw, found_meta = checkpointer.restore_raw(step)
        state, notes[step] = _merge(raw, template, fresh())
        return state, found_meta

    try:
        found = checkpointer.restore_latest(template, meta)
    except checkpoints.StructureMismatchError as e:
        if not config.training.resume_reinit_changed:
            raise _mismatch(config, workdir, checkpointer, template, e) from None
        found = checkpointer.restore_latest(template, meta, restore=changed)
    if found is None:
        return fresh(), None
    state, _, step = found
    note = notes.get(step)
    if jax.process_index() == 0:
        print(f"resumed from step {step} in {checkpointer.directory}", flush=True)
        if note:
            what = ", ".join(f"{g} ({how})" for g, how in sorted(note.items()))
            print(
                f"training.resume_reinit_changed: the checkpoint's state differs in structure; "
                f"kept every part that matches, re-initialised {what}",
                flush=True,
            )
    return state, note


def _commit() -> str | None:
    """The code's git commit (with '+' when the tree has changes), if git answers quickly."""
    repo = pathlib.Path(__file__).resolve().parents[2]
    try:
        run = lambda *a: subprocess.run(
            ["git", "-C", str(repo), *a], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        return run("rev-parse", "HEAD") + ("+" if run("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def record_run(workdir: pathlib.Path, config, step: int, note: dict | None) -> None:
    """Append the run to WORKDIR/runs.jsonl (config, start step, time, commit); config.json
    holds the latest. Written once the run has started: a refused run leaves both alone."""
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "start_step": step,
        "commit": _commit(),
        "config": _config_json(config),
    }
    if note:
        record["resume_reinit_changed"] = note
    with open(workdir / "runs.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    checkpoints.write_json(workdir / "config.json", record["config"])
