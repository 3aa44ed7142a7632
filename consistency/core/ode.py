"""PF-ODE dx/dsigma = (x - D(x, sigma))/sigma: Euler and Heun steps, lax.scan teacher samplers."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from consistency.core.parameterization import broadcast_to

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
SOLVERS = ("heun", "euler", "ddim", "dpm_solver_2")


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


def ddim_step(denoise: Denoiser, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array):
    """DDIM (eta = 0) in EDM variables: x' = D + (sigma'/sigma)(x - D), D = D(x, sigma).

    With x = x_vp/alpha_t and sigma_t = sqrt((1 - abar_t)/abar_t) this is exactly DDIM's
    sqrt(abar') x0 + sqrt(1 - abar') eps between any two timesteps, and equals the Euler step.
    """
    s, s_next = _per_example(sigma, x), _per_example(sigma_next, x)
    d = denoise(x, s)
    return d + broadcast_to(s_next / s, x) * (x - d)


def dpm_solver_2_step(denoise: Denoiser, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array):
    """DPM-Solver++(2S), midpoint in lambda = -ln sigma: u = DDIM to sigma_u = sqrt(sigma sigma'),
    then x' = D(u, sigma_u) + (sigma'/sigma)(x - D(u, sigma_u)) (Lu et al. 2022b, r = 1/2).

    Two evaluations, local error O(h^3) in h = ln(sigma/sigma'); sigma' must be > 0.
    """
    s, s_next = _per_example(sigma, x), _per_example(sigma_next, x)
    s_mid = jnp.sqrt(s * s_next)
    u = ddim_step(denoise, x, s, s_mid)
    d_mid = denoise(u, s_mid)
    return d_mid + broadcast_to(s_next / s, x) * (x - d_mid)


def get_solver(name: str) -> Callable:
    """The PF-ODE step by name: 'heun', 'euler', 'ddim' or 'dpm_solver_2'."""
    if name == "heun":
        return heun_step
    if name == "euler":
        return euler_step
    if name == "ddim":
        return ddim_step
    if name == "dpm_solver_2":
        return dpm_solver_2_step
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


def _single_step_sampler(step: Callable, doc: str) -> Callable:
    """A sampler taking `step` between consecutive sigmas [N+1] (ending in 0): N evaluations."""

    def sampler(
        denoise: Denoiser, x_T: jax.Array, sigmas: jax.Array, *, clip_denoised: bool = True
    ) -> jax.Array:
        denoise = clipped(denoise) if clip_denoised else denoise

        def body(x, pair):
            s, s_next = pair
            return step(denoise, x, s, s_next), None

        x, _ = jax.lax.scan(body, x_T, (sigmas[:-1], sigmas[1:]))
        return x

    sampler.__doc__ = doc
    return sampler


euler_sampler = _single_step_sampler(
    euler_step, "Euler PF-ODE sampler over sigmas [N+1] ending in 0: N network evaluations."
)
ddim_sampler = _single_step_sampler(
    ddim_step,
    """DDIM (eta = 0) over sigmas [N+1] ending in 0 (`ddim_step`; the last step returns D).

    On a VP model's levels of descending timesteps this is diffusers' DDIMScheduler with the
    final abar = 1: N network evaluations.
    """,
)
