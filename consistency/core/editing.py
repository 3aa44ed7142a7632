"""Zero-shot editing (Algorithm 4) and its tasks, plus ternary search over 2-step indices."""

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from consistency.core.samplers import (
    ConsistencyFn,
    multistep_sample,
    onestep_sample,
    per_sample_normal,
    validate_sigmas,
)
from consistency.core.schedules import SIGMA_MAX, SIGMA_MIN

# ITU-R BT.601 luma weights: the grey level kept by colorization.
LUMA = (0.2989, 0.5870, 0.1140)


class LinearTransform(NamedTuple):
    """An invertible linear map A on NHWC images: forward(x) = A x, inverse(a) = A^-1 a."""

    forward: Callable[[jax.Array], jax.Array]
    inverse: Callable[[jax.Array], jax.Array]


IDENTITY = LinearTransform(lambda x: x, lambda a: a)


def _matmul(a: jax.Array, q: jax.Array) -> jax.Array:
    # The exact-preservation properties need full float32 matmuls, also on TF32/bf16 hardware.
    return jnp.matmul(a, q, precision=jax.lax.Precision.HIGHEST)


def orthogonal_basis(v: Sequence[float]) -> np.ndarray:
    """Orthogonal Q (float64) with Q[:, 0] = v/|v|, the sign chosen so that sum(Q[:, 0]) > 0.

    The other columns come from a QR decomposition and are arbitrary: only column 0 decides what
    a mask on component 0 keeps.
    """
    v = np.asarray(v, np.float64).reshape(-1)
    if v[0] == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"v must be finite with v[0] != 0 (it replaces e_0 before QR), got {v}")
    m = np.eye(v.size)
    m[:, 0] = v / np.linalg.norm(v)
    q = np.linalg.qr(m)[0]
    return -q if q[:, 0].sum() < 0 else q


def colorization_basis() -> np.ndarray:
    """3x3 per-pixel basis whose first column is the normalised luma vector LUMA."""
    return orthogonal_basis(LUMA)


def patch_basis(patch_size: int) -> np.ndarray:
    """p^2 x p^2 basis whose first column is 1/p: component 0 of a flattened patch is p * mean."""
    return orthogonal_basis(np.ones(int(patch_size) ** 2))


def channel_transform(q: np.ndarray) -> LinearTransform:
    """A x = Q^T x per pixel (channels last): coordinates of each pixel's colour in the basis Q."""
    q = jnp.asarray(q, jnp.float32)
    return LinearTransform(lambda x: _matmul(x, q), lambda a: _matmul(a, q.T))


def _check_patch_size(shape: Sequence[int], patch_size: int):
    if patch_size < 1 or shape[1] % patch_size or shape[2] % patch_size:
        raise ValueError(
            f"patch_size {patch_size} must divide the image height and width {tuple(shape[1:3])};"
            " pick a divisor of both, or crop/pad the images"
        )


