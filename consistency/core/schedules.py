"""Noise grids and curricula: the Karras sigma grid, N(k) and mu(k), training noise levels."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from consistency.core import keys

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0

TARGET_EMA_MODES = ("fixed", "adaptive")
SCALE_MODES = ("fixed", "progressive", "progdist", "exponential")


def karras_sigma(
    index: jax.Array,
    num_scales: jax.Array | int,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> jax.Array:
    """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    Index 0 is the LARGEST noise level, index N-1 the smallest. `index` and `num_scales` may be
    traced, so a jitted step whose N(k) changes with the step never recompiles.
    """
    index = jnp.asarray(index, jnp.float32)
    n_minus_1 = jnp.asarray(num_scales, jnp.float32) - 1.0
    max_inv_rho = sigma_max ** (1.0 / rho)
    min_inv_rho = sigma_min ** (1.0 / rho)
    return (max_inv_rho + index / n_minus_1 * (min_inv_rho - max_inv_rho)) ** rho


def karras_sigmas(
    num_scales: int,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    append_zero: bool = False,
) -> jax.Array:
    """The whole grid [sigma_0 > ... > sigma_{N-1}] (float32), optionally followed by 0."""
    if int(num_scales) < 2:
        raise ValueError(f"num_scales must be >= 2 for a Karras grid, got {num_scales}")
    sigmas = karras_sigma(
        jnp.arange(num_scales), num_scales, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho
    )
    return jnp.append(sigmas, 0.0) if append_zero else sigmas


def karras_sigmas_float64(
    indices, num_scales: int, *, sigma_min: float, sigma_max: float, rho: float
) -> np.ndarray:
    """The grid at static integer indices, computed on the host in float64 (sigma_0 = sigma_max)."""
    ramp = np.asarray(indices, np.float64) / (num_scales - 1)
    max_inv_rho, min_inv_rho = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def progdist_sigmas(
    index: jax.Array,
    num_scales: jax.Array | int,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sigma(i/N), sigma((i+1/2)/N), sigma((i+1)/N)): a student step and its two teacher steps.

    sigma(u) = (sigma_max^(1/rho) + u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho is the Karras
    ramp at a fractional position u in [0, 1] (karras_sigma with N = 2 takes u itself, as
    sample_rho_uniform_sigma does). Unlike the CD/CT grid (i/(N-1)), the student's N steps span
    the ends: i = 0 starts at sigma_max and i = N-1 ends at sigma_min; N = 1 is allowed.
    """
    grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    i = jnp.asarray(index, jnp.float32)
    n = jnp.asarray(num_scales, jnp.float32)
    return tuple(karras_sigma((i + offset) / n, 2, **grid) for offset in (0.0, 0.5, 1.0))


def adaptive_num_scales(
    step: jax.Array, *, start_scales: int, end_scales: int, total_steps: int
) -> jax.Array:
    """N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1, the inner term at least 1.

    As the official code computes it: steps past K are not clamped; N(0) = s0 and N(K) = s1 + 1.
    """
    k = jnp.asarray(step, jnp.float32)
    inner = jnp.sqrt(k / total_steps * ((end_scales + 1) ** 2 - start_scales**2) + start_scales**2)
    n = jnp.maximum(jnp.ceil(inner - 1).astype(jnp.int32), 1)
    return n + 1


