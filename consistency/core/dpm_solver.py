"""DPM-Solver(++) on discrete VP (DDPM) models: first- and second-order multistep updates."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from consistency.core.parameterization import broadcast_to
from consistency.core.vp import VPModel, predicted_x0


def vp_sigma(alpha_bar: jax.Array) -> jax.Array:
    """sigma_t = sqrt((1 - abar_t)/abar_t): the VP model's EDM-like noise level, x/alpha_t."""
    alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
    return jnp.sqrt((1.0 - alpha_bar) / alpha_bar)


def alpha_sigma_of(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """alpha_t = 1/sqrt(sigma^2 + 1), sigma_t = sigma alpha_t (sigma = 0 gives 1 and 0)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def log_snr(sigma: jax.Array) -> jax.Array:
    """lambda_t = ln alpha_t - ln sigma_t (+inf at sigma = 0)."""
    alpha, sig = alpha_sigma_of(sigma)
    return jnp.log(alpha) - jnp.log(sig)


def _coefs(x: jax.Array, *sigmas: jax.Array):
    """Per-step (alpha, sigma_t, lambda) of each sigma, broadcast against x."""
    out = []
    for s in sigmas:
        alpha, sig = alpha_sigma_of(s)
        out.append(tuple(broadcast_to(v, x) for v in (alpha, sig, log_snr(s))))
    return out


def dpmpp_first_order(
    x: jax.Array, x0: jax.Array, *, sigma_s: jax.Array, sigma_t: jax.Array
) -> jax.Array:
    """DPM-Solver++(1) = DDIM: x_t = (sigma_t/sigma_s) x - alpha_t (e^-h - 1) x0, h = l_t - l_s."""
    (a_s, s_s, l_s), (a_t, s_t, l_t) = _coefs(x, sigma_s, sigma_t)
    return (s_t / s_s) * x - (a_t * (jnp.exp(-(l_t - l_s)) - 1.0)) * x0


def dpmpp_second_order(
    x: jax.Array,
    x0: jax.Array,
    x0_prev: jax.Array,
    *,
    sigma_prev: jax.Array,
    sigma_s: jax.Array,
    sigma_t: jax.Array,
) -> jax.Array:
    """DPM-Solver++(2M), midpoint: the first-order step with D = x0 + (x0 - x0_prev)/(2 r).

    r = h_prev/h, h = l_t - l_s, h_prev = l_s - l_prev; x0_prev is the data prediction at the
    previous (noisier) step sigma_prev.
    """
    (_, _, l_p), (_, s_s, l_s), (a_t, s_t, l_t) = _coefs(x, sigma_prev, sigma_s, sigma_t)
    h = l_t - l_s
    d1 = (1.0 / ((l_s - l_p) / h)) * (x0 - x0_prev)
    phi = a_t * (jnp.exp(-h) - 1.0)
    return (s_t / s_s) * x - phi * x0 - 0.5 * phi * d1


def dpm_first_order(
    x: jax.Array, eps: jax.Array, *, sigma_s: jax.Array, sigma_t: jax.Array
) -> jax.Array:
    """DPM-Solver-1 (noise form) = DDIM: x_t = (alpha_t/alpha_s) x - sigma_t (e^h - 1) eps."""
    (a_s, _, l_s), (a_t, s_t, l_t) = _coefs(x, sigma_s, sigma_t)
    return (a_t / a_s) * x - (s_t * (jnp.exp(l_t - l_s) - 1.0)) * eps


def dpm_second_order(
    x: jax.Array,
    eps: jax.Array,
    eps_prev: jax.Array,
    *,
    sigma_prev: jax.Array,
    sigma_s: jax.Array,
    sigma_t: jax.Array,
) -> jax.Array:
    """DPM-Solver-2M (noise form, midpoint): first-order step with eps + (eps - eps_prev)/(2 r)."""
    (_, _, l_p), (a_s, _, l_s), (a_t, s_t, l_t) = _coefs(x, sigma_prev, sigma_s, sigma_t)
    h = l_t - l_s
    d1 = (1.0 / ((l_s - l_p) / h)) * (eps - eps_prev)
    phi = s_t * (jnp.exp(h) - 1.0)
    return (a_t / a_s) * x - phi * eps - 0.5 * phi * d1


def multistep_orders(num_steps: int, *, order: int) -> list[int]:
    """Order of each step of diffusers' 1st/2nd-order multistep schedule ending at sigma = 0.

    The first step has no history (order 1); the step to sigma = 0 is first order
    (lower_order_final, and always with final_sigmas_type="zero").
    """
    if order not in (1, 2):
        raise ValueError(f"unsupported DPM-Solver order: {order!r}; choose 1 or 2")
    return [1 if (order == 1 or i in (0, num_steps - 1)) else 2 for i in range(num_steps)]


def dpm_solver_multistep(
    model_fn: VPModel,
    x: jax.Array,
    *,
    timesteps: Sequence[int],
    alphas_cumprod: jax.Array,
    prediction: str,
    order: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """DPM-Solver++ (DPMSolverMultistepScheduler) over `timesteps` (static, descending) to 0.

    Step i goes from timestep t_i to t_{i+1} (the last to sigma = 0, i.e. the x0 prediction).
    Returns (final sample, the sample after every step stacked on axis 0).
    """
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    ts = [int(t) for t in timesteps]
    sigmas = [vp_sigma(ac[t]) for t in ts] + [jnp.float32(0.0)]
    orders = multistep_orders(len(ts), order=order)
    prev, out = None, []
    for i, t in enumerate(ts):
        alpha, sig = alpha_sigma_of(sigmas[i])
        mo = model_fn(x, jnp.full(x.shape[:1], t, jnp.int32))
        x0 = predicted_x0(mo, x, alpha=alpha, sigma=sig, prediction=prediction)
        if orders[i] == 1:
            x = dpmpp_first_order(x, x0, sigma_s=sigmas[i], sigma_t=sigmas[i + 1])
        else:
            x = dpmpp_second_order(
                x, x0, prev, sigma_prev=sigmas[i - 1], sigma_s=sigmas[i], sigma_t=sigmas[i + 1]
            )
        prev = x0
        out.append(x)
    return x, jnp.stack(out)
