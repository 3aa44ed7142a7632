"""Discrete VP (DDPM) teachers: betas, x0/eps conversions, DDIM, LCM's skip grid and sampler."""

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from consistency.core.parameterization import SIGMA_DATA, broadcast_to, lcm_scalings

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
PREDICTIONS = ("epsilon", "v_prediction", "sample")

# model_fn(x, t) -> model output; t is the integer DDPM timestep, [B] or a scalar.
VPModel = Callable[[jax.Array, jax.Array], jax.Array]


def _linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """torch.linspace(start, end, num, dtype=float32), bit for bit.

    torch computes step = (end - start)/(num - 1) in float32, then fma(step, i, start) for the
    first half and fma(-step, num-1-i, end) for the second; one float64 rounding emulates the fma.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    first = step * i + np.float64(start32)
    second = -step * (num - 1 - i) + np.float64(end32)
    return np.where(np.arange(num) < num // 2, first, second).astype(np.float32)


def _cosine_betas(num: int, max_beta: float) -> np.ndarray:
    """beta_i = min(1 - abar((i+1)/N)/abar(i/N), max_beta), abar(t) = cos(pi (t+0.008)/2.016)^2."""
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - abar((i + 1) / num) / abar(i / num), max_beta) for i in range(num)]
    return np.asarray(betas, np.float32)


def ddpm_betas(
    *,
    schedule: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    max_beta: float = 0.999,
) -> np.ndarray:
    """beta_t for t < N, float32, as diffusers' schedulers build them.

    linear: linspace(beta_start, beta_end); scaled_linear (Stable Diffusion): linspace(sqrt
    beta_start, sqrt beta_end)^2; squaredcos_cap_v2 (iDDPM cosine, GLIDE): `_cosine_betas`.
    """
    if schedule == "linear":
        return _linspace_f32(beta_start, beta_end, num_train_timesteps)
    if schedule == "scaled_linear":
        root = _linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps)
        return root * root
    if schedule in ("squaredcos_cap_v2", "cosine"):
        return _cosine_betas(num_train_timesteps, max_beta)
    raise ValueError(f"unknown beta schedule: {schedule!r}; choose one of {BETA_SCHEDULES}")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s): float32 factors, float64 running product, float32 out.

    This is torch.cumprod on float32 (it accumulates in double): a float32 running product
    drifts by ~1e-6 relative over 1,000 steps.
    """
    alphas = np.float32(1.0) - np.asarray(betas, np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def alpha_sigma(alpha_bar: jax.Array) -> tuple[jax.Array, jax.Array]:
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t): x_t = alpha_t x0 + sigma_t eps."""
    alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
    return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)


def q_sample(x0: jax.Array, noise: jax.Array, *, alpha_bar: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; abar_t is [B] or a scalar."""
    alpha, sigma = alpha_sigma(alpha_bar)
    return broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, x0) * noise


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type: {prediction!r}; choose one of {PREDICTIONS}")


def predicted_x0(
    model_output: jax.Array, x: jax.Array, *, alpha: jax.Array, sigma: jax.Array, prediction: str
) -> jax.Array:
    """x0 = (x - sigma eps)/alpha (epsilon), alpha x - sigma v (v_prediction), or the output."""
    _check_prediction(prediction)
    alpha, sigma = broadcast_to(alpha, x), broadcast_to(sigma, x)
    if prediction == "epsilon":
        return (x - sigma * model_output) / alpha
    if prediction == "v_prediction":
        return alpha * x - sigma * model_output
    return model_output


def predicted_eps(
    model_output: jax.Array, x: jax.Array, *, alpha: jax.Array, sigma: jax.Array, prediction: str
) -> jax.Array:
    """eps = the output (epsilon), alpha v + sigma x (v_prediction), or (x - alpha x0)/sigma."""
    _check_prediction(prediction)
    alpha, sigma = broadcast_to(alpha, x), broadcast_to(sigma, x)
    if prediction == "epsilon":
        return model_output
    if prediction == "v_prediction":
        return alpha * model_output + sigma * x
    return (x - alpha * model_output) / sigma


def ddim_step(x0: jax.Array, eps: jax.Array, *, alpha_bar_prev: jax.Array) -> jax.Array:
    """DDIM (eta = 0): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps."""
    return q_sample(x0, eps, alpha_bar=alpha_bar_prev)


