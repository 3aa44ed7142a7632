"""ConsistencyPipeline: diffusers' pipeline traces, a trained run, batch splits, outputs, errors."""

import re

import jax
import numpy as np
import pytest
import refdata
from PIL import Image

import consistency
from configs import test as test_config
from consistency.core import samplers
from consistency.experiment import pipeline, sample, sampling_spec, spec, train
from consistency.experiment.pipeline import ConsistencyPipeline

FOLDERS = refdata.cases("diffusers_cm_folder")
# the pipeline_call arguments that mean the same here (generator is replaced by the noise)
CALL_KEYS = ("batch_size", "class_labels", "num_inference_steps", "timesteps", "output_type")


@pytest.fixture(scope="module", params=FOLDERS)
def folder(request):
    """(fixture json, npz arrays, the pipeline of its diffusers folder)."""
    files = request.param["files"]
    meta = refdata.load_json(files[".json"])
    with np.load(files[".npz"]) as stored:
        arrays = {k: stored[k] for k in stored.files}
    folder = refdata.fixture_dir() / meta["folder"]
    return meta, arrays, ConsistencyPipeline.from_diffusers(folder)


def test_diffusers_pipeline_traces_are_reproduced(folder):
    """The stored one-step and timesteps=[22, 0] images, from the stored latents and noise."""
    meta, arrays, pipe = folder
    latents = refdata.nhwc(arrays["pipeline/latents"])
    assert meta["pipeline"], "the fixture records no pipeline case"
    for case, trace in meta["pipeline"].items():
        call = trace["pipeline_call"]
        kwargs = {k: call[k] for k in CALL_KEYS if k in call}
        levels = {k: kwargs[k] for k in ("num_inference_steps", "timesteps") if k in kwargs}
        # diffusers' sigmas end with sigma_min, a terminator never evaluated
        np.testing.assert_array_equal(
            pipe.sigmas(**levels), np.float32(trace["scheduler_sigmas_after_set"][:-1])
        )
        calls, draws = trace["num_model_calls"], refdata.nhwc(arrays[f"{case}/noise"])
        assert len(draws) == trace["num_noise_draws"] and draws.shape[0] in (0, calls)
        # diffusers draws once more at the last step, scaled by sqrt(sigma_min^2 - sigma_min^2)
        # in float32 (~7e-7): Algorithm 1 re-noises by exactly 0 there.
        assert trace["per_step"][-1]["noise_scale"] < 1e-6
        noise = draws[: calls - 1] if calls > 1 else None
        images = pipe(latents=latents, noise=noise, **kwargs)
        assert call["output_type"] == "np" and images.dtype == np.float32
        expected = arrays[f"{case}/images_np_nhwc"]
        err = refdata.assert_close_scaled(images, expected, refdata.SAMPLER_RTOL, case)
        print(f"{meta['folder']} {case}: max abs err / scale {err:.2g}")


