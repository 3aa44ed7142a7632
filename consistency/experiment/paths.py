"""What a mode needs of the file system, checked before it runs: inputs, checkpoints, outputs."""

import functools
import hashlib
import json
import os
import pathlib
import sys

from consistency.experiment import methods
from consistency.io import data

_LPIPS_FILES = {
    "lpips_vgg": "the torchvision VGG16 state dict (vgg16-397923af.pth)",
    "lpips_lin": "the LPIPS v0.1 heads (lpips weights/v0.1/vgg.pth)",
}


def _file(path: str, key: str, what: str) -> list[str]:
    if not path:
        return [f"{key}: give {what}"]
    if not pathlib.Path(path).exists():
        return [f"{key}: no such path {path!r}"]
    return []


def checkpoint_steps(directory: pathlib.Path) -> list[int]:
    """The finished steps of an orbax checkpoint dir (its integer-named subdirectories)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _checkpoint_dir(directory: pathlib.Path, key: str) -> list[str]:
    """Problems of a checkpoint dir: missing, a file, no steps; a run dir suggests checkpoints/."""
    if directory.is_file():
        return [f"{key}: {directory} is a file, not a checkpoint directory"]
    if not directory.exists():
        return [f"{key}: no checkpoint directory at {directory}"]
    if not checkpoint_steps(directory):
        if checkpoint_steps(directory / "checkpoints"):
            return [f"{key}: {directory} is a run directory; give {directory / 'checkpoints'}"]
        return [f"{key}: {directory} holds no checkpoint"]
    return []


def _teacher_network(config, directory: pathlib.Path) -> list[str]:
    """A teacher of another network than the student's (model.*, data.*) cannot teach it."""
    from consistency.experiment import networks, sample  # here: sample imports spec, spec this
    from consistency.io import checkpoints

    step = checkpoint_steps(directory)[-1]
    try:
        meta = json.loads((directory / str(step) / "meta" / "metadata").read_text())
    except (OSError, ValueError):
        return []  # an unreadable checkpoint: train's restore reports it
    # A guided student's teacher is its network without the guidance input.
    expected = sample.abstract_params(config, networks.build_network(config).unguided())
    same = meta.get("model") == config.model.name
    if same and meta.get("params") == checkpoints.param_fingerprint(expected):
        return []
    return [
        f"training.teacher_checkpoint: {directory} step {step} holds a {meta.get('model')!r} "
        f"network of other parameters than this config's {config.model.name!r} student; give the "
        "student the teacher's network (its model.* and data.* overrides) or another teacher"
    ]


def _workdir_checkpoints(workdir: pathlib.Path, key: str, wanted: list[int]) -> list[str]:
    """--workdir of sample/edit/eval: WORKDIR/checkpoints holds a checkpoint (and the steps)."""
    ckpt = workdir / "checkpoints"
    if workdir.is_file():
        return [f"--workdir={workdir} is a file; give the run directory (with checkpoints/)"]
    if not workdir.exists():
        return [f"--workdir={workdir} does not exist; give a run directory (with checkpoints/)"]
    if not ckpt.exists() and checkpoint_steps(workdir):
        return [f"--workdir={workdir} is a checkpoint directory; give its run dir {workdir.parent}"]
    problems = _checkpoint_dir(ckpt, "--workdir")
    steps = checkpoint_steps(ckpt)
    missing = [s for s in wanted if s >= 0 and s not in steps]
    if not problems and missing:
        problems.append(f"{key}: no step {missing} in {ckpt}; it holds steps {steps}")
    return problems


