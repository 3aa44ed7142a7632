"""Losses: closed-form checks of CD (Heun/Euler teacher), CT, EDM DSM, stop-gradient and dropout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency.core import continuous_losses, losses, ode, schedules
from consistency.core.distances import l2, l2_norm
from consistency.core.parameterization import get_weighting

UNIFORM = get_weighting("uniform")


def relative_sq(a, b):
    """sum (a - b)^2 / sum a^2 per example: removes the unknown noise draw from closed forms."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return jnp.sum((a - b) ** 2, 1) / jnp.sum(a**2, 1)


def scale_fn(params, x, sigma, key):
    return params["w"] * x


def _t_t2(metrics, n):
    t = np.asarray(metrics["sigma"])
    t2 = np.asarray(schedules.karras_sigma(metrics["index"] + 1, n))
    np.testing.assert_allclose(t, schedules.karras_sigma(metrics["index"], n), rtol=1e-6)
    return t, t2


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_cd_uses_one_teacher_step_with_shared_noise(solver):
    c, n, batch = 0.3, 18, 64
    x0 = jnp.zeros((batch, 4, 4, 3))  # data at 0, so x_t = t z and the noise draw cancels
    teacher = lambda x, s: c * x
    params = {"w": jnp.float32(1.0)}
    per, metrics = losses.consistency_distillation_loss(
        scale_fn,
        params,
        params,
        teacher,
        ode.get_solver(solver),
        x0,
        jax.random.key(0),
        num_scales=n,
        distance=relative_sq,
        weighting=UNIFORM,
    )
    assert per.shape == (batch,)
    t, t2 = _t_t2(metrics, n)
    d = (1 - c) / t  # (x - D(x))/t per unit x
    g = 1 + (t2 - t) * d  # Euler: x_t2 = g x_t
    if solver == "heun":
        g = 1 + (t2 - t) * (d + (1 - c) * g / t2) / 2
    np.testing.assert_allclose(per, (1 - g) ** 2, rtol=2e-4, atol=1e-9)
    assert set(np.asarray(metrics["index"]).tolist()) <= set(range(n - 1))


def test_ct_target_is_x0_plus_next_sigma_times_same_z():
    n, batch = 10, 64
    params = {"w": jnp.float32(2.0)}
    per, metrics = losses.consistency_training_loss(
        scale_fn,
        params,
        params,
        jnp.zeros((batch, 8)),
        jax.random.key(1),
        num_scales=n,
        distance=relative_sq,
        weighting=UNIFORM,
    )
    t, t2 = _t_t2(metrics, n)
    np.testing.assert_allclose(per, (1 - t2 / t) ** 2, rtol=2e-4, atol=1e-9)


def test_no_gradient_through_target_and_teacher():
    x0 = jax.random.normal(jax.random.key(2), (16, 6))

    def mean_loss(params, target_params):
        per, _ = losses.consistency_distillation_loss(
            scale_fn,
            params,
            target_params,
            lambda x, s: 0.5 * x,
            ode.heun_step,
            x0,
            jax.random.key(3),
            num_scales=18,
            distance=l2,
            weighting=UNIFORM,
        )
        return per.mean()

    g_online, g_target = jax.grad(mean_loss, argnums=(0, 1))({"w": 1.1}, {"w": 0.9})
    assert g_target["w"] == 0.0 and abs(g_online["w"]) > 1e-3


def test_online_and_target_share_the_dropout_key():
    def dropout_fn(params, x, sigma, key):
        return x + 0.1 * jax.random.normal(key, x.shape)

    # A teacher step that returns its input and t2 = t: online and target differ only by dropout.
    same = losses.consistency_loss_at(
        dropout_fn,
        {},
        {},
        lambda x_t, t, t2, x0, z: x_t,
        jnp.ones((4, 5)),
        jnp.full((4,), 2.0),
        jnp.full((4,), 2.0),
        jnp.ones((4, 5)),
        jax.random.key(4),
        distance=l2,
        weighting=UNIFORM,
    )
    np.testing.assert_array_equal(same, 0.0)


