"""Continuous-time consistency losses by forward-mode tangents: jcm's L^inf CD/CT, sCM (sCT/sCD
in TrigFlow); per-example values [B] and a metrics dict, as core/losses.py's."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from consistency.core import keys
from consistency.core.losses import Distance, Metrics, ModelFn, Weighting, check_per_example
from consistency.core.parameterization import SIGMA_DATA, broadcast_to, trigflow_time
from consistency.core.schedules import (
    RHO,
    SIGMA_MAX,
    SIGMA_MIN,
    sample_lognormal_sigma,
    sample_rho_uniform_sigma,
)


def continuous_consistency_loss(
    consistency_fn: ModelFn,
    params,
    x0: jax.Array,
    key: jax.Array,
    *,
    teacher_denoise: Callable[[jax.Array, jax.Array], jax.Array] | None,
    stopgrad: bool,
    distance: Distance,
    weighting: Weighting,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> tuple[jax.Array, Metrics]:
    """L^inf (CM paper, jcm): v = d/ds f(x_t + s t score, t - s) at s = 0, by one jax.jvp.

    loss = lambda(t) d(v, 0) (gradient through the JVP), or with `stopgrad` the pseudo-loss
    -lambda(t) sum(sg(v) f_theta(x_t, t)), whose gradient is the l2 CM loss's as dt -> 0.
    score = (D(x_t, t) - x_t)/t^2 of the frozen teacher (CD), or (x0 - x_t)/t^2 (CT), so the x
    tangent t score is (D - x_t)/t, or -z. t^(1/rho) is uniform between the grid's ends.
    """
    k_t, k_z, k_drop = keys.split(key, 3)
    t = sample_rho_uniform_sigma(
        k_t, x0.shape[0], sigma_min=sigma_min, sigma_max=sigma_max, rho=rho
    )
    z = keys.normal(k_z, x0.shape, jnp.float32)
    x_t = x0 + broadcast_to(t, x0) * z
    if teacher_denoise is None:
        x_tangent = -z
    else:
        x_tangent = jax.lax.stop_gradient((teacher_denoise(x_t, t) - x_t) / broadcast_to(t, x0))
    f = lambda x, s: consistency_fn(params, x, s, k_drop)
    out, v = consistency_tangent(f, x_t, t, x_tangent)
    if stopgrad:
        flat = lambda a: a.reshape(a.shape[0], -1)
        per = -jnp.sum(flat(jax.lax.stop_gradient(v)) * flat(out), axis=1)
    else:
        per = distance(v, jnp.zeros_like(v))
    return check_per_example(weighting(t) * per, x0.shape[0]), {"sigma": t}


def consistency_tangent(
    fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_t: jax.Array,
    t: jax.Array,
    x_tangent: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(f(x_t, t), v), v = d/ds f(x_t + s x_tangent, t - s) at s = 0, by one forward-mode pass.

    With x_tangent = t score(x_t, t), v is the derivative of f along the PF-ODE backwards in t
    (jcm's continuous-time `diffs`).
    """
    return jax.jvp(fn, (x_t, t), (x_tangent, -jnp.ones_like(t)))


def trigflow_tangent(
    fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_t: jax.Array,
    t: jax.Array,
    dxdt: jax.Array,
    *,
    warmup: jax.Array | float = 1.0,
    sigma_data: float = SIGMA_DATA,
) -> tuple[jax.Array, jax.Array]:
    """(F, g): g = -cos^2 t (sd F - dx/dt) - r cos t sin t (x_t + sd dF/dt) (sCM Eq. 6, Alg. 1).

    At r = 1, g = cos t df/dt for f = cos t x_t - sin t sd F(x_t/sd, t). cos t sin t sd dF/dt
    is one jax.jvp of F = fn(x_in, t) at (x_t/sd, t) along (cos t sin t dx/dt, cos t sin t sd),
    the rearrangement that keeps the tangent finite as t -> 0 and t -> pi/2.
    """
    cos, sin = broadcast_to(jnp.cos(t), x_t), broadcast_to(jnp.sin(t), x_t)
    cs = jnp.cos(t) * jnp.sin(t)
    F, jvp = jax.jvp(fn, (x_t / sigma_data, t), (broadcast_to(cs, x_t) * dxdt, cs * sigma_data))
    return F, -(cos**2) * (sigma_data * F - dxdt) - warmup * (cos * sin * x_t + jvp)


# net_fn(params, x_in, t, dropout_key) -> F_theta(x_in, t), the raw TrigFlow network (c_noise = t).
TrigFlowNet = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


def scm_loss(
    net_fn: TrigFlowNet,
    logvar_fn: Callable[[object, jax.Array], jax.Array],
    params,
    x0: jax.Array,
    key: jax.Array,
    *,
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array] | None,
    warmup: jax.Array | float,
    sigma_data: float = SIGMA_DATA,
    p_mean: float = -1.0,
    p_std: float = 1.4,
    tangent_c: float = 0.1,
) -> tuple[jax.Array, Metrics]:
    """sCM (Lu & Song 2024, Alg. 1): e^w(t)/D ||F_theta - F_theta- - g||^2 - w(t).

    x_t = cos t x0 + sin t z, z ~ N(0, sd^2 I), sd tan t = e^tau, tau ~ N(P_mean, P_std^2);
    g = trigflow_tangent of F- = sg(F_theta), normalised g/(||g|| + c); dx/dt = cos t z -
    sin t x0 (sCT) or `velocity_fn(x_t, t)` (sCD); `warmup` is r; w = `logvar_fn(params, t)`
    is the learned adaptive weighting. Both passes share the dropout key.
    """
    k_t, k_z, k_drop = keys.split(key, 3)
    batch, dim = x0.shape[0], x0[0].size
    sigma = sample_lognormal_sigma(k_t, batch, p_mean=p_mean, p_std=p_std)
    t = trigflow_time(sigma, sigma_data=sigma_data)
    cos, sin = broadcast_to(jnp.cos(t), x0), broadcast_to(jnp.sin(t), x0)
    z = sigma_data * keys.normal(k_z, x0.shape, jnp.float32)
    x_t = cos * x0 + sin * z
    if velocity_fn is None:
        dxdt = cos * z - sin * x0
    else:
        dxdt = jax.lax.stop_gradient(velocity_fn(x_t, t))
    frozen = jax.lax.stop_gradient(params)
    f_minus = lambda x_in, tt: net_fn(frozen, x_in, tt, k_drop)
    F_minus, g = trigflow_tangent(f_minus, x_t, t, dxdt, warmup=warmup, sigma_data=sigma_data)
    g_norm = jnp.sqrt(jnp.sum(g.reshape(batch, -1) ** 2, axis=1))
    g = g / broadcast_to(g_norm + tangent_c, g)
    F = net_fn(params, x_t / sigma_data, t, k_drop)
    mse = jnp.sum((F - jax.lax.stop_gradient(F_minus + g)).reshape(batch, -1) ** 2, axis=1)
    w = logvar_fn(params, t)
    losses = jnp.exp(w) / dim * mse - w
    metrics = {"sigma": sigma, "logvar": w, "tangent_norm": g_norm / jnp.sqrt(dim)}
    return check_per_example(losses, batch), metrics
