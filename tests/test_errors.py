"""Bad inputs to every command: one line naming the key or file, no traceback, nothing written."""

import concurrent.futures
import contextlib
import io
import os
import pathlib
import subprocess
import sys
import traceback
import zipfile

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from configs import test as test_config
from consistency.experiment import cli, networks, sample
from consistency.experiment.train_state import TrainState
from consistency.io import checkpoints, data, image_io

REPO = pathlib.Path(__file__).resolve().parents[1]
T = "--config=configs/test.py"
ADM = [  # a tiny ADM: cm-pt conversions get as far as reading the file
    "--config=configs/cd_imagenet64.py:l2",
    "--config.data.image_size=8",
    "--config.model.adm.model_channels=32",
    "--config.model.adm.channel_mult=(1,)",
    "--config.model.adm.num_res_blocks=1",
    "--config.model.adm.num_head_channels=32",
    "--config.model.adm.attention_resolutions=()",
]

# (id, command, arguments ({name} = a fixture path), what the message names)
CASES = [
    ("unknown-key", "train", [T, "--config.training.bogus_key=1"], "training.bogus_key"),
    ("unknown-section", "train", [T, "--config.trainingx.batch_size=2"], "trainingx"),
    ("no-config-file", "train", ["--config=configs/nope.py"], "configs/nope.py"),
    ("config-arg", "train", ["--config=configs/cd_cifar10.py:bogus"], "unknown CD metric"),
    ("bad-type", "train", [T, "--config.training.batch_size=abc"], "training.batch_size"),
    ("batch-0", "train", [T, "--config.training.batch_size=0"], "training.batch_size"),
    ("bad-mode", "train", [T, "--mode=bogus"], "--mode"),
    ("sigma-order", "train", [T, "--config.model.sigma_min=100.0"], "model.sigma_min"),
    ("optimizer", "train", [T, "--config.optim.optimizer=sgdx"], "optim.optimizer"),
    ("steps-multiple", "train", [T, "--config.training.n_jitted_steps=3"], "training.num_steps"),
    ("workdir-file", "train", [T, "--workdir={file}"], "is a file"),
    ("cd-no-teacher", "train", [T, "--config.training.loss=cd"], "training.teacher_checkpoint"),
    (
        "teacher-missing",
        "train",
        [T, "--config.training.loss=cd", "--config.training.teacher_checkpoint={root}/nope"],
        "no such path",
    ),
    (
        "teacher-run-dir",
        "train",
        [T, "--config.training.loss=cd", "--config.training.teacher_checkpoint={run}"],
        "checkpoints",
    ),
    (
        "teacher-other-net",
        "train",
        [
            T,
            "--config.training.loss=cd",
            "--config.training.teacher_checkpoint={other}/checkpoints",
        ],
        "teacher's network",
    ),
    ("folder-unset", "train", [T, "--config.data.name=image_folder"], "data.folder"),
    (
        "folder-missing",
        "train",
        [T, "--config.data.name=image_folder", "--config.data.folder={root}/nope"],
        "data.folder",
    ),
    (
        "folder-corrupt",
        "train",
        [T, "--config.data.name=image_folder", "--config.data.folder={corrupt_folder}"],
        "bad.png",
    ),
    (
        "folder-colour",
        "train",
        [T, "--config.data.name=image_folder", "--config.data.folder={colour}"],
        "data.num_channels=1",
    ),
    ("lpips-weights", "train", [T, "--config.training.distance=lpips"], "training.lpips_vgg"),
    ("s-no-workdir", "sample", [T], "--workdir={fresh}"),
    ("s-workdir-file", "sample", [T, "--workdir={file}"], "is a file"),
    ("s-empty-workdir", "sample", [T, "--workdir={empty}"], "no checkpoint directory"),
    ("s-ckpt-dir", "sample", [T, "--workdir={run}/checkpoints"], "give its run dir"),
    ("s-step", "sample", [T, "--workdir={run}", "--config.sampling.checkpoint_step=9"], "[2]"),
    ("s-batch-0", "sample", [T, "--workdir={run}", "--config.sampling.batch_size=0"], "batch_size"),
    ("s-ema", "sample", [T, "--workdir={run}", "--config.sampling.ema_index=3"], "ema_index"),
    ("s-ts", "sample", [T, "--workdir={run}", "--config.sampling.ts=(0,99)"], "sampling.ts"),
    ("s-other-net", "sample", [T, "--workdir={other}"], "unet"),
    ("s-out-blocked", "sample", [T, "--workdir={blocked}"], "is a file"),
    ("e-task", "edit", [T, "--workdir={run}", "--config.edit.task=bogus"], "edit.task"),
    ("e-no-input", "edit", [T, "--workdir={run}", "--config.edit.task=inpaint"], "edit.input"),
    ("e-input-missing", "edit", [T, "--workdir={run}", "--config.edit.input={root}/x"], "input"),
    ("e-input-colour", "edit", [T, "--workdir={run}", "--config.edit.input={colour}"], "red.png"),
    ("e-npz-rgb", "edit", [T, "--workdir={run}", "--config.edit.input={rgb_npz}"], "rgb.npz"),
    ("e-no-pngs", "edit", [T, "--workdir={run}", "--config.edit.input={empty}"], "no .png"),
    ("e-size", "edit", [T, "--workdir={run}", "--config.edit.input={big}"], "image_size"),
    ("e-bad-png", "edit", [T, "--workdir={run}", "--config.edit.input={corrupt_folder}"], "bad"),
    ("e-garbage-npz", "edit", [T, "--workdir={run}", "--config.edit.input={bad_npz}"], "bad.npz"),
    (
        "e-mask-missing",
        "edit",
        [T, "--workdir={run}", "--config.edit.input={grey}", "--config.edit.mask={root}/m.png"],
        "edit.mask",
    ),
    (
        "e-mask-size",
        "edit",
        [T, "--workdir={run}", "--config.edit.input={grey}", "--config.edit.mask={big}/a.png"],
        "edit.mask",
    ),
    (
        "e-out-file",
        "edit",
        [T, "--workdir={run}", "--config.edit.input={grey}", "--config.edit.out={file}"],
        "edit.out",
    ),
    (
        "e-colorize-grey",
        "edit",
        [T, "--workdir={run}", "--config.edit.task=colorize", "--config.edit.input={grey}"],
        "colorize",
    ),
    ("e-no-ckpt", "edit", [T, "--workdir={empty}", "--config.edit.input={grey}"], "--workdir"),
    ("v-settings", "eval", [T, "--workdir={run}", "--config.eval.settings=()"], "eval.settings"),
    ("v-setting", "eval", [T, "--workdir={run}", "--config.eval.settings=('x',)"], "'x'"),
    ("v-step", "eval", [T, "--workdir={run}", "--config.eval.checkpoint_steps=(7,)"], "[2]"),
    ("v-features", "eval", [T, "--workdir={run}", "--config.eval.features=x"], "eval.features"),
    (
        "v-inception",
        "eval",
        [T, "--workdir={run}", "--config.eval.features=inception"],
        "eval.inception_path",
    ),
    ("v-no-ckpt", "eval", [T, "--workdir={empty}"], "no checkpoint directory"),
    ("v-reference", "eval", [T, "--workdir={run}", "--config.eval.reference={root}/r"], "eval.ref"),
    ("c-missing", "convert", [*ADM, "--checkpoint={root}/x.pt", "--out={fresh}"], "x.pt"),
    ("c-garbage", "convert", [*ADM, "--checkpoint={garbage}", "--out={fresh}"], "not a readable"),
    ("c-truncated", "convert", [*ADM, "--checkpoint={truncated}", "--out={fresh}"], "truncated"),
    ("c-source", "convert", [*ADM, "--source=x", "--checkpoint={garbage}"], "--source"),
    ("c-model", "convert", [T, "--checkpoint={garbage}", "--out={fresh}"], "model.name"),
    ("c-out-file", "convert", [*ADM, "--checkpoint={garbage}", "--out={file}"], "--out"),
    ("c-out-used", "convert", [*ADM, "--checkpoint={garbage}", "--out={run}"], "fresh --out"),
    ("c-key", "convert", [*ADM, "--config.model.bogus=1", "--out={fresh}"], "model.bogus"),
    ("c-no-out", "convert", [*ADM, "--checkpoint={garbage}"], "--out"),
]


