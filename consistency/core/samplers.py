"""Samplers on a consistency_fn(x, sigma): one-step and multistep (Algorithm 1)."""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from consistency.core.schedules import RHO, SIGMA_MAX, SIGMA_MIN, karras_sigmas_float64

ConsistencyFn = Callable[[jax.Array, jax.Array], jax.Array]
SAMPLER_KINDS = ("consistency", "heun", "progressive", "ddim")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How images are drawn: one spec for sampling, each evaluation setting, and editing.

    consistency: Algorithm 1 at `sigmas` (one step: (sigma_max,)); heun: an EDM model by Heun on
    a `steps`-point Karras grid (2 steps - 1 evaluations); progressive: a PD student's `steps`
    Euler steps on its ramp, then its denoiser at sigma_min (steps + 1 evaluations); ddim: a
    discrete VP teacher by DDIM (Euler in EDM variables) from the levels `sigmas` of its
    timesteps to 0 (one evaluation each). guidance:
    LCM's w, the input of a guided consistency model or the CFG scale of a heun teacher with a
    null class (None: the model takes none).
    """

    kind: str = "consistency"
    sigmas: tuple[float, ...] = (SIGMA_MAX,)
    steps: int = 0
    clip_denoised: bool = True
    guidance: float | None = None

    def __post_init__(self):
        if self.kind not in SAMPLER_KINDS:
            raise ValueError(f"unknown sampler kind {self.kind!r}; choose one of {SAMPLER_KINDS}")


def index_sigmas(
    ts: Sequence[int],
    num_scales: int,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> np.ndarray:
    """Evaluation sigmas of Algorithm 1 for indices ts on an N-point training grid (float32).

    ts must be strictly increasing and end at N-1: the last index is a terminator that is never
    evaluated (it makes the final re-noising sqrt(eps^2 - eps^2) = 0). The grid is computed in
    float64 as the reference does, so ts[0] = 0 gives exactly sigma_max.
    """
    ts = [int(t) for t in ts]
    if num_scales < 2:
        raise ValueError(f"num_scales (N) must be >= 2, got {num_scales}")
    if len(ts) < 2:
        raise ValueError(
            f"ts needs at least 2 indices (the last one N-1 = {num_scales - 1}), got {ts}"
        )
    if any(b <= a for a, b in zip(ts, ts[1:], strict=False)) or ts[0] < 0:
        raise ValueError(f"ts must be strictly increasing indices >= 0, got {ts}")
    if ts[-1] != num_scales - 1:
        raise ValueError(f"ts must end at N-1 = {num_scales - 1} (the terminator), got {ts}")
    sigmas = karras_sigmas_float64(
        ts[:-1], num_scales, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho
    )
    return sigmas.astype(np.float32)


def diffusers_sigmas(
    num_train_timesteps: int,
    *,
    timesteps: Sequence[int] | None = None,
    num_inference_steps: int | None = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> np.ndarray:
    """Evaluation sigmas of diffusers' CMStochasticIterativeScheduler (float32).

    Custom `timesteps` are strictly descending grid indices < N and are REVERSED before mapping,
    as diffusers does: timesteps=[22, 0] with N=40 gives sigmas (80, 1.3824), i.e. ts=(0, 22, 39).
    `num_inference_steps=k` uses the indices [0, r, 2r, ...] with r = N // k.
    """
    n = int(num_train_timesteps)
    if (timesteps is None) == (num_inference_steps is None):
        raise ValueError("give exactly one of timesteps or num_inference_steps")
    if timesteps is None:
        if not 1 <= num_inference_steps <= n:
            raise ValueError(f"num_inference_steps must be in [1, {n}], got {num_inference_steps}")
        timesteps = (np.arange(num_inference_steps) * (n // num_inference_steps))[::-1]
    timesteps = [int(t) for t in timesteps]
    if any(b >= a for a, b in zip(timesteps, timesteps[1:], strict=False)):
        raise ValueError(f"timesteps must be strictly descending, got {timesteps}")
    if timesteps[0] >= n or timesteps[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {n - 1}], got {timesteps}")
    sigmas = karras_sigmas_float64(
        timesteps[::-1], n, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho
    )
    return sigmas.astype(np.float32)


def validate_sigmas(sigmas, *, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX):
    """Raise unless the sigma list is non-empty, strictly decreasing, in [sigma_min, sigma_max]."""
    s = np.asarray(sigmas, np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("sigmas must hold at least one noise level")
    tol = 1e-6 * sigma_max  # float32 grids land one ulp outside [sigma_min, sigma_max]
    if s.min() < sigma_min * (1 - 1e-6) or s.max() > sigma_max + tol:
        raise ValueError(f"sigmas must lie in [{sigma_min}, {sigma_max}], got {s.tolist()}")
    if np.any(np.diff(s) >= 0):
        raise ValueError(f"sigmas must be strictly decreasing, got {s.tolist()}")


def multistep_sample(
    consistency_fn: ConsistencyFn,
    x_T: jax.Array,
    sigmas: jax.Array,
    noise: jax.Array | None,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    clip_denoised: bool = True,
    clip_output: bool = True,
) -> jax.Array:
    """Algorithm 1: x <- f(x, tau_n); x <- x + sqrt(tau_{n+1}^2 - eps^2) z_n, for tau in sigmas.

    x_T is the initial sample at sigmas[0] (sigma_max z for generation); noise holds the K-1
    re-noising draws [K-1, *x.shape] for K = len(sigmas). With clip_denoised each f output is
    clamped to [-1, 1] before re-noising; clip_output clamps the result.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32).reshape(-1)
    num = sigmas.shape[0]
    if num > 1 and (noise is None or noise.shape != (num - 1, *x_T.shape)):
        got = None if noise is None else noise.shape
        raise ValueError(f"noise must have shape {(num - 1, *x_T.shape)}, got {got}")
    # The last evaluation re-noises to eps with zero scale, so the scan body is uniform.
    next_sigmas = jnp.clip(jnp.append(sigmas[1:], sigma_min), sigma_min, sigma_max)
    zeros = jnp.zeros((1, *x_T.shape), x_T.dtype)
    noise = zeros if num == 1 else jnp.concatenate([noise.astype(x_T.dtype), zeros])

    def body(x, inputs):
        sigma, sigma_next, z = inputs
        x0 = consistency_fn(x, jnp.broadcast_to(sigma, x.shape[:1]))
        x0 = jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0
        scale = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_min**2, 0.0))
        return x0 + scale * z, None

    x, _ = jax.lax.scan(body, x_T, (sigmas, next_sigmas, noise))
    return jnp.clip(x, -1.0, 1.0) if clip_output else x


