"""Losses: closed-form checks of CD (Heun/Euler teacher), CT, EDM DSM, stop-gradient and dropout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency import losses, ode, schedules
from consistency.distances import l2
from consistency.parameterization import get_weighting

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
    teacher = lambda x, s: c * x  # noqa: E731
    params = {"w": jnp.float32(1.0)}
    per, metrics = losses.consistency_distillation_loss(
        scale_fn, params, params, teacher, ode.get_solver(solver), x0, jax.random.key(0),
        num_scales=n, distance=relative_sq, weighting=UNIFORM,
    )  # fmt: skip
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
        scale_fn, params, params, jnp.zeros((batch, 8)), jax.random.key(1),
        num_scales=n, distance=relative_sq, weighting=UNIFORM,
    )  # fmt: skip
    t, t2 = _t_t2(metrics, n)
    np.testing.assert_allclose(per, (1 - t2 / t) ** 2, rtol=2e-4, atol=1e-9)


def test_no_gradient_through_target_and_teacher():
    x0 = jax.random.normal(jax.random.key(2), (16, 6))

    def mean_loss(params, target_params):
        per, _ = losses.consistency_distillation_loss(
            scale_fn, params, target_params, lambda x, s: 0.5 * x, ode.heun_step, x0,
            jax.random.key(3), num_scales=18, distance=l2, weighting=UNIFORM,
        )  # fmt: skip
        return per.mean()

    g_online, g_target = jax.grad(mean_loss, argnums=(0, 1))({"w": 1.1}, {"w": 0.9})
    assert g_target["w"] == 0.0 and abs(g_online["w"]) > 1e-3


def test_online_and_target_share_the_dropout_key():
    def dropout_fn(params, x, sigma, key):
        return x + 0.1 * jax.random.normal(key, x.shape)

    # A teacher step that returns its input and t2 = t: online and target differ only by dropout.
    same = losses.consistency_loss_at(
        dropout_fn, {}, {}, lambda x_t, t, t2, x0, z: x_t, jnp.ones((4, 5)), jnp.full((4,), 2.0),
        jnp.full((4,), 2.0), jnp.ones((4, 5)), jax.random.key(4),
        distance=l2, weighting=UNIFORM,
    )  # fmt: skip
    np.testing.assert_array_equal(same, 0.0)


def test_weighting_multiplies_per_example():
    t = jnp.array([0.5, 2.0, 10.0])
    per = losses.consistency_loss_at(
        scale_fn, {"w": 1.0}, {"w": 1.0}, lambda x_t, t, t2, x0, z: x0,
        jnp.zeros((3, 2)), t, t / 2, jnp.ones((3, 2)), jax.random.key(5),
        distance=l2, weighting=get_weighting("snr"),
    )  # fmt: skip
    np.testing.assert_allclose(per, t**2 / t**2, rtol=1e-6)  # l2 = t^2, snr = 1/t^2


def test_edm_loss_weight_and_noise_distribution():
    batch = 512
    x0 = jnp.zeros((batch, 64, 64, 3))
    identity = lambda params, x, sigma, key: x  # noqa: E731
    per, metrics = losses.edm_loss(identity, None, x0, jax.random.key(6), sigma_data=0.5)
    sigma = np.asarray(metrics["sigma"])
    # D(x) = x with x0 = 0: loss = (1/s^2 + 1/sd^2) s^2 mean(z^2) = (1 + 4 s^2) mean(z^2).
    ratio = np.asarray(per) / (1 + 4 * sigma**2)
    assert np.all(np.abs(ratio - 1) < 0.08) and abs(ratio.mean() - 1) < 0.01
    assert abs(np.log(sigma).mean() + 1.2) < 0.2 and abs(np.log(sigma).std() - 1.2) < 0.2
    exact = lambda params, x, sigma, key: jnp.zeros_like(x)  # noqa: E731
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
            lambda x_t, t, t2, x0, z: x0, jnp.zeros((3, 3)), jnp.ones(3), jnp.ones(3),
            jnp.ones((3, 3)), jax.random.key(0), distance=lambda a, b: (a - b) ** 2,
            weighting=UNIFORM,
        )  # fmt: skip