def _save(directory, config) -> None:
    abstract = sample.abstract_params(config, networks.build_network(config))
    params = jax.tree.map(lambda a: np.full(a.shape, 0.01, a.dtype), abstract)
    state = TrainState(np.int32(2), params, params, (params,), None)
    meta = {"model": config.model.name, "params": checkpoints.param_fingerprint(abstract)}
    writer = checkpoints.Checkpointer(directory)
    writer.save(2, state, meta)
    writer.close()


def _fixtures(root: pathlib.Path) -> dict:
    """Paths the cases name: a run, a run of another network, image folders, broken files."""
    config = test_config.get_config()
    _save(root / "run" / "checkpoints", config)
    config.model.unet.channels = 16
    _save(root / "other" / "checkpoints", config)
    (root / "blocked").mkdir()
    (root / "blocked" / "checkpoints").symlink_to(root / "run" / "checkpoints")
    (root / "blocked" / "samples").write_text("a file in the way")
    (root / "file").write_text("not a directory")
    (root / "empty").mkdir()
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    for name, image in {
        "grey/a.png": grey,
        "colour/red.png": np.stack([grey, grey * 0, grey * 0], -1),
        "colour/grey.png": grey,
        "big/a.png": np.zeros((16, 16), np.uint8),
        "corrupt_folder/a.png": grey,
    }.items():
        (root / name).parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(root / name)
    (root / "corrupt_folder" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    np.savez(root / "rgb.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8) + [[[[255, 0, 0]]]])
    (root / "bad.npz").write_bytes(b"PK not really")
    (root / "garbage.pt").write_bytes(os.urandom(1000))
    with zipfile.ZipFile(root / "whole.pt", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 200)
    (root / "truncated.pt").write_bytes((root / "whole.pt").read_bytes()[:300])
    paths = {p.stem if p.suffix else p.name: str(p) for p in root.iterdir()}
    return dict(paths, root=str(root), rgb_npz=paths["rgb"], bad_npz=paths["bad"])


def _command(entry: str, args: list[str], paths: dict, fresh: str) -> list[str]:
    args = [a.format(**paths, fresh=fresh) for a in args]
    if entry == "convert":
        defaults = {"--source": "--source=cm-pt", "--out": None, "--checkpoint": None}
        given = {a.split("=")[0] for a in args}
        args += [v for k, v in defaults.items() if v and k not in given]
        return [sys.executable, "-m", "consistency.convert", *args]
    if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={fresh}")
    return [sys.executable, "main.py", *args, *([] if entry == "train" else [f"--mode={entry}"])]


def _listing(root: pathlib.Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# main.py cases also run as subprocesses (the rest in-process, through the same cli functions):
# one per mode; every convert case is a subprocess (its flags clash with main.py's).
SUBPROCESS = {"unknown-key", "no-config-file", "s-step", "e-npz-rgb", "v-settings"}


def _forget_overrides() -> None:
    """Unparse the flags and drop the --config.KEY flags ml_collections defined for the last run."""
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)


def _in_process(cmd: list[str]) -> subprocess.CompletedProcess:
    """main.py's cli.run(main) in this process: flags parsed by cli.parse_flags, main guarded."""
    import main  # here: defines main.py's flags on first use

    argv = cmd[1:]
    _forget_overrides()
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved, sys.argv = sys.argv, argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.guarded(main.main)(cli.parse_flags(argv))
            except SystemExit as e:
                code = e.code
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved
        _forget_overrides()
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case run once: {id: (command, completed process, fresh path)}, "_written": paths."""
    root = tmp_path_factory.mktemp("errors")
    paths = _fixtures(root)
    before = _listing(root)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop(cli.TRACEBACK_ENV, None)
    out = {}

    def run(case):
        name, entry, args, _ = case
        fresh = str(root / f"fresh-{name}")
        cmd = _command(entry, args, paths, fresh)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        return name, (cmd, proc, fresh)

    spawned = [c for c in CASES if c[1] == "convert" or c[0] in SUBPROCESS]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = pool.map(run, spawned)
        for name, entry, args, _ in CASES:
            if (name, entry, args, _) not in spawned:
                fresh = str(root / f"fresh-{name}")
                cmd = _command(entry, args, paths, fresh)
                out[name] = (cmd, _in_process(cmd), fresh)
        out.update(jobs)
    out["_written"] = sorted(_listing(root) - before)
    return out


def test_there_are_enough_cases():
    assert len(CASES) >= 40
    assert {c[1] for c in CASES} == {"train", "sample", "edit", "eval", "convert"}


@pytest.mark.parametrize("name, entry, args, names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line(results, name, entry, args, names):
    cmd, proc, fresh = results[name]
    text = proc.stdout + proc.stderr
    shown = f"{' '.join(cmd)}\n--- output:\n{text[-3000:]}"
    assert proc.returncode != 0, shown
    assert "Traceback" not in text, shown
    wanted = names.format(fresh=fresh)
    assert any(wanted in line for line in text.splitlines()), shown
    assert not pathlib.Path(fresh).exists(), f"{fresh} written\n{shown}"


def test_no_case_writes_anything(results):
    assert results["_written"] == []


def test_traceback_on_request(tmp_path):
    cmd = [sys.executable, "main.py", T, f"--workdir={tmp_path}", "--config.training.bogus=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{cli.TRACEBACK_ENV: "1"})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_genuine_bugs_keep_their_traceback():
    def bug():
        return [][0]

    with pytest.raises(IndexError):
        bug()
    try:
        np.zeros(3).reshape(2)  # a ValueError raised outside the project's code
    except ValueError as e:
        assert not cli.is_own_error(e)
    assert cli.is_own_error(checkpoints.ModelMismatchError("x"))
    assert cli.is_own_error(FileNotFoundError(2, "No such file", "x.pt"))


def test_grey_and_colour_inputs_are_treated_alike_in_pngs_and_npz(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb_but_grey.png")
    images, names, _ = image_io.read_images(tmp_path, num_channels=1)
    assert images.shape == (2, 8, 8, 1) and names == ["g", "rgb_but_grey"]
    images, _, _ = image_io.read_images(tmp_path, num_channels=3)
    assert images.shape == (2, 8, 8, 3)
    np.savez(tmp_path / "g.npz", arr_0=images[..., :1])
    assert image_io.read_images(tmp_path / "g.npz", num_channels=3)[0].shape == (2, 8, 8, 3)
    colour = images.copy()
    colour[0, 0, 0] = (255, 0, 0)
    np.savez(tmp_path / "c.npz", arr_0=colour)
    with pytest.raises(ValueError, match="colour"):
        image_io.read_images(tmp_path / "c.npz", num_channels=1)
    Image.fromarray(colour[0]).save(tmp_path / "c.png")
    with pytest.raises(ValueError, match="c.png"):
        image_io.read_images(tmp_path, num_channels=1)


def test_grey_image_folder_trains_a_one_channel_model(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey).save(tmp_path / "a_0.png")
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(tmp_path / "a_1.png")
    report = data.scan_folder(str(tmp_path), num_channels=1, image_size=8)
    assert report.problems == []
    assert len(report.warnings) == 1 and "1 of 2 images are not 8x8" in report.warnings[0]
    source = data.make_source("image_folder", folder=str(tmp_path))
    prep = data.Preprocess(8, 1, random_flip=False)
    out = prep.random_map(source[0], np.random.default_rng(0))["image"]
    assert out.shape == (8, 8, 1)
    np.testing.assert_allclose(out[..., 0], grey / 127.5 - 1.0)
