"""Zero-shot editing against the official code's recorded runs, and its defining properties."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata

from consistency.core import editing, samplers


def _f_params(meta: dict) -> dict:
    """The closed-form F's parameters: structured if the json has them, else parsed from F."""
    if "F_params" in meta:
        return meta["F_params"]
    m = re.search(r"(\w+)\(([-\d.e]+)\*x_in \+ ([-\d.e]+)\*t\) \* ([-\d.e]+)", meta["F"])
    return dict(
        act=m.group(1),
        a=float(m.group(2)),
        b=float(m.group(3)),
        scale=float(m.group(4)),
        shift_t=0.0,
    )


def _run_task(name, task, arrays, f, sigmas, grid):
    """(x, reference) from the library for one recorded task, with its recorded noise."""
    images = refdata.nhwc(arrays[f"{name}/images_in"])
    noise = refdata.nhwc(arrays[f"{name}/noise"])[1 : len(sigmas)]
    kw = dict(x_init=refdata.nhwc(arrays[f"{name}/x_init"]), noise=noise, **grid)
    if name == "inpainting":
        return editing.inpaint(f, images, refdata.nhwc(arrays[f"{name}/mask"]), sigmas, **kw)
    if name == "colorization":
        q_ref = arrays[f"{name}/Q_float64"]
        np.testing.assert_allclose(editing.colorization_basis()[:, 0], q_ref[:, 0], rtol=1e-10)
        # The stored mask marks component 0 of the Q basis at every pixel, as colorize assumes.
        mask = refdata.nhwc(arrays[f"{name}/mask"])
        np.testing.assert_array_equal(mask, np.broadcast_to([1.0, 0.0, 0.0], mask.shape))
        return editing.colorize(f, images, sigmas, **kw)
    if name == "superres":
        q_ref = arrays[f"{name}/Q_float64"]
        p = int(task.get("patch_size", round(np.sqrt(q_ref.shape[0]))))
        np.testing.assert_allclose(editing.patch_basis(p)[:, 0], q_ref[:, 0], rtol=1e-10)
        return editing.superresolve(f, images, sigmas, patch_size=p, **kw)
    raise AssertionError(f"fixture task {name!r} has no library counterpart in this test")


@pytest.mark.parametrize("case", refdata.cases("cm_editing"))
def test_editing_matches_cm(case):
    meta = refdata.load_json(case["files"][".json"])
    arrays = np.load(case["files"][".npz"])
    f = refdata.closed_form_denoiser(_f_params(meta), distillation=True)
    assert meta["tasks"]
    for name, task in meta["tasks"].items():
        setup = {k: task.get(k, meta.get(k)) for k in ("ts", "steps", "t_min", "t_max", "rho")}
        grid = dict(sigma_min=setup["t_min"], sigma_max=setup["t_max"])
        sigmas = samplers.index_sigmas(setup["ts"], setup["steps"], rho=setup["rho"], **grid)
        if "t_float64" in task:
            np.testing.assert_allclose(sigmas, task["t_float64"], rtol=1e-7)
        x, reference = _run_task(name, task, arrays, f, sigmas, grid)
        assert x.shape == refdata.nhwc(arrays[f"{name}/images_in"]).shape
        refdata.assert_close_scaled(
            x, refdata.nhwc(arrays[f"{name}/x_out"]), refdata.SAMPLER_RTOL, f"{name} x_out"
        )
        refdata.assert_close_scaled(
            reference,
            refdata.nhwc(arrays[f"{name}/images_out"]),
            refdata.SAMPLER_RTOL,
            f"{name} images_out",
        )


# A closed-form consistency function with f(x, eps) close to x, so small sigmas keep the input.
def _f(x, sigma):
    s = sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))
    return jnp.tanh(x / (1.0 + s))


SIGMAS = samplers.index_sigmas((0, 6, 12, 17), 18)


# numpy inputs: every eager jax.random op would cost a compile on the 2-core test machine.
def _images(seed, shape=(3, 8, 8, 3)):
    return np.random.default_rng(seed).uniform(-0.9, 0.9, shape).astype(np.float32)


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_inpainting_keeps_known_pixels_exactly():
    images = _images(0)
    mask = (_images(1, images.shape[:3] + (1,)) > 0).astype(np.float32)
    x, reference = editing.inpaint(_f, images, mask, SIGMAS, key=jax.random.key(2))
    known = np.broadcast_to(np.asarray(mask) == 1, images.shape)
    np.testing.assert_array_equal(np.asarray(x)[known], np.asarray(images)[known])
    np.testing.assert_array_equal(np.asarray(reference)[~known], -1.0)
    assert not np.allclose(np.asarray(x)[~known], np.asarray(images)[~known], atol=0.05)


def test_colorization_keeps_the_grey_level():
    images = _images(3)
    x, reference = editing.colorize(_f, images, SIGMAS, key=jax.random.key(4))
    q0 = np.asarray(editing.LUMA) / np.linalg.norm(editing.LUMA)
    np.testing.assert_allclose(np.asarray(x) @ q0, np.asarray(images) @ q0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(reference) @ q0, np.asarray(images) @ q0, atol=2e-6)
    # The colour (orthogonal to grey) was generated, not copied.
    residual = np.asarray(x) - (np.asarray(x) @ q0)[..., None] * q0
    assert np.abs(residual).max() > 0.05