def test_weighting_multiplies_per_example():
    t = jnp.array([0.5, 2.0, 10.0])
    per = losses.consistency_loss_at(
        scale_fn,
        {"w": 1.0},
        {"w": 1.0},
        lambda x_t, t, t2, x0, z: x0,
        jnp.zeros((3, 2)),
        t,
        t / 2,
        jnp.ones((3, 2)),
        jax.random.key(5),
        distance=l2,
        weighting=get_weighting("snr"),
    )
    np.testing.assert_allclose(per, t**2 / t**2, rtol=1e-6)  # l2 = t^2, snr = 1/t^2


def test_edm_loss_weight_and_noise_distribution():
    batch = 512
    x0 = jnp.zeros((batch, 64, 64, 3))
    identity = lambda params, x, sigma, key: x
    per, metrics = losses.edm_loss(identity, None, x0, jax.random.key(6), sigma_data=0.5)
    sigma = np.asarray(metrics["sigma"])
    # D(x) = x with x0 = 0: loss = (1/s^2 + 1/sd^2) s^2 mean(z^2) = (1 + 4 s^2) mean(z^2).
    ratio = np.asarray(per) / (1 + 4 * sigma**2)
    assert np.all(np.abs(ratio - 1) < 0.08) and abs(ratio.mean() - 1) < 0.01
    assert abs(np.log(sigma).mean() + 1.2) < 0.2 and abs(np.log(sigma).std() - 1.2) < 0.2
    exact = lambda params, x, sigma, key: jnp.zeros_like(x)
    np.testing.assert_array_equal(losses.edm_loss(exact, None, x0, jax.random.key(7))[0], 0.0)


def test_traced_num_scales_compiles_once():
    traces = []

    @jax.jit
    def step(n):
        traces.append(1)
        return losses.consistency_training_loss(
            scale_fn, {"w": 1.0}, {"w": 1.0}, jnp.ones((8, 3)), jax.random.key(8),
            num_scales=n, distance=l2, weighting=UNIFORM,
        )[1]["index"]  # fmt: skip

    for n in (2, 17, 151):
        assert int(step(jnp.int32(n)).max()) <= n - 2
    assert len(traces) == 1


def test_per_example_shape_is_enforced():
    bad = functools.partial(losses.consistency_loss_at, scale_fn, {"w": 1.0}, {"w": 1.0})
    with pytest.raises(ValueError, match="per-example"):
        bad(
            lambda x_t, t, t2, x0, z: x0,
            jnp.zeros((3, 3)),
            jnp.ones(3),
            jnp.ones(3),
            jnp.ones((3, 3)),
            jax.random.key(0),
            distance=lambda a, b: (a - b) ** 2,
            weighting=UNIFORM,
        )


def test_continuous_tangent_matches_finite_differences():
    x = jax.random.normal(jax.random.key(10), (3, 5))
    u = jax.random.normal(jax.random.key(11), (3, 5))
    t = jnp.array([0.3, 1.0, 4.0])
    f = lambda x, s: jnp.tanh(x * s[:, None]) + s[:, None] ** 2 * x
    out, v = continuous_losses.consistency_tangent(f, x, t, u)
    h = 1e-2  # central differences of s -> f(x + s u, t - s)
    fd = (f(x + h * u, t - h) - f(x - h * u, t + h)) / (2 * h)
    np.testing.assert_allclose(out, f(x, t), rtol=1e-6)
    np.testing.assert_allclose(v, fd, rtol=1e-3, atol=1e-3)


def test_trigflow_tangent_is_cos_t_times_df_dt_along_the_path():
    sd = 0.5
    x0 = jax.random.normal(jax.random.key(12), (3, 5))
    z = sd * jax.random.normal(jax.random.key(13), (3, 5))
    net = lambda x_in, t: jnp.tanh(x_in) * jnp.cos(3 * t)[:, None] + t[:, None] * x_in**2
    path = lambda t: jnp.cos(t)[:, None] * x0 + jnp.sin(t)[:, None] * z

    def f(t):  # the TrigFlow consistency function on the CT path x_t(t)
        return jnp.cos(t)[:, None] * path(t) - jnp.sin(t)[:, None] * sd * net(path(t) / sd, t)

    t = jnp.array([0.2, 0.8, 1.4])
    dxdt = jnp.cos(t)[:, None] * z - jnp.sin(t)[:, None] * x0
    F, g = continuous_losses.trigflow_tangent(net, path(t), t, dxdt, sigma_data=sd)
    h = 1e-2
    fd = jnp.cos(t)[:, None] * (f(t + h) - f(t - h)) / (2 * h)
    np.testing.assert_allclose(F, net(path(t) / sd, t), rtol=1e-6)
    np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-3)
    _, g0 = continuous_losses.trigflow_tangent(net, path(t), t, dxdt, warmup=0.0, sigma_data=sd)
    np.testing.assert_allclose(g0, -(jnp.cos(t)[:, None] ** 2) * (sd * F - dxdt), rtol=1e-5)


