"""Gradients: micro-batch accumulation and rematerialisation equal the plain full-batch gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from consistency.experiment import networks, train_state, update

STEP = 5  # N(5) = 7 grid points: a curriculum step past the first


def _grad_fn(micro_batches=1, scan=False, remat="none"):
    config = test_config.get_config()
    # Smaller than the test UNet still (one level, attention only in the middle): fast compiles.
    config.model.unet.update(channels=4, channel_mult=(1,), attn_resolutions=())
    config.model.remat = remat
    network = networks.build_network(config)
    loss = update.loss_for(config, network, networks.distance_fn(config))
    return network, jax.jit(update.make_grad_fn(loss, micro_batches, scan=scan))


def _inputs(network):
    """A batch, and params drawn on the host (no init or RNG compile): every layer, the
    zero-initialised output layers included, has a gradient; the target sits a little away."""
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
             "label": np.zeros((16,), np.int32)}  # fmt: skip
    shapes = jax.eval_shape(network.init, jax.random.key(0), batch["image"][:1], batch["label"][:1])
    params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
    return params, jax.tree.map(lambda p: 0.9 * p, params), batch


@pytest.fixture(scope="module")
def full_batch():
    network, fn = _grad_fn()
    params, target, batch = _inputs(network)
    return (params, target, batch), fn(params, target, None, batch, jax.random.key(2), STEP)


def _close(got, want, tol):
    value, grads, per, _ = got
    ref_value, ref_grads, ref_per, _ = want
    assert abs(float(value) - float(ref_value)) <= tol * abs(float(ref_value))
    np.testing.assert_allclose(per, ref_per, rtol=tol, atol=0)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        # Relative to the leaf's scale: entries near zero carry round-off of its size.
        assert float(jnp.max(jnp.abs(g - r))) <= tol * float(jnp.max(jnp.abs(r))) + 1e-12


def test_accumulated_micro_batch_gradient_equals_the_full_batch_gradient(full_batch):
    """lax.scan over 2 micro-batches (the accelerator path; test_train covers the unrolled one)."""
    (params, target, batch), want = full_batch
    _, fn = _grad_fn(micro_batches=2, scan=True)
    got = fn(params, target, None, batch, jax.random.key(2), STEP)
    assert float(jnp.max(jnp.abs(want[0]))) > 0 and np.all(np.asarray(want[2]) > 0)
    _close(got, want, 1e-5)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_gives_the_same_gradient(full_batch, remat):
    (params, target, batch), want = full_batch
    network, fn = _grad_fn(remat=remat)
    assert network.remat == remat
    _close(fn(params, target, None, batch, jax.random.key(2), STEP), want, 1e-5)


def test_ema_warmup_rate_and_update():
    """min(rate, (1+k)/(10+k)): 0.1 at step 0, the configured rate once (1+k)/(10+k) exceeds it."""
    rates = [float(train_state.warmup_ema_rate(0.999, k)) for k in (0, 10, 8990, 20000)]
    np.testing.assert_allclose(rates, [0.1, 11 / 20, 0.999, 0.999], rtol=1e-6)
    old, new = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
    mixed = train_state.ema(old, new, train_state.warmup_ema_rate(0.9, 0))
    np.testing.assert_allclose(mixed["w"], 0.1 * np.ones(3), rtol=1e-6)
