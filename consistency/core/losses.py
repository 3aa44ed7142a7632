"""Training losses, each returning per-example values [B] and a metrics dict.

EDM DSM; DDPM (discrete VP teachers); discrete CD and CT (with iCT's index sampling and
weighting as options); ECT; progressive distillation; the autoencoder's. The continuous-time
ones (jcm's CD/CT, sCM) are in core/continuous_losses.py.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from consistency.core import keys, vp
from consistency.core.distances import l2
from consistency.core.ode import euler_step
from consistency.core.parameterization import SIGMA_DATA, broadcast_to, get_weighting
from consistency.core.schedules import (
    RHO,
    SIGMA_MAX,
    SIGMA_MIN,
    ect_r,
    karras_sigma,
    progdist_sigmas,
    sample_lognormal_sigma,
    sample_train_indices,
)

# fn(params, x, sigma [B], dropout_key) -> output: a preconditioned network.
ModelFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]
Distance = Callable[[jax.Array, jax.Array], jax.Array]
# weighting(sigma, sigma_next=None) -> [B]; iCT's 1/(sigma - sigma_next) needs the pair.
Weighting = Callable[..., jax.Array]
# index_sampler(key, batch, num_scales) -> grid indices i of the pairs (sigma_i, sigma_{i+1}).
IndexSampler = Callable[[jax.Array, int, jax.Array], jax.Array]
Metrics = dict[str, jax.Array]


def check_per_example(values: jax.Array, batch: int) -> jax.Array:
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
    k_sigma, k_z, k_drop = keys.split(key, 3)
    sigma = sample_lognormal_sigma(k_sigma, x0.shape[0], p_mean=p_mean, p_std=p_std)
    z = keys.normal(k_z, x0.shape, jnp.float32)
    denoised = denoise_fn(params, x0 + broadcast_to(sigma, x0) * z, sigma, k_drop)
    losses = weighting(sigma) * l2(denoised, x0)
    return check_per_example(losses, x0.shape[0]), {"sigma": sigma}


def ddpm_loss(
    net_fn: ModelFn,
    params,
    x0: jax.Array,
    key: jax.Array,
    *,
    alphas_cumprod: jax.Array,
    prediction: str,
) -> tuple[jax.Array, Metrics]:
    """mean((F(x_t, t) - target)^2), t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

    target: eps (epsilon) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v_prediction); the mean
    is over pixels, as diffusers' training scripts. `net_fn(params, x_t, t, dropout_key)` is the
    bare network on the VP sample and the float timestep. Metrics: 'sigma' = sqrt((1-abar)/abar)
    (the EDM level of t) and 'timestep' t.
    """
    k_t, k_z, k_drop = keys.split(key, 3)
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    t = keys.randint(k_t, (x0.shape[0],), 0, ac.shape[0])
    eps = keys.normal(k_z, x0.shape, jnp.float32)
    abar = ac[t]
    if prediction == "epsilon":
        target = eps
    elif prediction == "v_prediction":
        target = vp.velocity(x0, eps, alpha_bar=abar)
    else:
        raise ValueError(f"unknown VP prediction: {prediction!r}; choose epsilon or v_prediction")
    out = net_fn(params, vp.q_sample(x0, eps, alpha_bar=abar), t.astype(jnp.float32), k_drop)
    losses = l2(out.astype(jnp.float32), target)
    sigma = jnp.sqrt((1.0 - abar) / abar)
    return check_per_example(losses, x0.shape[0]), {"sigma": sigma, "timestep": t}


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
    """lambda(t, t2) d(f_theta(x0 + t z, t), f_theta-(x_t2, t2)) with given noise levels and noise.

    x_t2 is the teacher's step from (x0 + t z, t) to t2. The target branch sees the SAME noise z
    and the SAME dropout key as the online branch, and no gradient flows through it.
    """
    x_t = x0 + broadcast_to(t, x0) * z
    x_t2 = jax.lax.stop_gradient(teacher_step(x_t, t, t2, x0, z))
    online = consistency_fn(params, x_t, t, dropout_key)
    target = jax.lax.stop_gradient(consistency_fn(target_params, x_t2, t2, dropout_key))
    return check_per_example(weighting(t, t2) * distance(online, target), x0.shape[0])


def _discrete_consistency_loss(
    consistency_fn,
    params,
    target_params,
    teacher_step,
    x0,
    key,
    *,
    num_scales,
    grid,
    index_sampler,
    skip: int = 1,
    sigma_table=None,
    **kw,
) -> tuple[jax.Array, Metrics]:
    """Pairs (t_i, t_{i+k}) of the N-point grid, k = skip: i ~ U{0, ..., N-1-k} (or the sampler).

    The index is drawn as for N - k + 1 points, so skip = 1 draws exactly as before. With a
    `sigma_table` (a VP teacher's timesteps) the pairs are LCM's instead (`_table_pairs`).
    """
    k_idx, k_z, k_drop = keys.split(key, 3)
    if sigma_table is not None:
        t, t2, index = _table_pairs(k_idx, x0.shape[0], sigma_table=sigma_table, skip=skip)
    else:
        pairs = num_scales if skip == 1 else num_scales - (skip - 1)
        index = (index_sampler or sample_train_indices)(k_idx, x0.shape[0], pairs)
        t = karras_sigma(index, num_scales, **grid)
        t2 = karras_sigma(index + skip, num_scales, **grid)
    z = keys.normal(k_z, x0.shape, jnp.float32)
    losses = consistency_loss_at(
        consistency_fn, params, target_params, teacher_step, x0, t, t2, z, k_drop, **kw
    )
    return losses, {"sigma": t, "index": index}


def _table_pairs(key: jax.Array, batch: int, *, sigma_table: jax.Array, skip: int):
    """LCM's pairs on a discrete teacher's levels: timestep t = (i+1) k - 1, i ~ U{0..N//k - 1},
    to max(t - k, 0) (train_lcm_distill_sd_wds.py's DDIMSolver grid). Returns (sigma, sigma', t).
    """
    table = jnp.asarray(sigma_table, jnp.float32)
    count = table.shape[0] // skip
    start = (keys.randint(key, (batch,), 0, count) + 1) * skip - 1
    return table[start], table[vp.lcm_skip_end(start, skip=skip)], start


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
    index_sampler: IndexSampler | None = None,
    skip: int = 1,
    sigma_table: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """L_CD^N: lambda(t_i) d(f_theta(x_{t_i}, t_i), f_theta-(x^phi_{t_{i+1}}, t_{i+1})).

    i ~ U{0, ..., N-2}, or `index_sampler` (e.g. iCT's discretised lognormal). skip = k > 1:
    the pair (t_i, t_{i+k}), which the teacher crosses in ONE solver step (LCM's skipping step).
    sigma_table: a discrete (VP) teacher's levels of its timesteps 0..T-1, which replace the
    Karras grid: the pair is timestep t -> max(t - k, 0) of LCM's grid (`_table_pairs`), and
    the metrics' 'index' is the start timestep t.

    x^phi_{t_{i+1}} is one `solver` step (Heun, Euler, DDIM or DPM-Solver-2, from `ode`) of the
    frozen teacher denoiser `teacher_denoise(x, sigma)` from x_{t_i} = x0 + t_i z.
    """

    def teacher_step(x_t, t, t2, x0, z):
        return solver(teacher_denoise, x_t, t, t2)

    grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    return _discrete_consistency_loss(
        consistency_fn,
        params,
        target_params,
        teacher_step,
        x0,
        key,
        num_scales=num_scales,
        grid=grid,
        distance=distance,
        weighting=weighting,
        index_sampler=index_sampler,
        skip=skip,
        sigma_table=sigma_table,
    )


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
    index_sampler: IndexSampler | None = None,
    skip: int = 1,
) -> tuple[jax.Array, Metrics]:
    """L_CT^N: lambda(t_i) d(f_theta(x0 + t_i z, t_i), f_theta-(x0 + t_{i+1} z, t_{i+1})).

    The teacher is replaced by the data point x0 (the unbiased score estimate), so the target's
    input is x0 + t_{i+1} z with the same z. iCT is this loss with target_params = params,
    lognormal indices, the 'ict' weighting and the pseudo-Huber distance. skip = k > 1: the
    pair (t_i, t_{i+k}).
    """

    def data_step(x_t, t, t2, x0, z):
        return x0 + broadcast_to(t2, x0) * z

    grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    return _discrete_consistency_loss(
        consistency_fn,
        params,
        target_params,
        data_step,
        x0,
        key,
        num_scales=num_scales,
        grid=grid,
        distance=distance,
        weighting=weighting,
        index_sampler=index_sampler,
        skip=skip,
    )


def easy_consistency_loss(
    consistency_fn: ModelFn,
    params,
    x0: jax.Array,
    key: jax.Array,
    step: jax.Array,
    *,
    distance: Distance,
    weighting: Weighting,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    q: float = 2.0,
    k: float = 8.0,
    b: float = 1.0,
    stage_steps: int = 25000,
    r_min: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """ECT: lambda(t) d(f_theta(x0 + t z, t), sg f_theta(x0 + r z, r)), ln t ~ N(P_mean, P_std^2).

    r = schedules.ect_r(t, step): dt = t - r shrinks by q every stage. The target is x0 where
    r <= r_min (0: ECT's r = 0), so the function trained must have its boundary at r_min: ECT
    trains the network with the EDM scalings (f(x, 0) = x) and samples with the boundary ones.
    Both passes share z and the dropout key.
    """
    k_t, k_z, k_drop = keys.split(key, 3)
    t = sample_lognormal_sigma(k_t, x0.shape[0], p_mean=p_mean, p_std=p_std)
    r = ect_r(t, step, q=q, k=k, b=b, stage_steps=stage_steps)
    z = keys.normal(k_z, x0.shape, jnp.float32)
    online = consistency_fn(params, x0 + broadcast_to(t, x0) * z, t, k_drop)
    use_net = r > r_min
    r_safe = jnp.where(use_net, r, 1.0)  # any valid noise level where x0 is the target
    target = consistency_fn(params, x0 + broadcast_to(r_safe, x0) * z, r_safe, k_drop)
    target = jax.lax.stop_gradient(jnp.where(broadcast_to(use_net, x0), target, x0))
    losses = weighting(t, r) * distance(online, target)
    return check_per_example(losses, x0.shape[0]), {"sigma": t, "r": r}


def progressive_distillation_loss(
    denoise_fn: ModelFn,
    params,
    teacher_denoise: Callable[[jax.Array, jax.Array], jax.Array],
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
    """PD: lambda(t) d(D_theta(x_t, t), sg(x_t - t (x_t3 - x_t)/(t3 - t))), x_t3: 2 teacher steps.

    i ~ U{0, ..., N-1} with N = `num_scales` the student's current number of steps (may be
    traced); t, t2, t3 = progdist_sigmas(i, N) (positions i/N, (i+1/2)/N, (i+1)/N of the Karras
    ramp); x_t = x0 + t z. The frozen teacher `teacher_denoise(x, sigma)` (no dropout) takes two
    Euler (DDIM) steps of the PF-ODE, x_t -> x_t2 -> x_t3; the target is the denoiser whose single
    Euler step from (x_t, t) lands on x_t3, and no gradient flows through it. The student D_theta
    is the EDM denoiser `denoise_fn(params, x, sigma, dropout_key)`. jcm uses the 'truncated-snr'
    weighting max(1/t^2, 1) and the per-pixel-mean l2 distance by default.
    """
    k_idx, k_z, k_drop = keys.split(key, 3)
    batch = x0.shape[0]
    index = keys.randint(k_idx, (batch,), 0, jnp.asarray(num_scales, jnp.int32))
    t, t2, t3 = progdist_sigmas(
        index, num_scales, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho
    )
    z = keys.normal(k_z, x0.shape, jnp.float32)
    x_t = x0 + broadcast_to(t, x0) * z
    x_t2 = euler_step(teacher_denoise, x_t, t, t2)
    x_t3 = euler_step(teacher_denoise, x_t2, t2, t3)
    target = x_t - broadcast_to(t / (t3 - t), x_t) * (x_t3 - x_t)
    target = jax.lax.stop_gradient(target)
    denoised = denoise_fn(params, x_t, t, k_drop)
    losses = weighting(t) * distance(denoised, target)
    return check_per_example(losses, batch), {"sigma": t, "index": index}


def autoencoder_loss(
    autoencode: Callable,
    params,
    x: jax.Array,
    key: jax.Array,
    *,
    distance: Distance,
    kl_weight: float,
    pixel_distance: Distance | None = None,
    perceptual_weight: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """KL autoencoder (LDM's first stage, without its GAN): d(D(z), x) + kl_weight KL(q(z|x) || p).

    z = mean + std eps, eps ~ N(0, I) from `key`; `autoencode(params, x, key)` returns (D(z),
    KL(q(z|x) || N(0, I)) [B] summed over the latent). With `pixel_distance` the reconstruction
    term is pixel_distance + perceptual_weight * distance (LDM's l1 + LPIPS), else `distance`.
    """
    reconstruction, kl = autoencode(params, x, key)
    rec = distance(reconstruction, x)
    if pixel_distance is not None:
        rec = pixel_distance(reconstruction, x) + perceptual_weight * rec
    losses = rec + kl_weight * kl
    return check_per_example(losses, x.shape[0]), {"reconstruction": rec, "kl": kl}