def _const_in_x(params, x, sigma, key):
    """f = w h(sigma), h = sigma/(1 + sigma): v = -w h'(t), h' = 1/(1 + t)^2."""
    return params["w"] * jnp.broadcast_to((sigma / (1 + sigma))[:, None], x.shape)


def test_continuous_losses_closed_form_value_and_gradient():
    x0, key, params = jnp.zeros((64, 16)), jax.random.key(14), {"w": jnp.float32(1.5)}
    common = dict(teacher_denoise=None, distance=l2_norm, weighting=UNIFORM)
    per, m = continuous_losses.continuous_consistency_loss(
        _const_in_x, params, x0, key, stopgrad=False, **common
    )
    t = np.asarray(m["sigma"])
    h, dh = t / (1 + t), 1 / (1 + t) ** 2
    np.testing.assert_allclose(per, 4.0 * 1.5 * dh, rtol=1e-5)  # ||v|| = sqrt(16) w h'
    assert t.min() >= 0.002 and t.max() <= 80.0

    def pseudo(p):
        per, _ = continuous_losses.continuous_consistency_loss(
            _const_in_x, p, x0, key, stopgrad=True, **common
        )
        return per.mean(), per

    (_, per), grad = jax.value_and_grad(pseudo, has_aux=True)(params)
    np.testing.assert_allclose(per, 16 * 1.5**2 * h * dh, rtol=1e-5)
    # The gradient of the l2 CM loss / (2 dt) as dt -> 0: D w h(t) h'(t), through f only.
    np.testing.assert_allclose(grad["w"], np.mean(16 * 1.5 * h * dh), rtol=1e-5)


def test_continuous_cd_tangent_follows_the_teacher():
    x0, key = jnp.zeros((32, 8)), jax.random.key(15)
    identity = lambda params, x, sigma, k: x
    kw = dict(stopgrad=False, distance=l2_norm, weighting=UNIFORM)
    ct, _ = continuous_losses.continuous_consistency_loss(
        identity, None, x0, key, teacher_denoise=None, **kw
    )
    teacher = lambda x, s: 0.3 * x  # x0 = 0: t score = (0.3 - 1) z
    cd, _ = continuous_losses.continuous_consistency_loss(
        identity, None, x0, key, teacher_denoise=teacher, **kw
    )
    np.testing.assert_allclose(cd / ct, 0.7, rtol=1e-5)


def _gaussian_flow(params, x, sigma, key, *, mean=0.3):
    """f(x, s) = m + (x - m) sqrt(a^2 + eps^2)/sqrt(a^2 + s^2): the exact PF-ODE map of
    N(m, a^2 I) for a = params['a'], so f(x, eps) = x for every a."""
    a2, s = params["a"] ** 2, sigma[:, None]
    return mean + (x - mean) * jnp.sqrt(a2 + schedules.SIGMA_MIN**2) / jnp.sqrt(a2 + s**2)


@pytest.mark.parametrize("stopgrad", [False, True])
def test_continuous_cd_is_stationary_only_at_the_exact_flow(stopgrad):
    # Data N(m, s^2 I) with its closed-form teacher D* = m + (x - m) s^2/(s^2 + t^2): the
    # tangent of f_a vanishes at a = s (f is then the exact flow), and descent moves a to s.
    m, s = 0.3, 0.4
    x0 = m + s * jax.random.normal(jax.random.key(30), (512, 6))
    teacher = lambda x, t: m + (x - m) * s**2 / (s**2 + t[:, None] ** 2)

    def loss(a):
        per, _ = continuous_losses.continuous_consistency_loss(
            _gaussian_flow,
            {"a": a},
            x0,
            jax.random.key(31),
            teacher_denoise=teacher,
            stopgrad=stopgrad,
            distance=l2_norm,
            weighting=UNIFORM,
        )
        return per.mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    at_exact, grad_exact = value_and_grad(jnp.float32(s))
    for a in (0.5 * s, 2.0 * s):
        value, grad = value_and_grad(jnp.float32(a))
        assert np.sign(grad) == np.sign(a - s), (a, grad)  # descent moves a toward s
        if stopgrad:  # the pseudo-loss's gradient, the l2 CM loss's / (2 dt), vanishes there
            assert abs(grad_exact) < 1e-4 * abs(grad), (grad_exact, grad)
        else:  # ||v|| vanishes there (its gradient is a unit direction, not small, near v = 0)
            assert at_exact < 1e-4 * value, (at_exact, value)


