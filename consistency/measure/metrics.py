"""Sample-quality metrics on Inception features (FID, sFID, IS, precision/recall, KID) and files."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

# ---------------------------------------------------------------------------------------------
# Frechet distance (FID on pool3 features, sFID on the spatial features)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, Sigma) = (mean, np.cov(rowvar=False)) of [N, D] features, in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need [N >= 2, D] features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """tr sqrtm(S1 S2) by scipy's sqrtm, as pytorch-fid and the ADM evaluator compute it."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product: retry with eps on the diagonals, as both references do.
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Rank-deficient covariances give tiny imaginary parts from round-off; large ones mean
        # the result is not trustworthy (the "eig" method is the robust alternative).
        imag = np.abs(np.diagonal(covmean).imag).max()
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(S1 S2) has a significant imaginary part ({imag:.3g})")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eig(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(S1 S2) = sum_i sqrt(lambda_i(S1^1/2 S2 S1^1/2)): symmetric PSD, fine at low rank."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sum(np.sqrt(np.clip(eigenvalues, 0, None))))


def _trace_sqrt_product_low_rank(centered1: np.ndarray, centered2: np.ndarray) -> float:
    """tr sqrt(S1 S2) = ||X1 X2^T||_* / sqrt((n1 - 1)(n2 - 1)) for centred features X1, X2.

    The nonzero eigenvalues of S1 S2 = X1^T X1 X2^T X2 / c are those of (X1 X2^T)(X1 X2^T)^T / c:
    an [n1, n2] SVD instead of [D, D] decompositions when there are fewer samples than dimensions.
    """
    scale = np.sqrt((len(centered1) - 1) * (len(centered2) - 1))
    singular_values = np.linalg.svd(centered1 @ centered2.T, compute_uv=False)
    return float(singular_values.sum() / scale)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    *,
    method: str = "sqrtm",
    eps: float = 1e-6,
) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    method: "sqrtm" (scipy's matrix square root: the numbers pytorch-fid and the ADM evaluator
    report) or "eig" (eigenvalues of S1^1/2 S2 S1^1/2: well defined for the rank-deficient
    covariances of fewer samples than dimensions, where sqrtm is ill-conditioned).
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    elif method == "eig":
        tr_covmean = _trace_sqrt_product_eig(s1, s2)
    else:
        raise ValueError(f"unknown Frechet method: {method!r}; choose one of 'sqrtm', 'eig'")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(
    features1: np.ndarray, features2: np.ndarray, *, method: str = "sqrtm"
) -> float:
    """Frechet distance between the Gaussians fitted to two [N, D] feature sets (pool3: FID; the
    Inception's spatial features: sFID).

    With method="eig" and fewer samples than dimensions, tr sqrt(S1 S2) comes from the features
    (an [N1, N2] SVD): the same quantity, cheaper and without the round-off of the [D, D] route.
    """
    if method == "eig" and max(len(features1), len(features2)) < np.shape(features1)[1]:
        x1, x2 = (np.asarray(f, np.float64) for f in (features1, features2))
        c1, c2 = x1 - x1.mean(axis=0), x2 - x2.mean(axis=0)
        diff = x1.mean(axis=0) - x2.mean(axis=0)
        traces = np.sum(c1**2) / (len(c1) - 1) + np.sum(c2**2) / (len(c2) - 1)
        return float(diff @ diff + traces - 2 * _trace_sqrt_product_low_rank(c1, c2))
    stats1, stats2 = feature_statistics(features1), feature_statistics(features2)
    return frechet_distance(*stats1, *stats2, method=method)


# ---------------------------------------------------------------------------------------------
# Inception Score