def _writable(path: pathlib.Path, key: str) -> list[str]:
    """The output dir can be made: no file in its way, and its nearest existing parent writable."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                return [f"{key}: cannot write to {path}: {parent} is a file"]
            if not os.access(parent, os.W_OK | os.X_OK):
                return [f"{key}: cannot write to {path}: {parent} is not writable"]
            return []
    return []


def _prepared_imagenet(config) -> list[str]:
    """data.folder (data.name='imagenet64'): a folder `python -m consistency.io.prepare` wrote."""
    folder = config.data.folder
    if folder and (pathlib.Path(folder) / "prepared.json").is_file():
        return []
    return [
        f"data.folder={folder!r}: data.name='imagenet64' reads ImageNet as ADM prepared it; "
        "prepare it once with python -m consistency.io.prepare --dataset=imagenet64 "
        "--source=ILSVRC2012_img_train.tar --out=DIR and pass --config.data.folder=DIR "
        "(or use data.name='imagenet64_chrabaszcz', tfds' box-resized set)"
    ]


def _image_folder(config) -> list[str]:
    """data.folder (data.name='image_folder'): readable images of the right channels, or why not."""
    d = config.data
    if not d.folder:
        return ["data.folder: give the image directory for data.name='image_folder'"]
    try:
        report = data.scan_folder(d.folder, num_channels=d.num_channels, image_size=d.image_size)
    except (OSError, ValueError) as e:
        return [str(e)]
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return list(report.problems)


def problems(config, *, mode: str, workdir: str | None = None) -> list[str]:
    """Every input the mode needs and cannot find, and every output it could not write."""
    t, e = config.training, config.eval
    work = pathlib.Path(workdir) if workdir else None
    out = []
    if work is not None and work.exists() and not work.is_dir():
        out.append(f"--workdir={work} is a file, not a directory")
        work = None
    if mode == "train":
        if methods.row(t.loss).needs_teacher or t.init_from_teacher or t.teacher_checkpoint:
            why = f"the teacher's checkpoint dir (training.loss={t.loss!r}" + (
                ", training.init_from_teacher)" if t.init_from_teacher else ")"
            )
            found = _file(t.teacher_checkpoint, "training.teacher_checkpoint", why)
            key = "training.teacher_checkpoint"
            found = found or _checkpoint_dir(pathlib.Path(t.teacher_checkpoint), key)
            out += found or _teacher_network(config, pathlib.Path(t.teacher_checkpoint))
        if t.init_checkpoint:  # its network is checked against this one's when it is read
            key = "training.init_checkpoint"
            out += _checkpoint_dir(pathlib.Path(t.init_checkpoint), key)
        if t.distance == "lpips":
            for key, what in _LPIPS_FILES.items():
                out += _file(t[key], f"training.{key}", what + " for training.distance='lpips'")
    if mode in ("train", "eval") and config.data.name == "imagenet64":
        if mode == "train" or not e.reference:
            out += _prepared_imagenet(config)
    if mode in ("train", "eval") and config.data.name == "image_folder":
        if mode == "train" or not e.reference:
            out += _image_folder(config)
    if mode == "eval" and e.features == "inception":
        what = "pytorch-fid's pt_inception-2015-12-05-6726825d.pth for eval.features='inception'"
        out += _file(e.inception_path, "eval.inception_path", what)
    if mode == "eval" and e.reference:
        out += _file(e.reference, "eval.reference", "an ADM reference batch or mu/sigma npz")
    if mode == "edit" and config.edit.task != "interpolate":
        what = "a folder of PNGs or an .npz (arr_0 uint8 NHWC)"
        out += _file(config.edit.input, "edit.input", what)
    if mode == "edit" and config.edit.mask:
        out += _file(config.edit.mask, "edit.mask", "a PNG mask (white = known)")
    if work is None or mode in ("train", "encode"):
        return out
    wanted = {
        "sample": ("sampling.checkpoint_step", [config.sampling.checkpoint_step]),
        "edit": ("edit.checkpoint_step", [config.edit.checkpoint_step]),
        "eval": ("eval.checkpoint_steps", list(e.checkpoint_steps)),
    }[mode]
    out += _workdir_checkpoints(work, *wanted)
    outputs = {
        "sample": ("--workdir", work / "samples"),
        "edit": ("edit.out", pathlib.Path(config.edit.out or work / "edits" / config.edit.task)),
        "eval": ("--workdir", work / "eval"),
    }
    out += _writable(outputs[mode][1], outputs[mode][0])
    if mode == "eval" and e.cache_dir:
        out += _writable(pathlib.Path(e.cache_dir), "eval.cache_dir")
    return out


def file_digest(path) -> str:
    """sha256 (16 hex digits) of a file's bytes, cached by (path, size, mtime)."""
    st = pathlib.Path(path).stat()
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:16]
