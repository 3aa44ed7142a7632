"""FID, IS, precision/recall, KID and the reference-file readers."""

import json
import re

import numpy as np
import pytest
import refdata

from consistency.measure import metrics


def regenerate_set(meta: dict, recipe: str, expected_sum: float | None) -> np.ndarray:
    """A feature or logits set from its fixture recipe, a numpy expression in default_rng and
    FSEED (the fixture's feature_seed), checked against its stored sum where there is one."""
    namespace = {"default_rng": np.random.default_rng, "float32": np.float32}
    namespace |= {"FSEED": meta["feature_seed"], "__builtins__": {}}
    values = np.asarray(eval(recipe, namespace), np.float32)
    if expected_sum is not None:
        assert float(values.astype(np.float64).sum()) == expected_sum, recipe
    return values


def feature_set(meta: dict, arrays: dict, name: str) -> np.ndarray:
    if name in arrays:
        return arrays[name]
    entry = meta["regenerable_sets"][name]
    return regenerate_set(meta, entry["recipe"], entry["sum"])


@pytest.fixture(scope="module", params=refdata.cases("fid_inception"))
def ref(request):
    files = request.param["files"]
    return json.loads(files[".json"].read_text()), dict(np.load(files[".npz"]))


# scipy's sqrtm and the [D, D] eigen-route cost tens of seconds at D = 2048 on two shared cores;
# above this dimension only the features route runs here (sqrtm at 2048 agreed when run by hand).
MAX_DIM_FOR_MATRIX_ROUTES = 512


