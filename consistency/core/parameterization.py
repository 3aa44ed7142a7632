"""Preconditioning: EDM, boundary, LCM, TrigFlow scalings, noise conditioning, loss weightings."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

SIGMA_DATA = 0.5
WEIGHTINGS = ("uniform", "snr", "snr+1", "karras", "truncated-snr", "ict")
NOISE_CONDITIONINGS = ("adm", "ncsnpp")

Scalings = tuple[jax.Array, jax.Array, jax.Array]


def edm_scalings(sigma: jax.Array, *, sigma_data: float = SIGMA_DATA) -> Scalings:
    """EDM: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def boundary_scalings(
    sigma: jax.Array, *, sigma_data: float = SIGMA_DATA, sigma_min: float = 0.002
) -> Scalings:
    """c_skip = sd^2/((s-eps)^2+sd^2), c_out = sd (s-eps)/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2).

    Only c_skip's denominator and c_out's numerator are shifted by eps = sigma_min, so that
    f(x, eps) = x exactly (c_skip = 1, c_out = 0).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def lcm_scalings(
    t: jax.Array, *, timestep_scaling: float = 10.0, sigma_data: float = SIGMA_DATA
) -> tuple[jax.Array, jax.Array]:
    """LCM: c_skip = sd^2/((s t)^2 + sd^2), c_out = s t/sqrt((s t)^2 + sd^2), s = timestep_scaling.

    t is the integer DDPM timestep; no sigma_min shift: c_skip(0) = 1, c_out(0) = 0 exactly. The
    network sees x itself (c_in = 1) and its output is first turned into x0 (`vp.predicted_x0`).
    """
    scaled = jnp.asarray(t).astype(jnp.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / jnp.sqrt(scaled**2 + sigma_data**2)
    return c_skip, c_out


def vp_scalings(sigma: jax.Array, *, prediction: str) -> Scalings:
    """A discrete VP model F(x_vp, t) as an EDM denoiser D(x, sigma), x = x_vp / alpha_t.

    c_in = 1/sqrt(sigma^2 + 1) (so c_in x = x_vp); epsilon: D = x - sigma F (c_skip = 1,
    c_out = -sigma); v_prediction: D = x/(sigma^2 + 1) - sigma F/sqrt(sigma^2 + 1) (EDM's
    scalings at sigma_data = 1 with c_out negated). k-diffusion's DiscreteEps/VDDPMDenoiser.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    c_in = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    if prediction == "epsilon":
        return jnp.ones_like(sigma), -sigma, c_in
    if prediction == "v_prediction":
        return c_in**2, -sigma * c_in, c_in
    raise ValueError(f"unknown VP prediction: {prediction!r}; choose epsilon or v_prediction")


