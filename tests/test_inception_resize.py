"""The 299 px resize of each FID protocol against the fixtures of kind `inception_resize`:
the TF1 ResizeBilinear of the ADM evaluator, clean-fid's legacy_tensorflow and pytorch-fid."""

import jax.numpy as jnp
import numpy as np
import pytest
import refdata

from consistency.measure import inception

# fixture method name -> (our protocol, the scale its outputs are stored on)
METHODS = {
    "tf1_legacy": ("tf1", 255.0),
    "cleanfid_legacy_tensorflow": ("clean_legacy", 255.0),
    "pytorch_fid": ("torch", 1.0),
}
# On the 0..255 scale. clean-fid's grid is float32 coordinates from affine_grid: its stored
# outputs differ from the exact legacy map (tf1) by up to 1.5e-3 themselves (README-diffusers).
OUTPUT_ATOL = {"tf1": 1e-3, "clean_legacy": 2e-3, "torch": 1e-3}
# Stored matrices were measured by running each method on basis images: float32 coordinates.
WEIGHT_ATOL = 1e-5


@pytest.fixture(params=refdata.cases("inception_resize"), ids=lambda c: c["name"])
def fixture(request):
    case = request.param
    meta = refdata.load_json(case["files"][".json"])
    with np.load(case["files"][".npz"]) as stored:
        arrays = {k: stored[k] for k in stored.files}
    return meta, arrays


def _crops(meta) -> dict:
    """name -> index tuple of the stored crops, parsed from the JSON ('out[:, 0:16, 0:16, :]')."""
    out = {}
    for name, text in meta["crops"].items():
        inner = text[text.index("[") + 1 : text.rindex("]")]
        index = []
        for part in inner.split(","):
            part = part.strip()
            if ":" in part:
                a, b = (int(v) if v else None for v in part.split(":"))
                index.append(slice(a, b))
            else:
                index.append(int(part))
        out[name] = tuple(index)
    return out


def _stored_name(method: str, arrays: dict, size: str) -> str:
    key = f"S{size}/{method}/"
    return method if any(k.startswith(key) for k in arrays) else f"{method}_01"


def test_weights_match_the_measured_matrices(fixture):
    meta, arrays = fixture
    for size in meta["sizes"]:
        for method, (protocol, _) in METHODS.items():
            want = arrays[f"S{size}/weights/{method}"]
            got = inception.resize_weights(int(size), protocol)
            assert got.shape == want.shape == (299, int(size))
            np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
            assert np.abs(got - want).max() <= WEIGHT_ATOL, (size, method)


def test_resized_images_match_every_protocol(fixture):
    meta, arrays = fixture
    crops = _crops(meta)
    for size in meta["sizes"]:
        images = jnp.asarray(arrays[f"S{size}/images_uint8"], jnp.float32)
        for method, (protocol, scale) in METHODS.items():
            out = np.asarray(inception.resize_for_inception(images / 255.0 * scale, protocol))
            stored = _stored_name(method, arrays, size)
            for name, index in crops.items():
                want = arrays[f"S{size}/{stored}/{name}"]
                err = np.abs(out[index] - want).max() * 255.0 / scale
                assert err <= OUTPUT_ATOL[protocol], (size, method, name, err)


def test_protocols_differ_as_the_fixture_records(fixture):
    # The legacy maps agree closely; the half-pixel one moves noise images by tens of levels.
    meta, arrays = fixture
    for size in meta["sizes"]:
        images = jnp.asarray(arrays[f"S{size}/images_uint8"], jnp.float32)
        tf1 = np.asarray(inception.resize_for_inception(images, "tf1"))
        legacy = np.asarray(inception.resize_for_inception(images, "clean_legacy"))
        torch = np.asarray(inception.resize_for_inception(images, "torch"))
        assert np.abs(tf1 - legacy).max() < 5e-3
        assert np.abs(tf1 - torch).max() > 20.0
    with pytest.raises(ValueError, match="unknown Inception resize protocol 'area'"):
        inception.resize_weights(32, "area")
