"""Latent models end to end on mock data: encode, train, sample, eval and edit through decode;
the autoencoder's own method; the latent keys' validation. A random tiny AutoencoderKL."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import latent_digits, lcd_latent_digits, vae_digits
from consistency.convert import diffusers_vae
from consistency.experiment import (
    edit,
    encode,
    evaluate,
    latent,
    networks,
    resume,
    sample,
    spec,
    train,
    train_state,
    update,
)
from consistency.io import checkpoints, data, image_io, latents, sharding
from consistency.models.autoencoder_kl import AutoencoderKL

SIDE, LATENT_SIDE, LATENT_CHANNELS = 8, 4, 2


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """A random tiny diffusers vae/ folder: 8x8x1 digits <-> 4x4x2 latents."""
    model = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        latent_channels=LATENT_CHANNELS,
        scaling_factor=0.7,
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 1)))
    folder = tmp_path_factory.mktemp("vae") / "vae"
    diffusers_vae.export_diffusers_vae(params, model, folder, sample_size=SIDE)
    return folder, model, params


def _config(root, vae_folder):
    """configs/latent_digits.py (iCT on latents) at test size: 2 steps, tiny UNet, FID at step 2."""
    config = latent_digits.get_config()
    config.latent.update(vae=str(vae_folder), cache=str(root / "cache"))
    config.model.unet.channels = 8
    config.training.update(batch_size=16, num_steps=2, log_every=1, snapshot_every=2)
    config.sampling.update(grid_size=4, batch_size=4, num_samples=6)
    config.eval.update(
        num_samples=64,
        settings=("1",),
        every_steps=2,
        batch_size=32,
        chunk_size=32,
        cache_dir=str(root / "eval_cache"),
    )
    config.edit.update(task="interpolate", num_pairs=2, num_interpolations=3)
    config.data.num_threads = 1
    return config


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, vae):
    root = tmp_path_factory.mktemp("latent")
    config = _config(root, vae[0])
    spec.validate(config, mode="encode")
    encode.run(config, str(root / "run"))
    return root, config


@pytest.fixture(scope="module")
def trained(encoded):
    root, config = encoded
    state = train.train_and_evaluate(config, str(root / "run"))
    return root, config, state


def test_encode_writes_the_scaled_latents_of_every_image(encoded, vae):
    root, config = encoded
    _, model, params = vae
    cached = latents.LatentSource(root / "cache")
    digits = data.DigitsSource("train")
    assert cached.latents.shape == (len(digits), LATENT_SIDE, LATENT_SIDE, LATENT_CHANNELS)
    x = np.stack([digits[i]["image"] for i in range(5)]).astype(np.float32) / 127.5 - 1.0
    want = model.apply(params, x, method=model.encode_latents)
    np.testing.assert_allclose(cached.latents[:5], want, atol=1e-5)
    np.testing.assert_array_equal(cached.labels[:5], [digits[i]["label"] for i in range(5)])
    assert not latent.cache_problems(config, str(root / "run"))
    encode.run(config, str(root / "run"))  # a finished cache is reused, not refused


def test_training_on_latents_decodes_its_grids_and_scores_fid(trained):
    root, config, state = trained
    assert int(state.step) == 2
    assert jax.tree.leaves(state.params)[0].ndim  # the UNet was built for 4x4x2 inputs
    with Image.open(root / "run" / "samples" / "grid_0000002.png") as png:
        grid = np.asarray(png)
    # One grey channel, as the decoded digits: the 2-channel latents would not make a PNG.
    assert grid.shape == image_io.image_grid(np.zeros((4, SIDE, SIDE, 1), np.uint8)).shape[:2]
    record = json.loads((root / "run" / "eval" / "during_training.json").read_text())
    assert np.isfinite(record["steps"]["2"]["1"]["fid"])


def test_sample_mode_writes_decoded_images(trained):
    root, config, _ = trained
    path = sample.run_sample(config, str(root / "run"))
    with np.load(path) as stored:
        images = stored["arr_0"]
    assert images.shape == (6, SIDE, SIDE, 1) and images.dtype == np.uint8
    assert images.std() > 0


def test_pipeline_of_a_latent_run_returns_the_decoded_images_sample_mode_writes(trained):
    from consistency.experiment.pipeline import ConsistencyPipeline

    root, config, _ = trained
    pipe = ConsistencyPipeline.from_workdir(root / "run", config=config)
    images = pipe(batch_size=6, output_type="uint8")
    assert images.shape == (6, SIDE, SIDE, 1)  # decoded, not the 4x4x2 latents
    with np.load(sample.run_sample(config, str(root / "run"))) as stored:
        np.testing.assert_array_equal(images, stored["arr_0"])


def test_eval_scores_decoded_images_as_training_did(trained):
    root, config, _ = trained
    results = evaluate.run_eval(config, str(root / "run"))
    fid = results[2]["1"]["fid"]
    record = json.loads((root / "run" / "eval" / "during_training.json").read_text())
    np.testing.assert_allclose(fid, record["steps"]["2"]["1"]["fid"], rtol=1e-4)
    chunks = sorted((root / "run" / "eval" / "step_2").glob("1-*/chunk_*.npz"))
    assert len(chunks) == 2
    with np.load(chunks[0]) as stored:
        assert stored["images"].shape == (32, SIDE, SIDE, 1)
        assert np.isfinite(stored["pool"]).all()


def test_edit_interpolates_decoded_latents_and_refuses_pixel_tasks(trained):
    root, config, _ = trained
    result = edit.run_edit(config, str(root / "run"))
    assert result.edited.shape == (2 * 3, SIDE, SIDE, 1)
    assert np.abs(result.edited).max() <= 1.0
    config = _config(root, config.latent.vae)
    config.edit.task = "inpaint"
    with pytest.raises(spec.ConfigError, match=r"edit.task='inpaint': on a latent model"):
        spec.validate(config, mode="edit")


def test_latent_keys_are_validated(encoded, tmp_path):
    root, config = encoded
    work = str(root / "run")
    bad = _config(root, config.latent.vae)
    bad.data.update(image_size=8, num_channels=1)
    with pytest.raises(spec.ConfigError, match=r"set --config.data.image_size=4 --config.data"):
        spec.check_paths(bad, mode="train", workdir=work)
    bad = _config(root, config.latent.vae)
    bad.sampling.clip_denoised = True
    with pytest.raises(spec.ConfigError, match="clip_denoised=True clamps latents"):
        spec.validate(bad, mode="sample")
    bad = _config(root, config.latent.vae)
    bad.latent.cache = str(tmp_path / "nothing")
    with pytest.raises(spec.ConfigError, match="python main.py --mode=encode"):
        spec.check_paths(bad, mode="train", workdir=work)
    bad = _config(root, config.latent.vae)
    bad.latent.sample = "sample"
    with pytest.raises(spec.ConfigError, match="another encoding"):
        spec.check_paths(bad, mode="train", workdir=work)
    bad = _config(root, tmp_path / "no_vae")
    with pytest.raises(spec.ConfigError, match="no config.json"):
        spec.check_paths(bad, mode="sample")


def _vae_config():
    config = vae_digits.get_config()
    config.model.autoencoder_kl.update(block_out_channels=(8, 16), norm_num_groups=4)
    config.training.update(batch_size=16, num_steps=2, log_every=1, snapshot_every=2)
    config.sampling.grid_size = 8
    config.data.num_threads = 1
    return config


def test_vae_method_lowers_the_reconstruction_loss_on_a_batch():
    config = _vae_config()
    spec.validate(config, mode="train", num_devices=8)
    network, tx = networks.build_network(config), train_state.optimizer(config)
    mesh = sharding.make_mesh()
    state = update.init_state(config, network, tx, mesh)
    step = update.train_step_for(config, network, tx, mesh)
    digits = data.DigitsSource("train")
    x = np.stack([digits[i]["image"] for i in range(16)]).astype(np.float32) / 127.5 - 1.0
    batch = {"image": x[None], "label": np.zeros((1, 16), np.int32)}
    batch = sharding.global_array(batch, sharding.stacked_batch_sharding(mesh))
    rec, kl = [], []
    for _ in range(20):
        state, metrics = step(state, batch, None, networks.distance_fn(config), jax.random.key(1))
        rec.append(float(metrics["reconstruction"]))
        kl.append(float(metrics["kl"]))
    assert bool(metrics["finite"]) and np.isfinite(kl).all()
    assert rec[-1] < 0.6 * rec[0], rec


def test_vae_run_exports_a_folder_that_latent_vae_reads(tmp_path):
    config = _vae_config()
    train.train_and_evaluate(config, str(tmp_path / "vae_run"))
    assert (tmp_path / "vae_run" / "samples" / "grid_0000002.png").exists()
    model, params, found = diffusers_vae.load_diffusers_vae(tmp_path / "vae_run" / "vae")
    assert found["block_out_channels"] == [8, 16] and found["latent_channels"] == 2
    assert model.scaling_factor > 0 and model.scaling_factor != 0.18215
    user = latent_digits.get_config()
    user.latent.vae = str(tmp_path / "vae_run")  # the run's workdir
    assert latent.latent_shape(user) == (LATENT_SIDE, 2) and not latent.shape_problems(user)
    images = latent.decoder(user)(jnp.zeros((3, LATENT_SIDE, LATENT_SIDE, 2)))
    assert images.shape == (3, SIDE, SIDE, 1)


# ---- LCM on latents: a guided student sampled by the pipeline, then LCF from its checkpoint ----


def _lcm_config(root, vae_folder, variant):
    """configs/lcd_latent_digits.py at test size: the test's autoencoder and cache, 1 step."""
    config = lcd_latent_digits.get_config(variant)
    config.latent.update(vae=str(vae_folder), cache=str(root / "cache"))
    config.model.unet.channels = 8
    config.model.guidance_embed_dim = 8
    config.training.update(batch_size=16, num_steps=1, log_every=1, snapshot_every=1)
    config.sampling.update(grid_size=4, batch_size=4, num_samples=6, ts=(0, 11, 17))
    config.eval.every_steps = 0
    config.data.num_threads = 1
    return config