def test_diffusers_folder_steps_match_the_scheduler(folder):
    meta, _, pipe = folder
    sched = meta["scheduler_config_saved"]
    n = sched["num_train_timesteps"]
    assert pipe.num_train_timesteps == n and pipe.grid.sigma_max == sched["sigma_max"]
    np.testing.assert_array_equal(
        pipe.sigmas(num_inference_steps=2),
        samplers.diffusers_sigmas(n, timesteps=[n // 2, 0], sigma_min=sched["sigma_min"]),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run of configs/test.py and its pipeline."""
    workdir = tmp_path_factory.mktemp("run")
    config = test_config.get_config()
    config.training.num_steps = 2
    train.train_and_evaluate(config, str(workdir))
    return workdir, config, ConsistencyPipeline.from_workdir(workdir)


def test_from_workdir_gives_the_images_of_mode_sample(run):
    workdir, config, pipe = run
    path = sample.run_sample(config, str(workdir))  # sampling.num_samples = 6, 4 per call
    with np.load(path) as stored:
        expected = stored["arr_0"]
    np.testing.assert_array_equal(pipe(batch_size=len(expected), output_type="uint8"), expected)
    assert pipe.batch_per_call == config.sampling.batch_size
    assert pipe.default_sigmas == sampling_spec.sampler(config).sigmas


def test_images_do_not_depend_on_the_batch_split(run):
    _, _, pipe = run
    kwargs = dict(batch_size=6, seed=3, timesteps=[22, 0], output_type="np")
    images = {}
    for per_call in (6, 4, 1):  # 6 devices; 4 devices and a padded second call; 1 device
        pipe.batch_per_call = per_call
        images[per_call] = pipe(**kwargs)
    pipe.batch_per_call = 4
    assert images[6].std() > 0.05
    for per_call in (4, 1):
        np.testing.assert_allclose(images[per_call], images[6], atol=1e-6)
    # The first images of a larger batch are the same images.
    np.testing.assert_allclose(pipe(**dict(kwargs, batch_size=8))[:6], images[6], atol=1e-6)
    # seed=3 is key=jax.random.key(3); another seed gives other images.
    np.testing.assert_array_equal(pipe(**dict(kwargs, seed=None, key=jax.random.key(3))), images[4])
    assert np.abs(pipe(**dict(kwargs, seed=4)) - images[4]).max() > 0.1


def test_compiled_once_per_shape_and_step_count(run):
    _, _, pipe = run
    pipe(batch_size=3, timesteps=[22, 0], output_type="np")  # a batch shape of its own
    compiled = pipe._sample._cache_size()
    pipe(batch_size=3, timesteps=[30, 5], seed=1, output_type="np")  # other levels, same count
    pipe(batch_size=3, sigmas=[80.0, 0.5], output_type="np")
    assert pipe._sample._cache_size() == compiled
    pipe(batch_size=3, num_inference_steps=1, output_type="np")
    assert pipe._sample._cache_size() == compiled + 1


def test_output_types(run):
    _, config, pipe = run
    size, channels = config.data.image_size, config.data.num_channels
    floats = pipe(batch_size=2, output_type="np")
    assert floats.shape == (2, size, size, channels) and floats.dtype == np.float32
    assert 0 <= floats.min() and floats.max() <= 1
    as_jax = pipe(batch_size=2, output_type="jax")
    assert isinstance(as_jax, jax.Array)
    np.testing.assert_array_equal(np.asarray(as_jax), floats)
    as_uint8 = pipe(batch_size=2, output_type="uint8")
    assert as_uint8.dtype == np.uint8
    np.testing.assert_array_equal(as_uint8, np.round(floats * 255).astype(np.uint8))
    pil = pipe(batch_size=2)  # diffusers' default output
    assert all(isinstance(p, Image.Image) and p.size == (size, size) for p in pil)
    np.testing.assert_array_equal(np.asarray(pil[1]), as_uint8[1, ..., 0])
    # the given latents are x_T / sigma_max: the same images as those drawn from the seed
    z = np.asarray(samplers.per_sample_normal(jax.random.key(0), np.arange(2), floats.shape[1:], 0))
    np.testing.assert_allclose(pipe(latents=z, output_type="np"), floats, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(output_type="tensor"), "output_type='tensor': choose one of"),
        (dict(seed=1, key=jax.random.key(1)), "key and seed are both given"),
        (dict(key=3), "key=3: give one jax key"),
        (dict(seed=-1), "seed=-1: give an integer >= 0"),
        (dict(timesteps=[0, 22]), r"timesteps=\[0, 22\]: .*descending.*\[22, 0\]"),
        (dict(timesteps=[40, 0]), r"timesteps=\[40, 0\]: .*\[0, 39\]"),
        (dict(num_inference_steps=1, timesteps=[22, 0]), "num_inference_steps and timesteps"),
        (dict(num_inference_steps=0), "num_inference_steps=0: .*in \\[1, 40\\]"),
        (dict(sigmas=[0.5, 80.0]), "sigmas: .*strictly decreasing"),
        (dict(batch_size=0), "batch_size=0: give a positive integer"),
        (dict(latents=np.zeros((2, 1, 8, 8))), r"latents of shape \(2, 1, 8, 8\).*NHWC"),
        (dict(latents=np.zeros((2, 8, 8, 1)), batch_size=3), "latents hold 2 images"),
        (dict(timesteps=[22, 0], noise=np.zeros((2, 1, 8, 8, 1))), r"noise of shape .*\(1, 1,"),
        (dict(noise=np.zeros((1, 1, 8, 8, 1))), r"give \(0, 1, 8, 8, 1\)"),
        (dict(class_labels=3), "class_labels: this model is unconditional"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(run, kwargs, match):
    _, _, pipe = run
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_class_labels_of_a_conditional_model(folder):
    meta, _, pipe = folder
    if not pipe.num_classes:
        with pytest.raises(ValueError, match="unconditional"):
            pipe(class_labels=[1], output_type="np")
        return
    one = pipe(batch_size=2, class_labels=145, num_inference_steps=1, output_type="np")
    listed = pipe(batch_size=2, class_labels=[145, 145], num_inference_steps=1, output_type="np")
    np.testing.assert_array_equal(one, listed)
    labels = pipe._labels(None, jax.random.key(0), np.arange(64))
    assert labels.min() >= 0 and labels.max() < pipe.num_classes and len(set(labels)) > 10
    for bad, match in [([145], "give an int or 2 ints"), (1000, r"classes in \[0, 1000\)")]:
        with pytest.raises(ValueError, match=match):
            pipe(batch_size=2, class_labels=bad, output_type="np")


def test_from_workdir_and_from_diffusers_refuse_what_they_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs.jsonl or config.json"):
        ConsistencyPipeline.from_workdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a ConsistencyModelPipeline folder"):
        ConsistencyPipeline.from_diffusers(tmp_path)


def test_sampling_timesteps_mean_what_the_pipeline_means(run):
    """sampling.timesteps (diffusers' order) is --mode=sample's sampler: ts (0, 22, 39)."""
    _, config, pipe = run
    config = config.copy_and_resolve_references()
    config.sampling.timesteps = (22, 0)
    levels = sampling_spec.sampler(config).sigmas
    assert levels == sampling_spec.sampler(config, "0,22,39").sigmas
    np.testing.assert_array_equal(np.float32(levels), pipe.sigmas(timesteps=[22, 0]))
    config.sampling.timesteps = ()
    config.sampling.sigmas = (80.0, 0.5)
    assert sampling_spec.sampler(config).sigmas == (80.0, 0.5)


@pytest.mark.parametrize(
    "sampling, match",
    [
        (dict(timesteps=(0, 22)), r"sampling.timesteps: .*descending.*\(22, 0\)"),
        (dict(timesteps=(40, 0)), r"sampling.timesteps: .*\[0, 39\]"),
        (dict(timesteps=(22.0, 0)), r"sampling.timesteps=\(22.0, 0\): give integer"),
        (dict(timesteps=(22, 0), ts=(0, 22, 39)), "sampling.timesteps=.* and sampling.ts="),
        (dict(timesteps=(22, 0), sigmas=(80.0,)), r"and sampling.sigmas=\(80.0,\) are both"),
    ],
)
def test_bad_sampling_timesteps_name_the_key_and_the_fix(sampling, match):
    config = test_config.get_config()
    config.sampling.update(sampling)
    (problem,) = spec.problems(config, mode="sample")
    assert "\n" not in problem
    assert re.search(match, problem), problem


def test_the_package_exports_the_pipeline():
    assert consistency.ConsistencyPipeline is pipeline.ConsistencyPipeline
