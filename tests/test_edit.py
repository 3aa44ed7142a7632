"""--mode=edit on digits: files in and out, and each task's defining property on a real network."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from configs import test as test_config
from consistency.experiment import edit, networks, sample
from consistency.experiment.train_state import TrainState
from consistency.io import checkpoints, image_io

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM = 6  # more than sampling.batch_size (4): the last batch is padded


def _config(**edit):
    config = test_config.get_config()
    config.edit.update(steps=10, stroke_index=5, **edit)
    return config


def _random_params(abstract, seed=0):
    """Random weights (fan-in scaled kernels, norm scales near 1): a non-trivial network with no
    init compile; a fresh init's zero output conv would make f(x, sigma) = c_skip x."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            return z / np.sqrt(np.prod(leaf.shape[:-1]))
        return 1.0 + 0.1 * z if name.endswith("['scale']") else 0.1 * z

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A digits UNet checkpoint with random weights, and digits as PNGs, an npz, a low-res npz."""
    root = tmp_path_factory.mktemp("edit")
    config = _config()
    abstract = sample.abstract_params(config, networks.build_network(config))
    params = _random_params(abstract)
    state = TrainState(
        step=np.int32(2),
        params=params,
        target_params=params,
        ema_params=(params,),
        opt_state=None,
    )
    meta = {"model": "unet", "params": checkpoints.param_fingerprint(abstract)}
    ckpt = checkpoints.Checkpointer(root / "checkpoints")
    ckpt.save(2, state, meta)
    ckpt.close()
    digits = np.round(load_digits().images[:NUM] * (255 / 16)).astype(np.uint8)[..., None]
    (root / "pngs").mkdir()
    for k, image in enumerate(digits):
        image_io.save_png(root / "pngs" / f"digit{k}.png", image)
    np.savez(root / "digits.npz", arr_0=digits)
    low = digits.reshape(NUM, 4, 2, 4, 2, 1).mean((2, 4)).round().astype(np.uint8)
    np.savez(root / "low.npz", arr_0=low)
    mask = np.full((8, 8), 255, np.uint8)
    mask[:, 4:] = 0  # the right half is unknown
    Image.fromarray(mask).save(root / "mask.png")
    return root, digits


def _check_files(result, stem, names, shape):
    assert [p.stem for p in sorted(result.out_dir.glob("*.png")) if p.stem != "before_after"] == (
        sorted(names)
    )
    images = np.load(result.out_dir / f"{stem}.npz")["arr_0"]
    assert images.dtype == np.uint8 and images.shape == shape
    np.testing.assert_array_equal(images, image_io.to_uint8(result.edited))
    png = np.asarray(Image.open(result.out_dir / f"{names[-1]}.png"))
    np.testing.assert_array_equal(png, images[-1, ..., 0])
    assert np.isfinite(result.edited).all()
    return images


def test_inpaint_keeps_the_known_pixels(workdir):
    root, digits = workdir
    config = _config(task="inpaint", input=str(root / "pngs"), mask=str(root / "mask.png"))
    result = edit.run_edit(config, root)
    images = _check_files(result, "pngs", [f"digit{k}" for k in range(NUM)], (NUM, 8, 8, 1))
    np.testing.assert_array_equal(result.edited[:, :, :4], result.inputs[:, :, :4])
    np.testing.assert_array_equal(images[:, :, :4], digits[:, :, :4])
    assert np.all(result.reference[:, :, 4:] == -1.0)  # the 'before' row shows the hole black
    assert np.abs(result.edited[:, :, 4:] - result.inputs[:, :, 4:]).max() > 0.1
    grid = np.asarray(Image.open(result.out_dir / "before_after.png"))
    assert grid.shape == _grid_shape(3, NUM)  # rows: input, masked input, inpainted


def _grid_shape(rows, cols, size=8):
    """The grey PNG's shape: images upscaled to >= 512 px of width, 2-px borders."""
    _, _, scale = image_io.grid_geometry(rows * cols, size, size, cols)
    return rows * (size * scale + 2) + 2, cols * (size * scale + 2) + 2


def test_superres_of_low_resolution_inputs_keeps_patch_means(workdir, tmp_path):
    p, source = 2, "low.npz"  # 4x4 inputs, upsampled to 8x8
    root, digits = workdir
    config = _config(task="superres", input=str(root / source), patch_size=p, out=str(tmp_path))
    result = edit.run_edit(config, root)
    stem = source[:-4]
    _check_files(result, stem, [f"{stem}_{k:04d}" for k in range(NUM)], (NUM, 8, 8, 1))
    means = lambda x: x.reshape(NUM, 8 // p, p, 8 // p, p, 1).mean((2, 4))
    np.testing.assert_allclose(means(result.edited), means(result.inputs), atol=1e-5)
    assert np.abs(result.edited - result.reference).max() > 0.05  # detail was generated


def test_stroke_denoise_and_interpolate_write_images(workdir):
    root, _ = workdir
    for task in ("stroke", "denoise"):
        result = edit.run_edit(_config(task=task, input=str(root / "digits.npz")), root)
        _check_files(result, "digits", [f"digits_{k:04d}" for k in range(NUM)], (NUM, 8, 8, 1))
    assert result.reference.std() > 0.4  # the 'before' row of denoise is the noisy input
    config = _config(task="interpolate", num_pairs=2, num_interpolations=3)
    result = edit.run_edit(config, root)
    names = [f"pair{p:03d}_{k:02d}" for p in range(2) for k in range(3)]
    _check_files(result, "interpolations", names, (6, 8, 8, 1))
    assert np.asarray(Image.open(result.out_dir / "before_after.png")).shape == _grid_shape(2, 3)


def test_colorize_of_one_channel_data_and_bad_inputs_are_refused(workdir):
    root, _ = workdir
    with pytest.raises(ValueError, match="'colorize' needs RGB images, but data.num_channels=1"):
        edit.run_edit(_config(task="colorize", input=str(root / "digits.npz")), root)
    with pytest.raises(ValueError, match="edit.task='deblur': must be one of"):
        edit.run_edit(_config(task="deblur", input=str(root / "digits.npz")), root)
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        edit.run_edit(_config(task="superres", input=str(root / "pngs"), patch_size=3), root)
    with pytest.raises(ValueError, match="edit.input: no such path"):
        edit.run_edit(_config(input=str(root / "missing.npz")), root)


def test_command_line_edit_mode(workdir, tmp_path):
    root, _ = workdir
    cmd = [sys.executable, str(REPO / "main.py"), "--config=configs/test.py", f"--workdir={root}",
           "--mode=edit", "--config.edit.task=inpaint", f"--config.edit.input={root / 'pngs'}",
           f"--config.edit.mask={root / 'mask.png'}", "--config.edit.steps=10",
           f"--config.edit.out={tmp_path}"]  # fmt: skip
    # The same edit as test_inpaint's: the subprocess finds its compilation in the shared cache.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "inpaint: wrote 6 images" in out.stdout
    assert (tmp_path / "before_after.png").exists()
    inpainted = np.load(root / "edits" / "inpaint" / "pngs.npz")["arr_0"]
    np.testing.assert_array_equal(np.load(tmp_path / "pngs.npz")["arr_0"], inpainted)