def _patch_means(x, p):
    b, h, w, c = x.shape
    return np.asarray(x).reshape(b, h // p, p, w // p, p, c).mean(axis=(2, 4))


@pytest.mark.parametrize("p", [2, 4])
def test_superresolution_keeps_patch_means(p):
    low = _images(5, (3, 8 // p, 8 // p, 3))
    upsampled = np.repeat(np.repeat(low, p, axis=1), p, axis=2)
    x, reference = editing.superresolve(_f, upsampled, SIGMAS, patch_size=p, key=jax.random.key(6))
    np.testing.assert_allclose(_patch_means(x, p), low, atol=2e-6)
    np.testing.assert_allclose(reference, upsampled, atol=2e-6)
    assert np.abs(np.asarray(x) - np.asarray(upsampled)).max() > 0.05


def test_stroke_guided_stays_close_to_strokes_at_small_sigma():
    strokes = np.round(_images(7)) * np.float32(0.8)  # flat colour blobs in {-0.8, 0, 0.8}
    key = jax.random.key(8)
    near = editing.stroke_guided(_f, strokes, samplers.index_sigmas((15, 17), 18), key=key)
    far = editing.stroke_guided(_f, strokes, SIGMAS, key=key)
    # tanh(x/(1+s)) maps the strokes to within ~0.2 of themselves; the noise adds sigma_15 ~ 0.03.
    assert np.abs(np.asarray(near) - np.asarray(strokes)).mean() < 0.2
    assert np.abs(np.asarray(far) - np.asarray(strokes)).mean() > 0.3


def test_denoising_is_one_evaluation():
    noisy = _images(9) + 0.3 * _normal(10, (3, 8, 8, 3))
    out = editing.denoise(_f, noisy, 0.3)
    np.testing.assert_array_equal(out, _f(noisy, jnp.full((3,), 0.3, jnp.float32)))


def test_interpolation_endpoints_are_one_step_samples():
    z0, z1 = _normal(11, (2, 2, 4, 4, 3))
    alphas = jnp.linspace(0.0, 1.0, 5)
    x = editing.interpolate(_f, z0, z1, alphas)
    assert x.shape == (5, 2, 4, 4, 3)
    for end, z in [(0, z0), (-1, z1)]:
        np.testing.assert_allclose(x[end], samplers.onestep_sample(_f, 80.0 * z), atol=1e-6)
    # Spherical: the middle latent keeps the norm of two independent Gaussians, unlike lerp.
    mid = editing.slerp(z0, z1, jnp.array([0.5]))[0]
    norms = np.linalg.norm(np.asarray(mid).reshape(2, -1), axis=1)
    np.testing.assert_allclose(norms, np.linalg.norm(np.asarray(z0).reshape(2, -1), axis=1), 0.2)


def test_default_noise_is_per_sample_id():
    images = _images(12, (6, 8, 8, 3))
    key = jax.random.key(13)
    mask = np.ones((8, 8, 1), np.float32)
    mask[2:6] = 0.0
    # Two batches of the same size (one compile) that share sample 2 at different positions.
    a, _ = editing.inpaint(_f, images[:3], mask, SIGMAS, key=key, sample_ids=np.arange(3))
    b, _ = editing.inpaint(_f, images[2:5], mask, SIGMAS, key=key, sample_ids=np.arange(2, 5))
    np.testing.assert_allclose(a[2], b[0], atol=1e-6)
    assert not np.allclose(a[1], b[1], atol=0.05)


@pytest.mark.parametrize("target", [0, 1, 17, 22, 38, 39])
def test_ternary_search_finds_the_minimum_once_per_index(target):
    calls = {}

    def score(k):
        calls[k] = calls.get(k, 0) + 1
        return (k - target) ** 2 + 0.5

    best, record = editing.ternary_search(score, 0, 39)
    assert best == target
    assert max(calls.values()) == 1
    assert record == {k: (k - target) ** 2 + 0.5 for k in calls}
    assert list(record) == list(calls)  # evaluation order
    assert len(record) < 20


def test_bad_inputs_name_the_argument():
    images = _images(14)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="mask of shape"):
        editing.inpaint(_f, images, np.ones((4, 8, 8, 3)), SIGMAS, key=key)
    with pytest.raises(ValueError, match="patch_size 3 must divide"):
        editing.superresolve(_f, images, SIGMAS, patch_size=3, key=key)
    with pytest.raises(ValueError, match="3 channels"):
        editing.colorize(_f, images[..., :1], SIGMAS, key=key)
    with pytest.raises(ValueError, match="strictly decreasing"):
        editing.colorize(_f, images, [1.0, 2.0], key=key)
    with pytest.raises(ValueError, match="must end at N-1"):
        samplers.index_sigmas((0, 6), 18)
    with pytest.raises(ValueError, match="noise must have shape"):
        editing.colorize(_f, images, SIGMAS, x_init=images, noise=np.zeros((1, 3, 8, 8, 3)))
    with pytest.raises(ValueError, match="or a key"):
        editing.colorize(_f, images, SIGMAS)
    with pytest.raises(ValueError, match="lo <= hi"):
        editing.ternary_search(lambda k: 0.0, 5, 2)
    with pytest.raises(ValueError, match="must be finite"):
        editing.ternary_search(lambda k: float("nan"), 0, 9)
