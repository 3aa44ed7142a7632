"""LPIPS (VGG16, v0.1) against the lpips package's outputs on recipe weights."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata

from consistency.measure import lpips as lp


def regenerate_recipe(recipe: list) -> dict:
    """Torch-named float32 tensors from the fixture recipe, each checked against its stored sum."""
    out = {}
    for entry in recipe:
        n = np.random.default_rng(entry["rng"]).standard_normal(tuple(entry["shape"]), np.float32)
        if entry["abs"]:
            n = np.abs(n)
        w = (n * np.float32(entry["std"]) + np.float32(entry["mean"])).astype(np.float32)
        assert float(w.astype(np.float64).sum()) == entry["sum"], entry["name"]
        out[entry["name"]] = w
    return out


def parse_crops(text: str) -> dict:
    """{npz key: (row slice, col slice)} from the JSON's `name = [:, :, a:b, c:d]` descriptions."""
    crops = {}
    for name, rows, cols in re.findall(r"(\w+) = \[:, :, ([-\d:]+), ([-\d:]+)\]", text):
        to_slice = lambda s: slice(*[int(v) if v else None for v in s.split(":")])
        crops[name] = (to_slice(rows), to_slice(cols))
    return crops


def nhwc(a: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(a.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module", params=refdata.cases("lpips_vgg"))
def ref(request):
    files = request.param["files"]
    meta = json.loads(files[".json"].read_text())
    arrays = dict(np.load(files[".npz"]))
    vgg_state = regenerate_recipe(meta["recipe"])
    lin_state = {k.removeprefix("lin/"): v for k, v in arrays.items() if k.startswith("lin/")}
    for entry in meta["lin_weights"]:
        w = lin_state[entry["name"]]
        assert list(w.shape) == entry["shape"]
        np.testing.assert_allclose(w.astype(np.float64).sum(), entry["sum"], rtol=1e-12)
    params = lp.lpips_params_from_torch(vgg_state, lin_state)
    return {"meta": meta, "arrays": arrays, "params": params}


@pytest.fixture(scope="module")
def terms_64(ref):
    """Per-layer terms at 64 px of the fixture pairs, then of each first image with itself."""
    a = ref["arrays"]
    fn = jax.jit(lambda x, y: lp.LPIPS(resize=False).apply({"params": ref["params"]}, x, y))
    x = np.concatenate([a["in0"], a["in0"]])
    y = np.concatenate([a["in1"], a["in0"]])
    return np.asarray(fn(nhwc(x), nhwc(y)))


def test_params_cover_the_network(ref):
    """The torch-name mapping fills exactly the Flax tree, with the Flax shapes."""
    x = jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(lp.LPIPS().init, jax.random.key(0), x, x)["params"]
    got = jax.tree.map(lambda a: a.shape, ref["params"])
    assert got == jax.tree.map(lambda a: a.shape, shapes)


def test_upsample_matches_torch(ref):
    """The 224 px resize reproduces torch bilinear (align_corners=False) crops and sums."""
    meta, a = ref["meta"], ref["arrays"]
    up = {
        k: np.asarray(lp.resize_for_lpips(nhwc(a[k]))).transpose(0, 3, 1, 2) for k in ("in0", "in1")
    }
    checks = meta["inputs"]["up224_checksums"]
    assert list(up["in0"].shape) == checks["shape"]
    np.testing.assert_allclose(up["in0"].astype(np.float64).sum(), checks["in0_sum"], rtol=1e-6)
    np.testing.assert_allclose(up["in1"].astype(np.float64).sum(), checks["in1_sum"], rtol=1e-6)
    sumsq = np.square(up["in0"].astype(np.float64)).sum()
    np.testing.assert_allclose(sumsq, checks["in0_sumsq"], rtol=1e-6)
    crops = parse_crops(meta["inputs"]["up224"])
    assert crops, "no crop descriptions found in the fixture"
    for key, (rows, cols) in crops.items():
        source = up[key.split("_")[0]]
        np.testing.assert_allclose(source[:, :, rows, cols], a[key], rtol=0, atol=1e-5)


def test_distance_64(ref, terms_64):
    """Per-layer terms and distances at 64 px (no resize) match the package."""
    a = ref["arrays"]
    terms = terms_64[: len(a["in0"])]
    ref_terms = a["per_layer_64"]
    np.testing.assert_allclose(terms, ref_terms, rtol=1e-4, atol=1e-4 * ref_terms.max())
    np.testing.assert_allclose(terms.sum(1), a["dist_64"], rtol=1e-4)


def test_self_distance_is_zero(ref, terms_64):
    a = ref["arrays"]
    self_terms = terms_64[len(a["in0"]) :]
    np.testing.assert_allclose(self_terms.sum(1), a["dist_self_64"], rtol=0, atol=1e-9)


def test_distance_224(ref):
    """Per-layer terms and distances with the paper's 64 -> 224 upsample match the package."""
    a = ref["arrays"]
    fn = jax.jit(lambda x, y: lp.LPIPS(resize=True).apply({"params": ref["params"]}, x, y))
    terms = np.asarray(fn(nhwc(a["in0"]), nhwc(a["in1"])))
    ref_terms = a["per_layer_224"]
    np.testing.assert_allclose(terms, ref_terms, rtol=1e-4, atol=1e-4 * ref_terms.max())
    np.testing.assert_allclose(terms.sum(1), a["dist_224"], rtol=1e-4)


def test_avg_pool_variant_differs(ref, terms_64):
    """The cm/piq average-pool variant is a different metric on the same weights."""
    a = ref["arrays"]
    fn = jax.jit(lp.make_lpips_distance(ref["params"], pool="avg", resize=False))
    avg = np.asarray(fn(nhwc(a["in0"]), nhwc(a["in1"])))
    max_ = terms_64[: len(a["in0"])].sum(1)
    assert np.all(np.isfinite(avg)) and np.all(avg > 0)
    assert np.max(np.abs(avg - max_) / max_) > 0.05


def test_bfloat16_compute_is_close(ref):
    a = ref["arrays"]
    fn = jax.jit(lp.make_lpips_distance(ref["params"], resize=False, dtype=jnp.bfloat16))
    got = np.asarray(fn(nhwc(a["in0"]), nhwc(a["in1"])))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, a["dist_64"], rtol=0.1)


def test_jit_and_grad(ref):
    """Gradients w.r.t. x: finite, zero at x == y, equal to a finite difference along themselves."""
    a = ref["arrays"]
    distance = lp.make_lpips_distance(ref["params"], resize=False)
    # A 32 px crop keeps the backward compile small; VGG still reaches relu5_3 at 2x2.
    x, y = nhwc(a["in0"][:1, :, :32, :32]), nhwc(a["in1"][:1, :, :32, :32])
    value_and_grad = jax.jit(jax.value_and_grad(lambda x, y: distance(x, y).sum()))
    value, grad = value_and_grad(x, y)
    assert float(value) > 0
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) > 0
    _, grad_self = value_and_grad(y, y)
    assert np.all(np.isfinite(grad_self)) and float(jnp.abs(grad_self).max()) < 1e-6
    # Along the normalised gradient the directional derivative is large enough to check in float32.
    direction = grad / jnp.linalg.norm(grad)
    step = 1e-2
    plus, minus = (
        value_and_grad(x + step * direction, y)[0],
        value_and_grad(x - step * direction, y)[0],
    )
    numeric = (plus - minus) / (2 * step)
    np.testing.assert_allclose(jnp.vdot(grad, direction), numeric, rtol=1e-2)


def test_distance_passes_through_jit_as_an_argument(ref):
    """The bound distance is a pytree: as a jit argument its params are buffers, not constants."""
    a = ref["arrays"]
    distance = lp.make_lpips_distance(ref["params"], resize=False)
    x, y = nhwc(a["in0"]), nhwc(a["in1"])
    lowered = jax.jit(lambda d, x, y: d(x, y)).lower(distance, x, y)
    assert len(lowered.as_text()) < 1_000_000
    np.testing.assert_allclose(lowered.compile()(distance, x, y), a["dist_64"], rtol=1e-4)
