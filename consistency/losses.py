"""Training losses, each returning per-example values [B] and a metrics dict: EDM DSM, CD, CT."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from consistency.distances import l2
from consistency.parameterization import SIGMA_DATA, broadcast_to, get_weighting
from consistency.schedules import (
    RHO,
    SIGMA_MAX,
    SIGMA_MIN,
    karras_sigma,
    sample_lognormal_sigma,
    sample_train_indices,
)

# fn(params, x, sigma [B], dropout_key) -> output: a preconditioned network.
ModelFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]
Distance = Callable[[jax.Array, jax.Array], jax.Array]
Weighting = Callable[[jax.Array], jax.Array]
Metrics = dict[str, jax.Array]


def _check_per_example(values: jax.Array, batch: int) -> jax.Array:
    if values.shape != (batch,):
        raise ValueError(f"loss must be per-example with shape ({batch},), got {values.shape}")
    return values


def edm_loss(
    denoise_fn: ModelFn,
    params,
    x0: jax.Array,
    key: jax.Array,
    *,
    sigma_data: float = SIGMA_DATA,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    weighting: Weighting | None = None,
) -> tuple[jax.Array, Metrics]:
    """lambda(s) mean((D(x0 + s z, s) - x0)^2), ln s ~ N(P_mean, P_std^2), lambda = 1/s^2 + 1/sd^2.

    The squared error is averaged over pixels, as the ImageNet/LSUN code does (the CIFAR-10 code
    sums it: a factor of H*W*C that moves the learning rate, not the optimum).
    """
    weighting = weighting or get_weighting("karras", sigma_data=sigma_data)
    k_sigma, k_z, k_drop = jax.random.split(key, 3)
    sigma = sample_lognormal_sigma(k_sigma, x0.shape[0], p_mean=p_mean, p_std=p_std)
    z = jax.random.normal(k_z, x0.shape, jnp.float32)
    denoised = denoise_fn(params, x0 + broadcast_to(sigma, x0) * z, sigma, k_drop)
    losses = weighting(sigma) * l2(denoised, x0)
    return _check_per_example(losses, x0.shape[0]), {"sigma": sigma}


# teacher_step(x_t, t, t2, x0, z) -> x_t2: the one ODE step that forms the target's input.
TeacherStep = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def consistency_loss_at(
    consistency_fn: ModelFn,
    params,
    target_params,
    teacher_step: TeacherStep,
    x0: jax.Array,
    t: jax.Array,
    t2: jax.Array,
    z: jax.Array,
    dropout_key: jax.Array,
    *,
    distance: Distance,
    weighting: Weighting,
) -> jax.Array:
    """lambda(t) d(f_theta(x0 + t z, t), f_theta-(x_t2, t2)) with given noise levels and noise.

    x_t2 is the teacher's step from (x0 + t z, t) to t2. The target branch sees the SAME noise z
    and the SAME dropout key as the online branch, and no gradient flows through it.
    """
    x_t = x0 + broadcast_to(t, x0) * z
    x_t2 = jax.lax.stop_gradient(teacher_step(x_t, t, t2, x0, z))
    online = consistency_fn(params, x_t, t, dropout_key)
    target = jax.lax.stop_gradient(consistency_fn(target_params, x_t2, t2, dropout_key))
    return _check_per_example(weighting(t) * distance(online, target), x0.shape[0])


def _discrete_consistency_loss(
    consistency_fn, params, target_params, teacher_step, x0, key, *, num_scales, grid, **kw
) -> tuple[jax.Array, Metrics]:
    k_idx, k_z, k_drop = jax.random.split(key, 3)
    index = sample_train_indices(k_idx, x0.shape[0], num_scales)
    t = karras_sigma(index, num_scales, **grid)
    t2 = karras_sigma(index + 1, num_scales, **grid)
    z = jax.random.normal(k_z, x0.shape, jnp.float32)
    losses = consistency_loss_at(
        consistency_fn, params, target_params, teacher_step, x0, t, t2, z, k_drop, **kw
    )
    return losses, {"sigma": t, "index": index}


def consistency_distillation_loss(
    consistency_fn: ModelFn,
    params,
    target_params,
    teacher_denoise: Callable[[jax.Array, jax.Array], jax.Array],
    solver: Callable,
    x0: jax.Array,
    key: jax.Array,
    *,
    num_scales: jax.Array | int,
    distance: Distance,
    weighting: Weighting,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> tuple[jax.Array, Metrics]:
    """L_CD^N: lambda(t_i) d(f_theta(x_{t_i}, t_i), f_theta-(x^phi_{t_{i+1}}, t_{i+1})).

    i ~ U{0, ..., N-2}.

    x^phi_{t_{i+1}} is one `solver` step (Heun or Euler, from `ode`) of the frozen EDM teacher
    `teacher_denoise(x, sigma)` from x_{t_i} = x0 + t_i z.
    """

    def teacher_step(x_t, t, t2, x0, z):
        return solver(teacher_denoise, x_t, t, t2)

    grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    return _discrete_consistency_loss(
        consistency_fn, params, target_params, teacher_step, x0, key,
        num_scales=num_scales, grid=grid, distance=distance, weighting=weighting,
    )  # fmt: skip


def consistency_training_loss(
    consistency_fn: ModelFn,
    params,
    target_params,
    x0: jax.Array,
    key: jax.Array,
    *,
    num_scales: jax.Array | int,
    distance: Distance,
    weighting: Weighting,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> tuple[jax.Array, Metrics]:
    """L_CT^N: lambda(t_i) d(f_theta(x0 + t_i z, t_i), f_theta-(x0 + t_{i+1} z, t_{i+1})).

    The teacher is replaced by the data point x0 (the unbiased score estimate), so the target's
    input is x0 + t_{i+1} z with the same z.
    """

    def data_step(x_t, t, t2, x0, z):
        return x0 + broadcast_to(t2, x0) * z

    grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    return _discrete_consistency_loss(
        consistency_fn, params, target_params, data_step, x0, key,
        num_scales=num_scales, grid=grid, distance=distance, weighting=weighting,
    )  # fmt: skip