def inception_score(
    *,
    logits: np.ndarray | None = None,
    activations: np.ndarray | None = None,
    weight: np.ndarray | None = None,
    split_size: int = 5000,
) -> float:
    """IS = mean over splits of exp(E_x KL(p(y|x) || p(y))), with the ADM evaluator's arithmetic.

    p(y|x) = softmax(logits), or softmax(activations @ weight) with no bias (ADM: pool3 times the
    graph's softmax/logits/MatMul weight, [2048, 1008]); float32 throughout. Splits are
    consecutive blocks of `split_size` rows (the last may be shorter).
    """
    if (logits is None) == (activations is None):
        raise ValueError("give exactly one of logits or activations (with weight)")
    if logits is None:
        if weight is None:
            raise ValueError("activations need the classifier weight [D, classes]")
        logits = np.asarray(activations, np.float32) @ np.asarray(weight, np.float32)
    logits = np.asarray(logits, np.float32)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    preds = shifted / shifted.sum(axis=1, keepdims=True)
    scores = []
    for start in range(0, len(preds), split_size):
        part = preds[start : start + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def class_accuracy(logits, labels) -> float:
    """mean_k [argmax_c logits[k, c] == labels[k]]: with a classifier's logits of class-
    conditional samples and the labels they were asked for, how often the class is recognised."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits [N, classes] and labels [N]; got {logits.shape}, {labels.shape}")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


# ---------------------------------------------------------------------------------------------
# Improved precision and recall (Kynkaanniemi et al. 2019), as the ADM evaluator computes them


@jax.jit
def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """|a_i - b_j|^2 for [M, D] x [N, D] -> [M, N], float32, clamped at 0 against round-off."""
    sq_a = jnp.sum(jnp.square(a), axis=1)[:, None]
    sq_b = jnp.sum(jnp.square(b), axis=1)[None, :]
    return jnp.maximum(sq_a - 2 * a @ b.T + sq_b, 0.0)


@functools.partial(jax.jit, static_argnames="count")
def _smallest_distances(rows: jax.Array, cols: jax.Array, count: int) -> jax.Array:
    """The `count` smallest squared distances from each row to the columns, ascending."""
    return -jax.lax.top_k(-_squared_distances(rows, cols), count)[0]


@jax.jit
def _inside_any_ball(rows: jax.Array, centres: jax.Array, radii: jax.Array) -> jax.Array:
    return jnp.any(_squared_distances(rows, centres) <= radii[None, :], axis=1)


def manifold_radii(features: np.ndarray, *, k: int = 3, batch_size: int = 10000) -> np.ndarray:
    """r_i^2 = squared distance from feature i to its k-th nearest other feature in the set."""
    features = np.asarray(features, np.float32)
    radii = []
    for start in range(0, len(features), batch_size):
        rows = features[start : start + batch_size]
        # Each row's own zero distance is the smallest, so the (k+1)-th smallest is the k-th
        # neighbour, which is what ADM's np.partition(kth=k) over the whole set picks.
        best = []
        for col in range(0, len(features), batch_size):
            cols = features[col : col + batch_size]
            best.append(np.asarray(_smallest_distances(rows, cols, min(k + 1, len(cols)))))
        radii.append(np.partition(np.concatenate(best, axis=1), k, axis=1)[:, k])
    return np.concatenate(radii)


def within_manifold(
    queries: np.ndarray, features: np.ndarray, radii: np.ndarray, *, batch_size: int = 10000
) -> np.ndarray:
    """in_q = any_j |q - f_j|^2 <= r_j^2: whether each query falls in some k-NN ball of the set."""
    queries, features = np.asarray(queries, np.float32), np.asarray(features, np.float32)
    radii = np.asarray(radii, np.float32)
    inside = np.zeros(len(queries), bool)
    for start in range(0, len(queries), batch_size):
        rows = queries[start : start + batch_size]
        for col in range(0, len(features), batch_size):
            cols, col_radii = features[col : col + batch_size], radii[col : col + batch_size]
            inside[start : start + len(rows)] |= np.asarray(_inside_any_ball(rows, cols, col_radii))
    return inside


def precision_recall(
    real: np.ndarray, fake: np.ndarray, *, k: int = 3, batch_size: int = 10000
) -> tuple[float, float]:
    """precision = P_fake[x in manifold(real)], recall = P_real[x in manifold(fake)], k-NN balls.

    ADM computes its distance blocks in float16 first (float32 only if that overflows); here
    they are float32, so a sample on the edge of a ball may be counted differently.
    """
    real_radii = manifold_radii(real, k=k, batch_size=batch_size)
    fake_radii = manifold_radii(fake, k=k, batch_size=batch_size)
    precision = within_manifold(fake, real, real_radii, batch_size=batch_size).mean()
    recall = within_manifold(real, fake, fake_radii, batch_size=batch_size).mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------
# Kernel Inception Distance (Binkowski et al. 2018)


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, diagonal terms excluded, in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n, dim = len(x), len(y), x.shape[1]
    k_xx = (x @ x.T / dim + 1) ** 3
    k_yy = (y @ y.T / dim + 1) ** 3
    k_xy = (x @ y.T / dim + 1) ** 3
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2 * k_xy.mean())


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID = mean (and std) over random subsets (without replacement) of the polynomial MMD^2_u."""
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(features1), len(features2))
    values = []
    for _ in range(num_subsets):
        x = features1[rng.choice(len(features1), size, replace=False)]
        y = features2[rng.choice(len(features2), size, replace=False)]
        values.append(polynomial_mmd2_unbiased(x, y))
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------------------------
# Reference files: ADM reference/sample batches and plain mu/sigma statistics

REFERENCE_BATCH_KEYS = ("arr_0", "mu", "sigma", "mu_s", "sigma_s")


def load_reference_batch(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An ADM batch npz: arr_0 (uint8 NHWC images) and, in reference batches, mu/sigma (pool3)
    and mu_s/sigma_s (spatial); every array in the file is returned, keyed as stored."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def save_reference_batch(
    path: str | os.PathLike,
    *,
    images: np.ndarray | None = None,
    mu: np.ndarray,
    sigma: np.ndarray,
    mu_s: np.ndarray | None = None,
    sigma_s: np.ndarray | None = None,
) -> None:
    """Write an npz the ADM evaluator reads as a reference batch (images only for P/R)."""
    arrays = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 NHWC RGB, got {images.dtype} {images.shape}")
        arrays["arr_0"] = images
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items() if v is not None})


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an npz with keys mu and sigma (clean-fid, EDM fid-refs, ADM batches)."""
    with np.load(path) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise KeyError(f"{path} has no mu/sigma arrays (keys: {data.files})")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write mu and sigma as an npz that clean-fid/EDM-style readers and load_statistics accept."""
    np.savez(path, mu=np.asarray(mu), sigma=np.asarray(sigma))