def patch_transform(q: np.ndarray, patch_size: int) -> LinearTransform:
    """A x = Q^T patch per channel: [B, H, W, C] -> [B, H/p, W/p, C, p^2] (patch rows flattened)."""
    p = int(patch_size)
    q = jnp.asarray(q, jnp.float32)
    if q.shape != (p * p, p * p):
        raise ValueError(f"q must be ({p * p}, {p * p}) for patch_size {p}, got {q.shape}")

    def forward(x):
        _check_patch_size(x.shape, p)
        b, h, w, c = x.shape
        patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
        return _matmul(patches.reshape(b, h // p, w // p, c, p * p), q)

    def inverse(a):
        b, hp, wp, c, _ = a.shape
        patches = _matmul(a, q.T).reshape(b, hp, wp, c, p, p).transpose(0, 1, 4, 2, 5, 3)
        return patches.reshape(b, hp * p, wp * p, c)

    return LinearTransform(forward, inverse)


def replace(
    known: jax.Array, other: jax.Array, *, transform: LinearTransform, mask: jax.Array
) -> jax.Array:
    """R(a, b) = A^-1[A a * M + A b * (1 - M)]: components with M = 1 from a, the rest from b."""
    fa, fb = transform.forward(known), transform.forward(other)
    return transform.inverse(fa * mask + fb * (1 - mask))


def _check_mask(mask: jax.Array, images: jax.Array, transform: LinearTransform) -> jax.Array:
    coeff_shape = jax.eval_shape(transform.forward, images).shape
    mask = jnp.asarray(mask, jnp.float32)
    try:
        ok = jnp.broadcast_shapes(mask.shape, coeff_shape) == tuple(coeff_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to the transformed images "
            f"{tuple(coeff_shape)}; give it in A-space (1 = known), e.g. of shape "
            f"{tuple(coeff_shape)} or {tuple(coeff_shape[1:])}"
        )
    return mask


def _start_and_noise(start, sigmas, x_init, noise, key, sample_ids):
    """x_init = start + sigmas[0] z_0 and the K-1 re-noising draws, unless given."""
    num = len(sigmas)
    if x_init is not None and tuple(x_init.shape) != tuple(start.shape):
        raise ValueError(f"x_init must have the images' shape {start.shape}, got {x_init.shape}")
    if key is None and (x_init is None or (noise is None and num > 1)):
        raise ValueError("give x_init and noise, or a key to draw them per sample id")
    ids = jnp.arange(start.shape[0]) if sample_ids is None else jnp.asarray(sample_ids)
    if ids.shape != start.shape[:1]:
        raise ValueError(f"sample_ids must have shape {start.shape[:1]}, got {ids.shape}")
    shape = start.shape[1:]
    if x_init is None:
        x_init = start + float(sigmas[0]) * per_sample_normal(key, ids, shape, 0)
    if noise is None and num > 1:
        noise = jnp.stack([per_sample_normal(key, ids, shape, j + 1) for j in range(num - 1)])
    return jnp.asarray(x_init, jnp.float32), noise


def zero_shot_edit(
    consistency_fn: ConsistencyFn,
    images: jax.Array,
    sigmas: Sequence[float],
    *,
    transform: LinearTransform,
    mask: jax.Array,
    fill: float = 0.0,
    x_init: jax.Array | None = None,
    noise: jax.Array | None = None,
    key: jax.Array | None = None,
    sample_ids: jax.Array | None = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Algorithm 4: x0 = R(y, clip(f(x, tau_n))); x = x0 + sqrt(tau_{n+1}^2 - eps^2) z_n.

    R(a, b) = A^-1[A a * M + A b * (1 - M)] with mask M = 1 on the KNOWN components of A-space.
    The reference is y = R(images, fill): the kept components of the images, `fill` elsewhere.
    sigmas are the evaluation levels (e.g. samplers.index_sigmas(ts, N)). Unless given, x_init =
    y + sigmas[0] z_0 and the re-noising draws come from per_sample_normal(key, sample_ids, ...).
    Returns (x, y); x is not clamped after the last step, as in the reference code.
    """
    validate_sigmas(sigmas, sigma_min=sigma_min, sigma_max=sigma_max)
    images = jnp.asarray(images, jnp.float32)
    mask = _check_mask(mask, images, transform)
    reference = replace(images, jnp.full_like(images, fill), transform=transform, mask=mask)
    x_init, noise = _start_and_noise(reference, sigmas, x_init, noise, key, sample_ids)

    def projected_fn(x, sigma):
        x0 = consistency_fn(x, sigma)
        x0 = jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0
        return replace(reference, x0, transform=transform, mask=mask)

    # Algorithm 1's scan with the projection folded into f: one re-noising formula in the codebase.
    x = multistep_sample(
        projected_fn,
        x_init,
        jnp.asarray(sigmas, jnp.float32),
        noise,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        clip_denoised=False,
        clip_output=False,
    )
    return x, reference


def inpaint(
    consistency_fn: ConsistencyFn,
    images: jax.Array,
    mask: jax.Array,
    sigmas: Sequence[float],
    *,
    fill: float = -1.0,
    **options: Any,
) -> tuple[jax.Array, jax.Array]:
    """Inpainting: A = I, R(a, b) = a * mask + b * (1 - mask); mask = 1 on KNOWN pixels.

    mask broadcasts to the NHWC images ([B, H, W, C], [H, W, 1], ...). Unknown pixels of the
    returned reference are `fill` (-1, black, as the reference code shows them). `options` are
    zero_shot_edit's keyword arguments (x_init, noise, key, sample_ids, sigma_min, ...).
    """
    return zero_shot_edit(
        consistency_fn, images, sigmas, transform=IDENTITY, mask=mask, fill=fill, **options
    )


def colorize(
    consistency_fn: ConsistencyFn, images: jax.Array, sigmas: Sequence[float], **options: Any
) -> tuple[jax.Array, jax.Array]:
    """Colorization: keep each pixel's grey component q0^T x, q0 = luma/|luma|; generate the rest.

    images are NHWC with 3 channels (a grey image repeated 3 times works). Returns (x, grey
    reference q0 q0^T images). `options` are zero_shot_edit's keyword arguments.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be NHWC with 3 channels, got shape {images.shape}")
    mask = jnp.array([1.0, 0.0, 0.0])
    transform = channel_transform(colorization_basis())
    return zero_shot_edit(consistency_fn, images, sigmas, transform=transform, mask=mask, **options)


def superresolve(
    consistency_fn: ConsistencyFn,
    images: jax.Array,
    sigmas: Sequence[float],
    *,
    patch_size: int,
    **options: Any,
) -> tuple[jax.Array, jax.Array]:
    """Super-resolution: keep each p x p patch's mean (per channel), generate the detail.

    images are NHWC at full size; only their patch means matter, so a low-resolution image
    upsampled by nearest neighbour (jnp.repeat on H and W) is the usual input. p must divide H
    and W. Returns (x, patch-mean reference). `options` are zero_shot_edit's keyword arguments.
    """
    p = int(patch_size)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC, got shape {images.shape}")
    _check_patch_size(images.shape, p)
    mask = jnp.zeros(p * p).at[0].set(1.0)
    transform = patch_transform(patch_basis(p), p)
    return zero_shot_edit(consistency_fn, images, sigmas, transform=transform, mask=mask, **options)


def stroke_guided(
    consistency_fn: ConsistencyFn,
    strokes: jax.Array,
    sigmas: Sequence[float],
    *,
    x_init: jax.Array | None = None,
    noise: jax.Array | None = None,
    key: jax.Array | None = None,
    sample_ids: jax.Array | None = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    clip_denoised: bool = True,
    clip_output: bool = True,
) -> jax.Array:
    """Stroke-guided generation (SDEdit-like): x = strokes + tau_1 z, then Algorithm 1 from tau_1.

    sigmas[0] is the chosen starting level: small keeps the strokes, large keeps only their
    layout (e.g. samplers.index_sigmas((k, ..., N-1), N) starts at index k).
    """
    validate_sigmas(sigmas, sigma_min=sigma_min, sigma_max=sigma_max)
    strokes = jnp.asarray(strokes, jnp.float32)
    x_init, noise = _start_and_noise(strokes, sigmas, x_init, noise, key, sample_ids)
    return multistep_sample(
        consistency_fn,
        x_init,
        jnp.asarray(sigmas, jnp.float32),
        noise,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        clip_denoised=clip_denoised,
        clip_output=clip_output,
    )


def denoise(
    consistency_fn: ConsistencyFn,
    noisy: jax.Array,
    sigma: float,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
) -> jax.Array:
    """Denoising: x = f(noisy, sigma), one evaluation at the images' noise level sigma."""
    validate_sigmas([sigma], sigma_min=sigma_min, sigma_max=sigma_max)
    return consistency_fn(noisy, jnp.full(noisy.shape[:1], sigma, jnp.float32))


@jax.jit
def slerp(z0: jax.Array, z1: jax.Array, alphas: jax.Array) -> jax.Array:
    """z = sin((1-a) th)/sin th z0 + sin(a th)/sin th z1, th = angle(z0, z1) per example.

    z0, z1 are [B, ...] pairs and alphas [K]; returns [K, B, ...]. Nearly parallel pairs fall
    back to linear interpolation, where the sine ratios tend to it.
    """
    z0, z1 = jnp.asarray(z0, jnp.float32), jnp.asarray(z1, jnp.float32)
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {z0.shape} and {z1.shape}")
    axes = tuple(range(1, z0.ndim))
    norms = jnp.sqrt(jnp.sum(z0 * z0, axes) * jnp.sum(z1 * z1, axes))
    cos = jnp.sum(z0 * z1, axes) / norms
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    a = jnp.asarray(alphas, jnp.float32).reshape(-1, 1)
    sin = jnp.sin(theta)
    parallel = sin < 1e-6
    safe_sin = jnp.where(parallel, 1.0, sin)
    w0 = jnp.where(parallel, 1.0 - a, jnp.sin((1.0 - a) * theta) / safe_sin)
    w1 = jnp.where(parallel, a, jnp.sin(a * theta) / safe_sin)
    expand = (...,) + (None,) * len(axes)
    return w0[expand] * z0 + w1[expand] * z1


def interpolate(
    consistency_fn: ConsistencyFn,
    z0: jax.Array,
    z1: jax.Array,
    alphas: jax.Array,
    *,
    sigma_max: float = SIGMA_MAX,
    clip_output: bool = True,
) -> jax.Array:
    """Interpolation: x = f(T slerp(z0, z1, a), T) for each a, with z0, z1 ~ N(0, I) latents.

    z0, z1 are [B, H, W, C] pairs and alphas [K]; returns [K, B, H, W, C].
    """
    z = slerp(z0, z1, alphas)
    flat = z.reshape(-1, *z.shape[2:])
    x = onestep_sample(
        consistency_fn, sigma_max * flat, sigma_max=sigma_max, clip_output=clip_output
    )
    return x.reshape(z.shape)


def ternary_search(
    score_fn: Callable[[int], float], lo: int, hi: int
) -> tuple[int, dict[int, float]]:
    """argmin of a unimodal score over the integers [lo, hi]; each index is scored at most once.

    The paper picked the middle index of 2-step sampling this way (22 of 40 on ImageNet-64), with
    score_fn(k) = FID of samples at samplers.index_sigmas((0, k, N-1), N). Returns the best index
    seen and the record {index: score} of every evaluation, in evaluation order.
    """
    lo, hi = int(lo), int(hi)
    if lo > hi:
        raise ValueError(f"ternary_search needs lo <= hi, got lo={lo}, hi={hi}")
    record: dict[int, float] = {}

    def score(i):
        if i not in record:
            record[i] = float(score_fn(i))
            if not math.isfinite(record[i]):
                raise ValueError(f"score_fn({i}) returned {record[i]}; scores must be finite")
        return record[i]

    while hi - lo > 2:
        third = (hi - lo) // 3
        m1, m2 = lo + third, hi - third
        s1, s2 = score(m1), score(m2)
        if s1 < s2:  # the minimum cannot lie at or beyond m2
            hi = m2 - 1
        elif s1 > s2:  # nor at or before m1
            lo = m1 + 1
        else:
            lo, hi = m1, m2
    for i in range(lo, hi + 1):
        score(i)
    best = min(record, key=lambda i: (record[i], i))
    return best, record
