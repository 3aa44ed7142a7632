"""Per-example distances: closed forms, shapes, and the pseudo-Huber limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency.core import distances


def test_l1_l2_are_per_sample_means():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    y = jnp.zeros_like(x)
    np.testing.assert_allclose(distances.l1(x, y), [5.5, 17.5])
    np.testing.assert_allclose(distances.l2(x, y), np.mean(np.arange(24.0).reshape(2, 12) ** 2, 1))


def test_pseudo_huber_limits():
    c = 0.03
    x = jax.random.normal(jax.random.key(0), (3, 10))
    small = x * 1e-4
    sq = np.sum(np.asarray(small, np.float64) ** 2, 1)
    np.testing.assert_allclose(distances.pseudo_huber(small, 0 * x, c=c), sq / (2 * c), rtol=1e-3)
    big = x * 100
    norm = np.linalg.norm(np.asarray(big, np.float64), axis=1)
    np.testing.assert_allclose(distances.pseudo_huber(big, 0 * x, c=c), norm - c, rtol=1e-5)


def test_get_distance_builds_ict_constant_and_rejects_unknown():
    d = distances.get_distance("pseudo_huber", data_dim=3 * 32 * 32)
    x = jnp.ones((2, 3 * 32 * 32)) * 0.01
    c = 0.00054 * np.sqrt(3 * 32 * 32)
    expected = np.sqrt(np.sum(np.full(3072, 1e-4)) + c**2) - c
    np.testing.assert_allclose(d(x, 0 * x), [expected] * 2, rtol=1e-5)
    with pytest.raises(ValueError, match="choose one of.*pseudo_huber.*lpips"):
        distances.get_distance("l3")
    with pytest.raises(ValueError, match="needs huber_c or data_dim"):
        distances.get_distance("pseudo_huber")


def test_ict_c_for_cifar10_and_l2_norm():
    assert round(distances.ict_pseudo_huber_c(3 * 32 * 32), 4) == 0.0299
    assert round(distances.ict_pseudo_huber_c(3 * 64 * 64), 4) == 0.0599
    x = jnp.arange(24.0).reshape(2, 3, 4)
    norm = np.linalg.norm(np.arange(24.0).reshape(2, 12), axis=1)
    np.testing.assert_allclose(distances.get_distance("l2_norm")(x, 0 * x), norm, rtol=1e-6)
    np.testing.assert_allclose(distances.pseudo_huber(x, 0 * x, c=0.0), distances.l2_norm(x, 0 * x))


@pytest.mark.parametrize("name", ["l2_norm", "pseudo_huber_c0"])
def test_norm_gradient_is_zero_not_nan_at_equal_inputs(name):
    # ECT (c = 0) and jcm's continuous 'l2' use the plain norm; a zero difference must not NaN.
    fn = (
        distances.l2_norm
        if name == "l2_norm"
        else (lambda a, b: distances.pseudo_huber(a, b, c=0.0))
    )
    x = jax.random.normal(jax.random.key(1), (2, 5))
    y = x.at[1].add(jnp.arange(5.0))  # example 0 equal, example 1 not
    grad = jax.grad(lambda a: fn(a, y).sum())(x)
    np.testing.assert_array_equal(grad[0], 0.0)
    want = -np.arange(5.0) / np.linalg.norm(np.arange(5.0))  # d||a - y||/da = (a - y)/||a - y||
    np.testing.assert_allclose(grad[1], want, rtol=1e-6)
