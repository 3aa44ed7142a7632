"""The FID Inception-v3 against pytorch-fid on recipe weights; IS of its features vs ADM."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata

from consistency.measure import inception as inc
from consistency.measure import metrics


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


def regenerate_set(meta: dict, name: str) -> np.ndarray:
    """A feature set from its `regenerable_sets` recipe, a numpy expression in default_rng and
    FSEED (the fixture's feature_seed), checked against its stored sum."""
    entry = meta["regenerable_sets"][name]
    namespace = {"default_rng": np.random.default_rng, "float32": np.float32}
    namespace |= {"FSEED": meta["feature_seed"], "__builtins__": {}}
    values = np.asarray(eval(entry["recipe"], namespace), np.float32)
    assert float(values.astype(np.float64).sum()) == entry["sum"], name
    return values


def parse_crops(text: str) -> dict:
    """{npz key: (row slice, col slice)} from the JSON's `name = [:, :, a:b, c:d]` descriptions."""
    crops = {}
    for name, rows, cols in re.findall(r"(\w+) = \[:, :, ([-\d:]+), ([-\d:]+)\]", text):
        to_slice = lambda s: slice(*[int(v) if v else None for v in s.split(":")])
        crops[name] = (to_slice(rows), to_slice(cols))
    return crops


@pytest.fixture(scope="module", params=refdata.cases("fid_inception"))
def ref(request):
    files = request.param["files"]
    meta = json.loads(files[".json"].read_text())
    state = regenerate_recipe(meta["recipe"])
    assert len(state) == meta["n_recipe_tensors"]
    assert sum(w.size for w in state.values()) == meta["n_params_float"]
    # The real file also holds the int64 BN counters, in file order; the mapping must skip them.
    keys = meta["state_dict_keys_all"]
    assert set(state) <= set(keys)
    state = {key: state.get(key, np.zeros((), np.int64)) for key in keys}
    variables = inc.inception_variables_from_torch(state)
    return {"meta": meta, "arrays": dict(np.load(files[".npz"])), "state": state, "vars": variables}


@pytest.fixture(scope="module")
def outputs(ref):
    """One jitted forward of the fixture images (NCHW -> NHWC), with the sown block outputs."""
    images = jnp.asarray(ref["arrays"]["images"].transpose(0, 2, 3, 1))
    apply = jax.jit(lambda v, x: inc.FIDInceptionV3().apply(v, x, mutable=["intermediates"]))
    out, state = apply(ref["vars"], images)
    blocks = {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
    return {k: np.asarray(v) for k, v in out.items()} | {"blocks": blocks}


def assert_close_to_scale(got: np.ndarray, want: np.ndarray) -> None:
    """1e-4 relative to the reference's scale, as the fixture README asks of networks."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_mapping_is_strict(ref):
    broken = dict(ref["state"])
    del broken["Mixed_6d.branch1x1.bn.running_var"]
    with pytest.raises(ValueError, match="Mixed_6d/branch1x1/bn/var"):
        inc.inception_variables_from_torch(broken)
    with pytest.raises(ValueError, match="unexpected tensor"):
        inc.inception_variables_from_torch(ref["state"] | {"Mixed_5b.branch1x1.conv.bias": 0})
    with pytest.raises(ValueError, match="AuxLogits/fc/kernel"):
        inc.inception_variables_from_torch(ref["state"] | {"AuxLogits.fc.weight": np.zeros(2)})


def test_resize_matches_torch(ref):
    meta, a = ref["meta"], ref["arrays"]
    images = jnp.asarray(a["images"].transpose(0, 2, 3, 1))
    resized = np.asarray(inc.resize_for_inception(images)).transpose(0, 3, 1, 2)
    info = meta["inputs"]["resized299"]
    assert list(resized.shape) == info["shape"]
    np.testing.assert_allclose(resized.astype(np.float64).sum(), info["sum"], rtol=1e-6)
    crops = parse_crops(meta["inputs"]["resized_crops"])
    assert crops, "no crop descriptions found in the fixture"
    for key, (rows, cols) in crops.items():
        np.testing.assert_allclose(resized[:, :, rows, cols], a[key], rtol=0, atol=1e-5)


def test_block_channel_means(ref, outputs):
    """Spatial means after the two stem pools and Mixed_6e: where to look when pool3 is off."""
    checked = 0
    for key, want in ref["arrays"].items():
        match = re.fullmatch(r"(block\d)_.*_channel_mean", key)
        if match:
            got = outputs["blocks"][match.group(1)].mean(axis=(1, 2))
            assert_close_to_scale(got, want)
            checked += 1
    assert checked > 0


def test_pool3_and_logits(ref, outputs):
    a = ref["arrays"]
    for key in ("pool3", "logits", "logits_nobias"):
        assert_close_to_scale(outputs[key], a[key])
    np.testing.assert_allclose(
        outputs["pool3"].astype(np.float64).sum(), ref["meta"]["outputs"]["pool3_sum"], rtol=1e-5
    )


def test_spatial_features(ref, outputs):
    """sFID features: Mixed_6d's 1x1 branch (post-ReLU), first 7 channels of 17x17, HWC order."""
    spatial = outputs["spatial"]
    side = ref["meta"]["outputs"]["block_shapes"]["block2_mixed6e_768ch"][-1]
    assert spatial.shape == (len(ref["arrays"]["images"]), side * side * inc.SPATIAL_CHANNELS)
    assert np.all(spatial >= 0) and np.all(np.isfinite(spatial)) and spatial.std() > 0


def test_uint8_input_is_scaled():
    """uint8 images (the ADM batch format) are read as x / 255, then resized and mapped to 2x-1."""
    x8 = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    from_u8 = inc.preprocess_for_inception(jnp.asarray(x8))
    from_float = inc.preprocess_for_inception(jnp.asarray(x8 / 255.0, jnp.float32))
    assert from_u8.shape == (2, inc.INPUT_SIZE, inc.INPUT_SIZE, 3)
    np.testing.assert_allclose(from_u8, from_float, rtol=0, atol=1e-6)
    assert float(from_u8.min()) >= -1 and float(from_u8.max()) <= 1


def inception_score_cases(meta: dict) -> list:
    """(name, activations key, split size, expected IS) for the IS values computed from features."""
    cases = []
    replica = meta["inception_score"]["numpy_replica"]
    for name, entry in replica.items():
        if "recipe" in entry:  # logits sets: test_metrics
            continue
        for key, value in entry.items():
            match = re.fullmatch(r"split_(\d+)_float32", key)
            if match:
                cases.append((name, "pool3", int(match.group(1)), value))
    for key, value in meta["inception_score"]["adm_evaluator_tf"].items():
        if match := re.fullmatch(r"images_pool3_W_no_bias_split(\d+)", key):
            cases.append((key, "pool3", int(match.group(1)), value))
        elif match := re.fullmatch(r"(\w+)_as_activations_split(\d+)", key):
            cases.append((key, match.group(1), int(match.group(2)), value))
    return cases


def test_inception_score_of_features(ref):
    """ADM's IS = softmax(acts @ W), no bias, from given features: 1e-6 relative."""
    meta, a = ref["meta"], ref["arrays"]
    weight = ref["state"]["fc.weight"].T
    cases = inception_score_cases(meta)
    assert cases
    for name, source, split, want in cases:
        acts = a[source] if source in a else regenerate_set(meta, source)
        got = metrics.inception_score(activations=acts, weight=weight, split_size=split)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