def test_frechet_distance_cases(ref):
    """FID from given features, 1e-6 relative: sqrtm vs pytorch-fid and the ADM evaluator, the
    eigenvalue routes vs the float64 eigen reference (and, within 1e-6, pytorch-fid too)."""
    meta, arrays = ref
    adm = meta["fid"]["adm_evaluator"]
    assert meta["fid"]["cases"]
    for name, case in meta["fid"]["cases"].items():
        suffix = name.removeprefix("fid_")
        a = feature_set(meta, arrays, f"fid_A_{suffix}")
        b = feature_set(meta, arrays, f"fid_B_{suffix}")
        assert list(a.shape) == case["shape"] == list(b.shape)
        (mu1, s1), (mu2, s2) = metrics.feature_statistics(a), metrics.feature_statistics(b)
        np.testing.assert_allclose(np.sum((mu1 - mu2) ** 2), case["mean_term"], rtol=1e-10)
        np.testing.assert_allclose(np.trace(s1), case["trace_s1"], rtol=1e-10)
        np.testing.assert_allclose(np.trace(s2), case["trace_s2"], rtol=1e-10)
        fid_eig = metrics.fid_from_features(a, b, method="eig")
        np.testing.assert_allclose(fid_eig, case["eig_reference"], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(fid_eig, case["pytorch_fid"], rtol=1e-6, err_msg=name)
        if a.shape[1] > MAX_DIM_FOR_MATRIX_ROUTES:
            continue
        fid = metrics.frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
        np.testing.assert_allclose(fid, case["pytorch_fid"], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(fid, adm[suffix]["value"], rtol=1e-6, err_msg=name)
        fid_eig_stats = metrics.frechet_distance(mu1, s1, mu2, s2, method="eig")
        np.testing.assert_allclose(fid_eig_stats, case["eig_reference"], rtol=1e-6, err_msg=name)


def logits_cases(meta: dict) -> list:
    """(label, set name, split size, expected IS) for the IS values computed from given logits."""
    replica = meta["inception_score"]["numpy_replica"]
    cases = []
    for name, entry in replica.items():
        if "recipe" not in entry:  # IS of pool3 @ W: test_inception
            continue
        for key, value in entry.items():
            if match := re.fullmatch(r"split_(\d+)_float(32|64)", key):
                cases.append((f"{name}/{key}", name, int(match.group(1)), value))
        for key, value in meta["inception_score"]["adm_evaluator_tf"].items():
            if match := re.fullmatch(rf"{name}_split(\d+)", key):
                cases.append((f"adm/{key}", name, int(match.group(1)), value))
    return cases


def logits_sets(meta: dict) -> dict:
    """{numpy_replica name: logits}, each regenerated from its recipe and, where regenerable_sets
    holds a set of the same shape, required to equal it bit for bit (that one carries the sum)."""
    stored = {}
    for name, entry in meta["regenerable_sets"].items():
        if isinstance(entry, dict) and "logits" in name:
            values = regenerate_set(meta, entry["recipe"], entry["sum"])
            stored[values.shape] = values
    out = {}
    for name, entry in meta["inception_score"]["numpy_replica"].items():
        if "recipe" in entry:
            values = regenerate_set(meta, entry["recipe"], None)
            assert list(values.shape) == entry["shape"]
            if values.shape in stored:
                np.testing.assert_array_equal(values, stored[values.shape])
            out[name] = values
    return out


def test_inception_score_of_logits(ref):
    """ADM's split arithmetic on given logits: 1e-6 relative to the numpy replica and TF."""
    meta, _ = ref
    cases = logits_cases(meta)
    assert cases
    sets = logits_sets(meta)
    for label, name, split, want in cases:
        got = metrics.inception_score(logits=sets[name], split_size=split)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=label)


def test_frechet_distance_basics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 8))
    mu, sigma = metrics.feature_statistics(x)
    for method in ("sqrtm", "eig"):
        assert abs(metrics.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-8
    # Two Gaussians with commuting covariances: |d mu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    want = 3.0 + (1 + 1 + 4)
    for method in ("sqrtm", "eig"):
        got = metrics.frechet_distance(np.zeros(3), a, np.ones(3), b, method=method)
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # Fewer samples than dimensions: the features route equals the [D, D] routes up to the
    # latter's round-off (square roots of the ~1e-15 eigenvalues that should be 0).
    p, q = rng.standard_normal((20, 40)), 0.7 * rng.standard_normal((15, 40)) + 0.2
    stats = (*metrics.feature_statistics(p), *metrics.feature_statistics(q))
    low_rank = metrics.fid_from_features(p, q, method="eig")
    np.testing.assert_allclose(low_rank, metrics.frechet_distance(*stats, method="eig"), rtol=1e-6)
    np.testing.assert_allclose(low_rank, metrics.frechet_distance(*stats), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown Frechet method"):
        metrics.frechet_distance(mu, sigma, mu, sigma, method="svd")
    with pytest.raises(ValueError, match="mismatched"):
        metrics.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple:
    def radii(x):
        d = np.sum((x[:, None] - x[None]) ** 2, -1)
        return np.partition(d, k, axis=1)[:, k]

    def inside(q, x, r):
        return np.mean(np.any(np.sum((q[:, None] - x[None]) ** 2, -1) <= r[None], axis=1))

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_matches_brute_force():
    """Batched top-k radii and ball membership equal the all-pairs definition."""
    rng = np.random.default_rng(1)
    real = rng.standard_normal((150, 6)).astype(np.float32)
    fake = (1.3 * rng.standard_normal((100, 6)) + 0.5).astype(np.float32)
    for k in (1, 3):
        want = brute_force_precision_recall(real, fake, k)
        got = metrics.precision_recall(real, fake, k=k, batch_size=50)
        np.testing.assert_allclose(got, want, atol=1e-12)
        assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert metrics.precision_recall(real, real, k=3, batch_size=50) == (1.0, 1.0)
    assert metrics.precision_recall(real, fake + 100, k=3, batch_size=50) == (0.0, 0.0)


def test_kid():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 5))
    y = rng.standard_normal((9, 5)) + 0.3
    kernel = lambda a, b: (a @ b / 5 + 1) ** 3
    k_xx = sum(kernel(x[i], x[j]) for i in range(12) for j in range(12) if i != j) / (12 * 11)
    k_yy = sum(kernel(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    k_xy = sum(kernel(x[i], y[j]) for i in range(12) for j in range(9)) / (12 * 9)
    np.testing.assert_allclose(metrics.polynomial_mmd2_unbiased(x, y), k_xx + k_yy - 2 * k_xy)
    # A single subset as large as both sets is a permutation of them: the same MMD^2.
    full = metrics.kernel_inception_distance(x[:9], y, num_subsets=1, subset_size=9)
    np.testing.assert_allclose(full[0], metrics.polynomial_mmd2_unbiased(x[:9], y), rtol=1e-12)
    same = rng.standard_normal((2000, 16))
    other = rng.standard_normal((2000, 16))
    mean_same, std_same = metrics.kernel_inception_distance(
        same, other, num_subsets=20, subset_size=200
    )
    mean_diff, _ = metrics.kernel_inception_distance(
        same, other + 0.5, num_subsets=20, subset_size=200
    )
    assert abs(mean_same) < 3 * std_same and mean_diff > 10 * std_same


def test_reference_files_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mu, sigma = metrics.feature_statistics(rng.standard_normal((20, 6)))
    path = tmp_path / "ref.npz"
    metrics.save_reference_batch(
        path, images=images, mu=mu, sigma=sigma, mu_s=mu[:3], sigma_s=sigma[:3, :3]
    )
    batch = metrics.load_reference_batch(path)
    assert set(batch) == set(metrics.REFERENCE_BATCH_KEYS)
    np.testing.assert_array_equal(batch["arr_0"], images)
    np.testing.assert_array_equal(batch["sigma_s"], sigma[:3, :3])
    loaded_mu, loaded_sigma = metrics.load_statistics(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    metrics.save_statistics(tmp_path / "stats.npz", mu, sigma)
    assert (
        metrics.frechet_distance(*metrics.load_statistics(tmp_path / "stats.npz"), mu, sigma) < 1e-8
    )
    with pytest.raises(ValueError, match="uint8 NHWC"):
        metrics.save_reference_batch(path, images=images.astype(np.float32), mu=mu, sigma=sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(KeyError, match="mu/sigma"):
        metrics.load_statistics(tmp_path / "bad.npz")