def velocity(x0: jax.Array, eps: jax.Array, *, alpha_bar: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0: the v-prediction target (get_velocity)."""
    alpha, sigma = alpha_sigma(alpha_bar)
    return broadcast_to(alpha, x0) * eps - broadcast_to(sigma, x0) * x0


def discrete_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t)/abar_t) for t < N (float64 math, float32 out): the EDM noise
    levels of the DDPM timesteps, x_edm = x_vp / sqrt(abar_t), increasing in t."""
    ac = np.asarray(alphas_cumprod, np.float64)
    return np.sqrt((1.0 - ac) / ac).astype(np.float32)


def ddim_timesteps(*, num_train_timesteps: int, num_inference_steps: int) -> np.ndarray:
    """DDIM's "trailing" spacing: round(N - i N/n) - 1 for i < n, descending from N - 1.

    (diffusers' DDIMScheduler with timestep_spacing="trailing"; the last step goes to abar = 1.)
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps {num_inference_steps} not in [1, N]")
    ratio = num_train_timesteps / num_inference_steps
    ts = np.round(num_train_timesteps - np.arange(num_inference_steps) * ratio)
    return ts.astype(np.int64) - 1


VP_PREDICTIONS = {"vp_eps": "epsilon", "vp_v": "v_prediction"}  # parameterization -> prediction


@dataclasses.dataclass(frozen=True)
class VPSchedule:
    """A discrete VP (DDPM) teacher's schedule and prediction type, the model's VP half."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction: str = "epsilon"  # epsilon | v_prediction

    def alphas_cumprod(self) -> np.ndarray:
        betas = ddpm_betas(
            schedule=self.beta_schedule,
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
        )
        return alphas_cumprod(betas)

    def sigmas(self) -> np.ndarray:
        """The EDM noise level of every timestep, [N] increasing (`discrete_sigmas`)."""
        return discrete_sigmas(self.alphas_cumprod())


def alpha_bar_at(
    alphas_cumprod: jax.Array, t: jax.Array, *, final_alpha_cumprod: float
) -> jax.Array:
    """abar_t for t >= 0, else final_alpha_cumprod (1, or abar_0 when set_alpha_to_one=False)."""
    t = jnp.asarray(t)
    abar = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.maximum(t, 0)]
    return jnp.where(t >= 0, abar, jnp.float32(final_alpha_cumprod))


# --- LCM's skip-step teacher grid (DDIMSolver) and its consistency function -----------------


def lcm_ddim_timesteps(*, num_train_timesteps: int, ddim_steps: int) -> np.ndarray:
    """t_i = round((i+1) k) - 1 for i < ddim_steps, k = N // ddim_steps: [k-1, 2k-1, ..., N-1]."""
    step_ratio = num_train_timesteps // ddim_steps
    return (np.arange(1, ddim_steps + 1) * step_ratio).round().astype(np.int64) - 1


def lcm_ddim_alpha_bars_prev(alphas_cumprod: np.ndarray, ddim_timesteps: np.ndarray) -> np.ndarray:
    """abar at the end of each skip: [abar_0, abar_{t_0}, ..., abar_{t_{n-2}}] (DDIMSolver)."""
    ac = np.asarray(alphas_cumprod)
    return np.concatenate([ac[:1], ac[np.asarray(ddim_timesteps)[:-1]]])


def lcm_skip_end(start: jax.Array, *, skip: int) -> jax.Array:
    """The teacher step's end timestep max(t - k, 0) for a start timestep t on the grid."""
    return jnp.maximum(jnp.asarray(start) - skip, 0)


def lcm_consistency(
    model_output: jax.Array,
    x: jax.Array,
    *,
    t: jax.Array,
    alpha_bar: jax.Array,
    prediction: str,
    timestep_scaling: float = 10.0,
    sigma_data: float = SIGMA_DATA,
) -> jax.Array:
    """f(x, t) = c_skip(t) x + c_out(t) x0(F(x, t), t), LCM's discrete boundary scalings."""
    c_skip, c_out = lcm_scalings(t, timestep_scaling=timestep_scaling, sigma_data=sigma_data)
    alpha, sigma = alpha_sigma(alpha_bar)
    x0 = predicted_x0(model_output, x, alpha=alpha, sigma=sigma, prediction=prediction)
    return broadcast_to(c_out, x) * x0 + broadcast_to(c_skip, x) * x