def onestep_sample(
    consistency_fn: ConsistencyFn,
    x_T: jax.Array,
    *,
    sigma_max: float = SIGMA_MAX,
    clip_output: bool = True,
) -> jax.Array:
    """x = f(x_T, T) with x_T = T z: one network evaluation."""
    x = consistency_fn(x_T, jnp.full(x_T.shape[:1], sigma_max, jnp.float32))
    return jnp.clip(x, -1.0, 1.0) if clip_output else x


def per_sample_normal(key: jax.Array, sample_ids: jax.Array, shape: Sequence[int], stream: int):
    """z_k ~ N(0, I) of `shape` for each sample id k, from fold_in(fold_in(key, k), stream).

    Stream 0 is the initial latent, stream j+1 the j-th re-noising draw, so sample k's images do
    not depend on the batch size or the device count.
    """

    def one(sample_id):
        k = jax.random.fold_in(jax.random.fold_in(key, sample_id), stream)
        return jax.random.normal(k, tuple(shape), jnp.float32)

    return jax.vmap(one)(jnp.asarray(sample_ids, jnp.uint32))


def sample(
    consistency_fn: ConsistencyFn,
    key: jax.Array,
    sample_ids: jax.Array,
    shape: Sequence[int],
    sigmas: Sequence[float],
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    clip_denoised: bool = True,
    clip_output: bool = True,
) -> jax.Array:
    """Generate one image per sample id with the multistep sampler (one step if len(sigmas) == 1).

    x_T = sigma_max z_0 and the re-noising draws come from per_sample_normal(key, id, ...).
    """
    validate_sigmas(sigmas, sigma_min=sigma_min, sigma_max=sigma_max)
    x_T = sigma_max * per_sample_normal(key, sample_ids, shape, 0)
    num = len(np.asarray(sigmas).reshape(-1))
    noise = None
    if num > 1:
        noise = jnp.stack(
            [per_sample_normal(key, sample_ids, shape, j + 1) for j in range(num - 1)]
        )
    return multistep_sample(
        consistency_fn,
        x_T,
        jnp.asarray(sigmas, jnp.float32),
        noise,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        clip_denoised=clip_denoised,
        clip_output=clip_output,
    )