@pytest.fixture(scope="module")
def guided_student(encoded):
    """A latent guided_cd student's run (checkpoint written, not trained): N(0, 0.1^2) weights
    everywhere (drawn by numpy: nothing to compile), the guidance projection included, so w
    moves its samples."""
    root, base = encoded
    config = _lcm_config(root, base.latent.vae, "student")
    shapes = sample.abstract_params(config, networks.build_network(config))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: 0.1 * rng.standard_normal(a.shape, np.float32), shapes)
    state = train_state.TrainState.create(
        params, train_state.optimizer(config), num_ema=1, with_target=True
    )
    fingerprint = checkpoints.param_fingerprint(shapes)
    ckpt = checkpoints.Checkpointer(root / "student" / "checkpoints")
    ckpt.save(1, state, resume.checkpoint_meta(config, fingerprint))
    ckpt.close()
    return root, config


def test_lcm_multistep_sampler_of_a_latent_guided_student_through_the_pipeline(guided_student):
    from consistency.experiment.pipeline import ConsistencyPipeline

    root, config = guided_student
    pipe = ConsistencyPipeline.from_workdir(root / "student", config=config)
    assert pipe.guidance == 1.0 and len(pipe.sigmas()) == 2  # sampling.ts (0, 11, 17): 2 steps
    images = pipe(batch_size=6, output_type="uint8")  # w = sampling.guidance
    assert images.shape == (6, SIDE, SIDE, 1)  # decoded digits, not 4x4x2 latents
    with np.load(sample.run_sample(config, str(root / "student"))) as stored:
        np.testing.assert_array_equal(images, stored["arr_0"])  # as --mode=sample
    labels = pipe._labels(None, jax.random.key(0), np.arange(256))
    assert set(labels.tolist()) == {0, 1, 2, 3, 4}  # data.classes, as --mode=sample draws
    same = pipe(batch_size=6, output_type="uint8", guidance_scale=2.0)  # w = 2 - 1
    np.testing.assert_array_equal(same, images)
    other = pipe(batch_size=6, output_type="np", guidance_scale=5.0)
    assert np.abs(other - images / 255.0).max() > 1e-3  # w reaches the latent network
    four = pipe(batch_size=2, num_inference_steps=4, guidance_scale=3.0, output_type="np")
    assert four.shape == (2, SIDE, SIDE, 1) and np.isfinite(four).all()
    assert np.all(np.diff(pipe.sigmas(num_inference_steps=4)) < 0)


def test_lcf_fine_tunes_the_latent_guided_student_on_other_digits(guided_student, capsys):
    root, student = guided_student
    config = _lcm_config(root, student.latent.vae, "lcf")
    config.training.init_checkpoint = str(root / "student" / "checkpoints")
    assert config.data.classes == (5, 6, 7, 8, 9) and student.data.classes == (0, 1, 2, 3, 4)
    state = train.train_and_evaluate(config, str(root / "lcf"))
    assert "start: " + config.training.init_checkpoint in capsys.readouterr().out
    assert int(state.step) == 1 and "guidance_proj" in state.params
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(state.params))
    assert (root / "lcf" / "samples" / "grid_0000001.png").exists()
    config.model.guidance_embed_dim = 16  # another network than the student's: refused
    with pytest.raises(checkpoints.ModelMismatchError, match="training.init_checkpoint"):
        train.train_and_evaluate(config, str(root / "lcf_other"))