def exponential_num_scales(
    step: jax.Array, *, start_scales: int, end_scales: int, total_steps: int
) -> jax.Array:
    """iCT: N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)).

    s0 = 10, s1 = 1280, K = 400k gives N = 11, 21, 41, ..., 1281, each for K' = 50k steps.
    """
    stage_len = max(total_steps // (int(math.log2(end_scales // start_scales)) + 1), 1)
    doublings = jnp.minimum(jnp.asarray(step, jnp.int32) // stage_len, 30)
    n = jnp.minimum(start_scales * 2.0 ** doublings.astype(jnp.float32), end_scales)
    return n.astype(jnp.int32) + 1


def adaptive_target_ema(num_scales: jax.Array, *, start_ema: float, start_scales: int) -> jax.Array:
    """mu(k) = exp(s0 ln(mu0) / (N(k) - 1)) = mu0^(s0/(N(k)-1)), with N - 1 as the official code."""
    n = jnp.asarray(num_scales, jnp.float32) - 1.0
    return jnp.exp(start_scales * jnp.log(jnp.float32(start_ema)) / n)


def progdist_num_scales(
    step: jax.Array, *, start_scales: int, distill_steps_per_iter: int
) -> jax.Array:
    """Progressive-distillation stages: N halves every stage down to 2, then a final stage of 1."""
    step = jnp.asarray(step, jnp.int32)
    scales = jnp.maximum(start_scales // (2 ** (step // distill_steps_per_iter)), 2)
    # The last halving (2 -> 1) comes after log2(N0)-1 stages and lasts twice as long.
    last_start = distill_steps_per_iter * (int(np.log2(start_scales)) - 1)
    sub_stage = jnp.maximum(step - last_start, 0) // (2 * distill_steps_per_iter)
    sub_scales = jnp.maximum(2 // (2 ** jnp.minimum(sub_stage, 1)), 1)
    return jnp.where(scales == 2, sub_scales, scales).astype(jnp.int32)


def ema_and_scales(
    step: jax.Array,
    *,
    target_ema_mode: str,
    scale_mode: str,
    start_ema: float,
    start_scales: int,
    end_scales: int,
    total_steps: int,
    distill_steps_per_iter: int = 50000,
) -> tuple[jax.Array, jax.Array]:
    """(mu(k), N(k)) for the configured curriculum, as traced functions of the step.

    Modes (as the official code): fixed/fixed, adaptive/progressive, fixed/progressive (fixed
    mu with progressive N) and fixed/progdist (mu = 1); iCT adds fixed/exponential.
    """
    validate_schedule(target_ema_mode, scale_mode, start_scales, end_scales)
    if scale_mode == "fixed":
        num_scales = jnp.asarray(start_scales, jnp.int32)
    elif scale_mode == "progressive":
        num_scales = adaptive_num_scales(
            step, start_scales=start_scales, end_scales=end_scales, total_steps=total_steps
        )
    elif scale_mode == "exponential":
        num_scales = exponential_num_scales(
            step, start_scales=start_scales, end_scales=end_scales, total_steps=total_steps
        )
    else:
        num_scales = progdist_num_scales(
            step, start_scales=start_scales, distill_steps_per_iter=distill_steps_per_iter
        )
        return jnp.float32(1.0), num_scales
    if target_ema_mode == "adaptive":
        mu = adaptive_target_ema(num_scales, start_ema=start_ema, start_scales=start_scales)
    else:
        mu = jnp.float32(start_ema)
    return mu, num_scales


def validate_schedule(target_ema_mode: str, scale_mode: str, start_scales: int, end_scales: int):
    """Raise a ValueError naming the bad schedule field and its valid choices."""
    if target_ema_mode not in TARGET_EMA_MODES:
        raise ValueError(
            f"target_ema_mode: unknown {target_ema_mode!r}; choose one of {TARGET_EMA_MODES}"
        )
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode: unknown {scale_mode!r}; choose one of {SCALE_MODES}")
    if target_ema_mode == "adaptive" and scale_mode != "progressive":
        raise ValueError("target_ema_mode='adaptive' needs scale_mode='progressive'")
    if scale_mode == "progdist" and target_ema_mode != "fixed":
        raise ValueError("scale_mode='progdist' needs target_ema_mode='fixed'")
    if scale_mode == "progdist" and start_scales & (start_scales - 1):
        raise ValueError(f"start_scales={start_scales}: progdist needs a power of 2")
    if scale_mode != "progdist" and int(start_scales) < 2:
        raise ValueError(f"start_scales={start_scales}: N must be >= 2")
    if scale_mode in ("progressive", "exponential") and end_scales < start_scales:
        raise ValueError(f"end_scales={end_scales} must be >= start_scales={start_scales}")


def sample_train_indices(key: jax.Array, batch: int, num_scales: jax.Array) -> jax.Array:
    """i ~ U{0, ..., N-2}: the online net sees sigma_i, the target sigma_{i+1}."""
    return keys.randint(key, (batch,), 0, jnp.asarray(num_scales, jnp.int32) - 1)


def sample_lognormal_sigma(
    key: jax.Array, batch: int, *, p_mean: float = -1.2, p_std: float = 1.2
) -> jax.Array:
    """ln sigma ~ N(P_mean, P_std^2) (EDM training noise levels)."""
    return jnp.exp(p_mean + p_std * keys.normal(key, (batch,)))


def max_num_scales(scale_mode: str, *, start_scales: int, end_scales: int) -> int:
    """The largest N(k) a curriculum reaches: the static size of index distributions over it."""
    if scale_mode in ("progressive", "exponential"):
        return end_scales + 1
    return start_scales


def lognormal_index_probs(
    num_scales: jax.Array | int,
    *,
    max_scales: int,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> jax.Array:
    """iCT: p(i) ~ erf((ln s_i - P_mean)/(sqrt2 P_std)) - erf((ln s_{i+1} - P_mean)/(sqrt2 P_std)).

    For the pairs (s_i > s_{i+1}), i = 0..N-2, of the N-point Karras grid; returned over a static
    [max_scales - 1] with zeros past N - 2, so N may be traced.
    """
    index = jnp.arange(max_scales - 1)
    n = jnp.asarray(num_scales, jnp.int32)
    valid = index < n - 1
    safe = jnp.minimum(index, n - 2)
    grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    cdf = lambda s: jax.scipy.special.erf((jnp.log(s) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf(karras_sigma(safe, n, **grid)) - cdf(karras_sigma(safe + 1, n, **grid))
    mass = jnp.where(valid, mass, 0.0)
    return mass / jnp.sum(mass)


def sample_lognormal_indices(
    key: jax.Array, batch: int, num_scales: jax.Array, *, max_scales: int, **kwargs
) -> jax.Array:
    """i ~ lognormal_index_probs(N) (iCT's discretised lognormal over the pairs of the grid).

    By inverse CDF: one uniform per example and a binary search, where jax.random.categorical
    would draw batch x max_scales Gumbel variates (1,281 per example for iCT's final grid).
    """
    probs = lognormal_index_probs(num_scales, max_scales=max_scales, **kwargs)
    cdf = jnp.cumsum(probs)
    u = keys.uniform(key, (batch,)) * cdf[-1]
    index = jnp.searchsorted(cdf, u, side="right")  # the first i with cdf_i > u: p_i > 0
    return jnp.minimum(index, jnp.asarray(num_scales, jnp.int32) - 2).astype(jnp.int32)


def sample_rho_uniform_sigma(
    key: jax.Array,
    batch: int,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> jax.Array:
    """sigma^(1/rho) ~ U[sigma_max^(1/rho), sigma_min^(1/rho)]: the continuous Karras grid (jcm)."""
    u = keys.uniform(key, (batch,))
    return karras_sigma(u, 2, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)


def ect_r(
    t: jax.Array, step: jax.Array, *, q: float, k: float, b: float, stage_steps: int
) -> jax.Array:
    """ECT: r = max(t (1 - n(t)/q^(stage+1)), 0), n(t) = 1 + k sigmoid(-b t), stage = step // len.

    dt = t - r shrinks by a factor q every stage_steps steps; r = 0 makes the target x0.
    """
    stage = jnp.asarray(step, jnp.int32) // stage_steps
    decay = jnp.float32(q) ** -(stage.astype(jnp.float32) + 1.0)
    n = 1.0 + k * jax.nn.sigmoid(-b * t)
    return jnp.maximum(t * (1.0 - n * decay), 0.0)


def tangent_warmup(step: jax.Array, warmup_steps: int) -> jax.Array:
    """sCM: r = min(1, k/H), the weight of the unstable tangent term (H = 10k in the paper)."""
    if warmup_steps <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


@dataclasses.dataclass(frozen=True)
class NoiseGrid:
    """The noise levels' range and Karras exponent: sigma in [sigma_min, sigma_max], rho."""

    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = RHO

    def kwargs(self) -> dict[str, float]:
        """sigma_min=, sigma_max=, rho= for the functions that take them."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """A CD/CT curriculum: step k -> (mu(k), N(k)) (ema_and_scales), checked when built."""

    target_ema_mode: str = "fixed"
    scale_mode: str = "fixed"
    start_ema: float = 0.95
    start_scales: int = 40
    end_scales: int = 40
    total_steps: int = 1
    distill_steps_per_iter: int = 50000

    def __post_init__(self):
        validate_schedule(self.target_ema_mode, self.scale_mode, self.start_scales, self.end_scales)

    def __call__(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        return ema_and_scales(step, **dataclasses.asdict(self))

    @property
    def max_scales(self) -> int:
        """The largest N(k) of the run (the grid iCT's index distribution is built on)."""
        return max_num_scales(
            self.scale_mode, start_scales=self.start_scales, end_scales=self.end_scales
        )
