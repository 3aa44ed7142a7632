"""PF-ODE dx/dsigma = (x - D(x, sigma))/sigma: Euler and Heun steps, lax.scan teacher samplers."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from consistency.core.parameterization import broadcast_to

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
SOLVERS = ("heun", "euler")


def _per_example(sigma: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])


def euler_step(denoise: Denoiser, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array):
    """x' = x + (sigma' - sigma) (x - D(x, sigma))/sigma; sigma, sigma' are [B] or scalars."""
    s, s_next = _per_example(sigma, x), _per_example(sigma_next, x)
    d = (x - denoise(x, s)) / broadcast_to(s, x)
    return x + broadcast_to(s_next - s, x) * d


def heun_step(denoise: Denoiser, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array):
    """EDM's second-order step: Euler predictor x', then x + (sigma'-sigma)(d + d')/2.

    d = (x - D(x, sigma))/sigma and d' = (x' - D(x', sigma'))/sigma'; sigma' must be > 0.
    """
    s, s_next = _per_example(sigma, x), _per_example(sigma_next, x)
    dt = broadcast_to(s_next - s, x)
    d = (x - denoise(x, s)) / broadcast_to(s, x)
    x_pred = x + dt * d
    d_next = (x_pred - denoise(x_pred, s_next)) / broadcast_to(s_next, x)
    return x + dt * (d + d_next) / 2


def get_solver(name: str) -> Callable:
    """The PF-ODE step by name: 'heun' or 'euler'."""
    if name == "heun":
        return heun_step
    if name == "euler":
        return euler_step
    raise ValueError(f"unknown solver: {name!r}; choose one of {SOLVERS}")


def clipped(denoise: Denoiser) -> Denoiser:
    """D clamped to [-1, 1], as the references' clip_denoised=True does at every call."""
    return lambda x, sigma: jnp.clip(denoise(x, sigma), -1.0, 1.0)


def heun_sampler(
    denoise: Denoiser, x_T: jax.Array, sigmas: jax.Array, *, clip_denoised: bool = True
) -> jax.Array:
    """EDM Heun sampler (Karras et al. Alg. 2, no churn) over sigmas [N+1] ending in 0.

    N-1 Heun steps then one Euler step to 0: 2N-1 network evaluations. Returns the raw x_0
    (clamp it to [-1, 1] afterwards as the references do).
    """
    denoise = clipped(denoise) if clip_denoised else denoise

    def body(x, pair):
        s, s_next = pair
        return heun_step(denoise, x, s, s_next), None

    x, _ = jax.lax.scan(body, x_T, (sigmas[:-2], sigmas[1:-1]))
    return euler_step(denoise, x, sigmas[-2], sigmas[-1])


def euler_sampler(
    denoise: Denoiser, x_T: jax.Array, sigmas: jax.Array, *, clip_denoised: bool = True
) -> jax.Array:
    """Euler PF-ODE sampler over sigmas [N+1] ending in 0: N network evaluations."""
    denoise = clipped(denoise) if clip_denoised else denoise

    def body(x, pair):
        s, s_next = pair
        return euler_step(denoise, x, s, s_next), None

    x, _ = jax.lax.scan(body, x_T, (sigmas[:-1], sigmas[1:]))
    return x