def vp_boundary_scalings(
    sigma: jax.Array, *, prediction: str, sigma_data: float = SIGMA_DATA, sigma_min: float
) -> Scalings:
    """The consistency function of a VP network: EDM's boundary scalings on the F that its
    denoiser D_vp implies, F_edm = (D_vp - c_skip_edm x)/c_out_edm.

    f = c_skip_b x + r (D_vp - c_skip_edm x), r = c_out_b/c_out_edm = (sigma - eps)/sigma:
    f(x, eps) = x exactly, and f is the same function of F_edm as an EDM-network student's (so
    a student copied from its VP teacher starts as f ~ D_vp, as an EDM student starts as D).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    skip_b, _, _ = boundary_scalings(sigma, sigma_data=sigma_data, sigma_min=sigma_min)
    skip_edm, _, _ = edm_scalings(sigma, sigma_data=sigma_data)
    skip_vp, out_vp, c_in = vp_scalings(sigma, prediction=prediction)
    r = (sigma - sigma_min) / sigma
    return skip_b + r * (skip_vp - skip_edm), r * out_vp, c_in


def vp_timestep(sigma: jax.Array, *, sigmas: jax.Array) -> jax.Array:
    """c_noise = t, the DDPM timestep of sigma: linear in ln sigma between the timesteps' levels.

    `sigmas` [N] are the levels of t = 0..N-1 (increasing); a level of the grid gives its
    integer t exactly, levels outside it are clamped to [0, N-1] (k-diffusion's sigma_to_t).
    """
    table = jnp.asarray(sigmas, jnp.float32)
    s = jnp.clip(jnp.asarray(sigma, jnp.float32), table[0], table[-1])
    hi = jnp.clip(jnp.searchsorted(table, s, side="right"), 1, table.shape[0] - 1)
    lo = hi - 1
    log_lo = jnp.log(table[lo])
    frac = (jnp.log(s) - log_lo) / (jnp.log(table[hi]) - log_lo)
    return lo.astype(jnp.float32) + frac


def trigflow_time(sigma: jax.Array, *, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """t = arctan(sigma / sd): TrigFlow time of the EDM noise level sigma = sd tan t (sCM)."""
    return jnp.arctan(jnp.asarray(sigma, jnp.float32) / sigma_data)


def trigflow_scalings(sigma: jax.Array, *, sigma_data: float = SIGMA_DATA) -> Scalings:
    """sCM's f = cos t x_t - sin t sd F(x_t/sd, t) on EDM inputs x_sigma = x_t / cos t.

    c_skip = cos^2 t, c_out = -sd sin t, c_in = cos t / sd: EDM's c_skip and c_in, and minus
    EDM's c_out, under sigma = sd tan t. f(x, 0) = x, so no sigma_min shift is needed; the
    network's noise input is c_noise = t (`trigflow_time`).
    """
    t = trigflow_time(sigma, sigma_data=sigma_data)
    return jnp.cos(t) ** 2, -sigma_data * jnp.sin(t), jnp.cos(t) / sigma_data


def c_noise_adm(sigma: jax.Array) -> jax.Array:
    """c_noise = 1000 * 0.25 * ln(sigma + 1e-44) = 250 ln sigma (ADM UNet and diffusers)."""
    return 1000 * 0.25 * jnp.log(jnp.asarray(sigma, jnp.float32) + 1e-44)


def c_noise_ncsnpp(sigma: jax.Array) -> jax.Array:
    """c_noise = 0.25 ln sigma (the CIFAR-10 NCSN++ with Fourier features)."""
    return 0.25 * jnp.log(jnp.asarray(sigma, jnp.float32))


def get_noise_conditioning(name: str) -> Callable[[jax.Array], jax.Array]:
    """The network's noise input c_noise(sigma) by convention name."""
    if name == "adm":
        return c_noise_adm
    if name == "ncsnpp":
        return c_noise_ncsnpp
    raise ValueError(f"unknown noise conditioning: {name!r}; choose one of {NOISE_CONDITIONINGS}")


def broadcast_to(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape a per-example [B] (or scalar) value so it broadcasts against x [B, ...]."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def precondition(
    net_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    sigma: jax.Array,
    *,
    scalings: Callable[[jax.Array], Scalings],
    noise_cond: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s)): a denoiser or consistency function.

    `net_fn(x_in, c_noise)` is the sigma-agnostic network; `sigma` is [B] or a scalar.
    """
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    c_skip, c_out, c_in = (broadcast_to(c, x) for c in scalings(sigma))
    out = net_fn((c_in * x).astype(x.dtype), noise_cond(sigma)).astype(jnp.float32)
    return c_skip * x + c_out * out


def snr(sigma: jax.Array) -> jax.Array:
    """SNR(sigma) = sigma^-2."""
    return jnp.asarray(sigma, jnp.float32) ** -2


def get_weighting(name: str, *, sigma_data: float = SIGMA_DATA) -> Callable[..., jax.Array]:
    """lambda(sigma, sigma_next=None): uniform, snr, snr+1, karras (snr + 1/sd^2), truncated-snr,
    and ict = 1/(sigma - sigma_next), iCT's weighting of a grid pair (needs sigma_next).
    """
    if name == "uniform":
        return lambda s, s_next=None: jnp.ones_like(jnp.asarray(s, jnp.float32))
    if name == "snr":
        return lambda s, s_next=None: snr(s)
    if name == "snr+1":
        return lambda s, s_next=None: snr(s) + 1
    if name == "karras":
        return lambda s, s_next=None: snr(s) + 1.0 / sigma_data**2
    if name == "truncated-snr":
        return lambda s, s_next=None: jnp.maximum(snr(s), 1.0)
    if name == "ict":
        return ict_weighting
    raise ValueError(f"unknown weighting: {name!r}; choose one of {WEIGHTINGS}")


def ict_weighting(sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """lambda(sigma_i) = 1/(sigma_i - sigma_{i+1}) for the pair sigma_i > sigma_{i+1} (iCT)."""
    return 1.0 / (jnp.asarray(sigma, jnp.float32) - jnp.asarray(sigma_next, jnp.float32))