def test_ect_target_is_x0_then_x0_plus_r_z():
    x0, identity = jnp.zeros((256, 8)), lambda params, x, sigma, key: x
    kw = dict(distance=relative_sq, weighting=UNIFORM, q=2.0, stage_steps=10)
    for step, r_min in ((0, 0.0), (35, 0.0), (35, 0.05)):
        per, m = losses.easy_consistency_loss(
            identity, None, x0, jax.random.key(16), step, r_min=r_min, **kw
        )
        t, r = np.asarray(m["sigma"]), np.asarray(m["r"])
        r_eff = np.where(r > r_min, r, 0.0)  # the target is x0 at and below r_min
        np.testing.assert_allclose(per, (1 - r_eff / t) ** 2, rtol=1e-4, atol=1e-7)
        assert (r == 0).mean() > 0.5 if step == 0 else np.all(r >= 0.43 * t)  # n(t) <= 9
    assert np.any((r > 0) & (r <= 0.05))  # the last case had targets x0 with r > 0


def test_ect_shares_noise_and_dropout_between_passes():
    def dropout_fn(params, x, sigma, key):
        return x + 0.1 * jax.random.normal(key, x.shape)

    # Stage 40: r = t (1 - n(t) 2^-41) = t, so online and target differ only if masks differ.
    per, _ = losses.easy_consistency_loss(
        dropout_fn,
        None,
        jnp.ones((8, 6)),
        jax.random.key(17),
        400,
        distance=l2,
        weighting=UNIFORM,
        p_mean=1.0,
        p_std=0.1,
        stage_steps=10,
    )
    np.testing.assert_allclose(per, 0.0, atol=1e-10)


def test_ict_is_ct_with_lognormal_pairs_and_inverse_gap_weight():
    n = 11
    sampler = functools.partial(schedules.sample_lognormal_indices, max_scales=1281)
    per, metrics = losses.consistency_training_loss(
        scale_fn,
        {"w": jnp.float32(2.0)},
        {"w": jnp.float32(2.0)},
        jnp.zeros((256, 8)),
        jax.random.key(18),
        num_scales=n,
        distance=relative_sq,
        weighting=get_weighting("ict"),
        index_sampler=sampler,
    )
    t, t2 = _t_t2(metrics, n)
    np.testing.assert_allclose(per, (1 - t2 / t) ** 2 / (t - t2), rtol=2e-4)
    # Lognormal pairs concentrate on small sigma: the top pairs are rare.
    assert np.mean(np.asarray(metrics["index"]) < 3) < 0.15


def test_scm_loss_value_and_gradient_signs():
    """F = w x_in on x0 = 0: g = cos t (cos 2t - w sin 2t) z; descent moves w toward cot 2t."""
    net = lambda p, x_in, t, key: p["w"] * x_in
    logvar = lambda p, t: jnp.full(t.shape, p["lv"])
    params = {"w": jnp.float32(0.3), "lv": jnp.float32(0.5)}

    @jax.jit
    def run(params, key):
        def mean_loss(p):
            per, m = continuous_losses.scm_loss(
                net, logvar, p, jnp.zeros((1, 32)), key, velocity_fn=None, warmup=1.0, tangent_c=0.0
            )
            return per.mean(), (per, m)

        return jax.value_and_grad(mean_loss, has_aux=True)(params)

    for k in range(6):
        (_, (per, m)), grad = run(params, jax.random.key(19 + k))
        t = float(np.arctan(float(m["sigma"][0]) / 0.5))
        np.testing.assert_allclose(per, np.exp(0.5) / 32 - 0.5, rtol=1e-5)  # ||g_hat|| = 1
        np.testing.assert_allclose(grad["lv"], np.exp(0.5) / 32 - 1, rtol=1e-5)
        assert np.sign(float(grad["w"])) == -np.sign(np.cos(2 * t) - 0.3 * np.sin(2 * t))