def lcm_timesteps(
    *,
    num_train_timesteps: int = 1000,
    original_inference_steps: int = 50,
    num_inference_steps: int | None = None,
    timesteps: Sequence[int] | None = None,
    strength: float = 1.0,
) -> np.ndarray:
    """LCMScheduler.set_timesteps: n evenly spaced indices into the reversed distillation grid.

    Grid: (1..floor(original_inference_steps * strength)) * k - 1, k = N // original steps;
    indices floor(linspace(0, len, n, endpoint=False)). Custom `timesteps` (descending, < N)
    are used as given, minus the first (1 - strength) of them.
    """
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps and timesteps")
    if original_inference_steps > num_train_timesteps:
        raise ValueError(f"original_inference_steps {original_inference_steps} > N")
    k = num_train_timesteps // original_inference_steps
    grid = np.arange(1, int(original_inference_steps * strength) + 1) * k - 1
    if timesteps is not None:
        ts = np.asarray(timesteps, np.int64)
        if np.any(np.diff(ts) >= 0) or ts[0] >= num_train_timesteps:
            raise ValueError(f"custom timesteps must descend from below N: {list(ts)}")
        start = max(len(ts) - min(int(len(ts) * strength), len(ts)), 0)
        return ts[start:]
    if num_inference_steps > min(len(grid), original_inference_steps):
        raise ValueError(
            f"num_inference_steps {num_inference_steps} > the {len(grid)} distillation timesteps"
        )
    indices = np.floor(np.linspace(0, len(grid), num_inference_steps, endpoint=False))
    return grid[::-1][indices.astype(np.int64)]


def lcm_step(
    model_output: jax.Array,
    x: jax.Array,
    *,
    t: jax.Array,
    alpha_bar: jax.Array,
    alpha_bar_next: jax.Array,
    noise: jax.Array | None,
    prediction: str,
    timestep_scaling: float = 10.0,
    sigma_data: float = SIGMA_DATA,
) -> tuple[jax.Array, jax.Array]:
    """LCMScheduler.step: x0 = f(x, t), then x' = sqrt(abar') x0 + sqrt(1 - abar') z (or x0).

    Returns (x', x0); noise=None is the last step (no re-noising).
    """
    denoised = lcm_consistency(
        model_output,
        x,
        t=t,
        alpha_bar=alpha_bar,
        prediction=prediction,
        timestep_scaling=timestep_scaling,
        sigma_data=sigma_data,
    )
    if noise is None:
        return denoised, denoised
    return q_sample(denoised, noise, alpha_bar=alpha_bar_next), denoised


def lcm_sample(
    model_fn: VPModel,
    x: jax.Array,
    *,
    timesteps: Sequence[int],
    alphas_cumprod: jax.Array,
    noise: jax.Array,
    prediction: str,
    timestep_scaling: float = 10.0,
    sigma_data: float = SIGMA_DATA,
) -> tuple[jax.Array, jax.Array]:
    """LCM's multistep sampler: denoise at t_i, re-noise to t_{i+1} with noise[i]; last x0 out.

    `timesteps` is a static descending list (`lcm_timesteps`), `noise` [len - 1, *x.shape].
    Returns (x0 of the last step, the x0 of every step stacked on axis 0).
    """
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    ts = [int(t) for t in timesteps]
    if noise.shape[0] != len(ts) - 1:
        raise ValueError(f"need {len(ts) - 1} noise draws, got {noise.shape[0]}")
    denoised_all = []
    for i, t in enumerate(ts):
        t_b = jnp.full(x.shape[:1], t, jnp.int32)
        last = i == len(ts) - 1
        x, denoised = lcm_step(
            model_fn(x, t_b),
            x,
            t=t_b,
            alpha_bar=ac[t],
            alpha_bar_next=ac[t] if last else ac[ts[i + 1]],
            noise=None if last else noise[i],
            prediction=prediction,
            timestep_scaling=timestep_scaling,
            sigma_data=sigma_data,
        )
        denoised_all.append(denoised)
    return x, jnp.stack(denoised_all)
