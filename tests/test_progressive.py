"""Progressive distillation (Salimans & Ho 2022, jcm's baseline): its loss with closed-form
denoisers, its noise levels, and its sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency.core.distances import l2
from consistency.core.losses import progressive_distillation_loss
from consistency.core.parameterization import get_weighting
from consistency.core.samplers import SamplerSpec
from consistency.core.schedules import NoiseGrid, progdist_sigmas
from consistency.experiment import (
    methods,
    networks,
    sample,
    sampling_spec,
    spec,
    train_state,
    update,
)
from consistency.io import sharding

SMIN, SMAX, RHO = 0.002, 80.0, 7.0
SHAPE = (4, 3, 2)  # per-example shape
UNIFORM = get_weighting("uniform")
TRUNC_SNR = get_weighting("truncated-snr")


def sigma64(u):
    a, b = SMAX ** (1 / RHO), SMIN ** (1 / RHO)
    return (a + np.asarray(u, np.float64) * (b - a)) ** RHO


def const_student(params, x, sigma, key):
    """D_theta = params: the loss is quadratic in params, and its gradient gives the target."""
    return jnp.broadcast_to(params, x.shape).astype(jnp.float32)


def recover_target(teacher, x0, key, n):
    """The PD target, from the gradient at params = 0 of sum(l2(params, target)) (uniform weight).

    d/dp sum_b mean_j (p_bj - T_bj)^2 = 2 (p - T)/P, so T = -P/2 grad(0).
    """

    def total(p):
        losses, _ = progressive_distillation_loss(
            const_student, p, teacher, x0, key, num_scales=n, distance=l2, weighting=UNIFORM
        )
        return jnp.sum(losses)

    grad = jax.grad(total)(jnp.zeros_like(x0))
    return -np.asarray(grad, np.float64) * np.prod(SHAPE) / 2.0


def capture_student(store):
    def student(params, x, sigma, key):
        store["x_t"], store["t"] = np.asarray(x, np.float64), np.asarray(sigma, np.float64)
        return jnp.zeros_like(x)

    return student


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_gaussian_teacher_target_matches_two_euler_steps_by_hand(n):
    s = 0.5  # data ~ N(0, s^2 I): the exact denoiser is s^2/(s^2+t^2) x
    teacher = lambda x, t: (s**2 / (s**2 + t**2))[:, None, None, None] * x
    B = 32
    x0 = s * jax.random.normal(jax.random.PRNGKey(1), (B,) + SHAPE)
    key = jax.random.PRNGKey(2)

    store = {}
    _, metrics = progressive_distillation_loss(
        capture_student(store),
        None,
        teacher,
        x0,
        key,
        num_scales=n,
        distance=l2,
        weighting=UNIFORM,
    )
    i = np.asarray(metrics["index"], np.float64)
    t, t2, t3 = sigma64(i / n), sigma64((i + 0.5) / n), sigma64((i + 1) / n)
    np.testing.assert_allclose(store["t"], t, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(metrics["sigma"]), t, rtol=2e-6)

    bc = lambda v: v[:, None, None, None]
    D = lambda x, tt: bc(s**2 / (s**2 + tt**2)) * x
    x_t = store["x_t"]
    z = (x_t - np.asarray(x0, np.float64)) / bc(t)  # x_t = x0 + t z, z ~ N(0, I)
    assert abs(z.mean()) < 0.15 and 0.85 < z.std() < 1.15
    x_t2 = x_t + bc(t2 - t) * (x_t - D(x_t, t)) / bc(t)
    x_t3 = x_t2 + bc(t3 - t2) * (x_t2 - D(x_t2, t2)) / bc(t2)
    expected = x_t - bc(t) * (x_t3 - x_t) / bc(t3 - t)
    # The Gaussian case is linear: target = k x_t, with k in closed form.
    c = (1 + (t2 - t) * t / (s**2 + t**2)) * (1 + (t3 - t2) * t2 / (s**2 + t2**2))
    np.testing.assert_allclose(expected, bc(1 - t * (c - 1) / (t3 - t)) * x_t, rtol=1e-10)

    got = recover_target(teacher, x0, key, n)
    err = np.abs(got - expected)
    per_max = lambda a: a.reshape(a.shape[0], -1).max(axis=1)
    # Where t <= 1: 1e-5 relative (atol 1e-5 of the example's largest |target| for near-zeros).
    small = t <= 1.0
    if small.any():
        tol = 1e-5 * np.abs(expected) + 1e-5 * bc(per_max(np.abs(expected)))
        assert np.all(err[small] <= tol[small]), np.max(err[small] / tol[small])
    # Everywhere: float32 cancellation in x_t - t (x_t3 - x_t)/(t3 - t) (as jcm computes it)
    # costs a few ulps of |x_t|, amplified by t/(t - t3): at t = 80, |x_t| ~ 200 and the
    # target ~ 0.2, so relative 1e-5 of the target is below float32 resolution there.
    eps32 = float(np.finfo(np.float32).eps)
    tol = 1e-5 * np.abs(expected) + bc(4 * eps32 * t / (t - t3) * per_max(np.abs(x_t)))
    assert np.all(err <= tol), np.max(err / tol)
    # Not vacuous: the tolerance resolves the two-step target from the teacher's one-step
    # denoiser D(x_t, t) (what a single Euler step from t would give).
    assert np.max(np.abs(expected - D(x_t, t)) / tol) > 10.0


def test_weighting_is_applied_per_example():
    x0 = jax.random.normal(jax.random.PRNGKey(3), (16,) + SHAPE)
    teacher = lambda x, t: 0.3 * x
    student = lambda p, x, t, k: 0.1 * x
    kw = dict(num_scales=8, distance=l2)
    key = jax.random.PRNGKey(4)
    plain, m = progressive_distillation_loss(
        student, None, teacher, x0, key, weighting=UNIFORM, **kw
    )
    weighted, _ = progressive_distillation_loss(
        student, None, teacher, x0, key, weighting=TRUNC_SNR, **kw
    )
    t = np.asarray(m["sigma"], np.float64)
    np.testing.assert_allclose(weighted, np.maximum(1 / t**2, 1.0) * plain, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 4, 32])
def test_point_mass_teacher_is_exact_so_the_loss_vanishes(n):
    B = 128
    c = jax.random.uniform(jax.random.PRNGKey(5), SHAPE, minval=-1.0, maxval=1.0)
    x0 = jnp.broadcast_to(c, (B,) + SHAPE)
    teacher = lambda x, t: jnp.broadcast_to(c, x.shape)
    student = lambda p, x, t, k: jnp.broadcast_to(c + p, x.shape)
    kw = dict(num_scales=n, distance=l2, weighting=TRUNC_SNR)
    key = jax.random.PRNGKey(6)
    losses, m = progressive_distillation_loss(student, 0.0, teacher, x0, key, **kw)
    assert losses.shape == (B,)
    idx = np.asarray(m["index"])
    assert idx.min() >= 0 and idx.max() <= n - 1
    if n <= 4:
        assert set(idx.tolist()) == set(range(n))  # all student steps visited
    # float32 cancellation in x_t - t (x_t3 - x_t)/(t3 - t) at t = 80 leaves ~1e-5 in the target.
    assert float(jnp.max(losses)) < 1e-8, float(jnp.max(losses))
    # Not vacuous: a student off by delta pays lambda(t) delta^2.
    off, _ = progressive_distillation_loss(student, 0.01, teacher, x0, key, **kw)
    t = np.asarray(m["sigma"], np.float64)
    np.testing.assert_allclose(off, np.maximum(1 / t**2, 1.0) * 1e-4, rtol=1e-2)


def test_sigma_bounds_and_ordering():
    for n in [1, 2, 3, 8, 1024]:
        i = jnp.arange(n)
        t, t2, t3 = (np.asarray(a, np.float64) for a in progdist_sigmas(i, n))
        assert t.shape == t2.shape == t3.shape == (n,)
        assert np.all(t > t2) and np.all(t2 > t3)
        np.testing.assert_allclose(t[0], SMAX, rtol=1e-5)
        np.testing.assert_allclose(t3[-1], SMIN, rtol=1e-5)
        assert t3[-1] >= SMIN * (1 - 1e-5)
        np.testing.assert_allclose(t3[:-1], t[1:], rtol=1e-6)  # consecutive student steps tile
        np.testing.assert_allclose(t2, sigma64((np.arange(n) + 0.5) / n), rtol=2e-6)
    # Halving N: the teacher's midpoints are the next stage's grid points (student N, teacher 2N).
    t_2n = np.asarray(progdist_sigmas(jnp.arange(16), 16)[0])
    t2_n = np.asarray(progdist_sigmas(jnp.arange(8), 8)[1])
    np.testing.assert_allclose(t2_n, t_2n[1::2], rtol=1e-6)


def test_traced_num_scales_under_jit_and_index_range():
    B, n = 256, 4
    x0 = jax.random.normal(jax.random.PRNGKey(7), (B,) + SHAPE)
    teacher_calls = []

    def teacher(x, t):
        teacher_calls.append(t)
        return 0.5 * x

    student = lambda p, x, t, k: p * x

    @jax.jit
    def run(p, key, num_scales):
        return progressive_distillation_loss(
            student, p, teacher, x0, key, num_scales=num_scales, distance=l2, weighting=TRUNC_SNR
        )

    losses, m = run(0.2, jax.random.PRNGKey(8), jnp.int32(n))
    assert len(teacher_calls) == 2  # two teacher (Euler) evaluations per example
    assert losses.shape == m["sigma"].shape == m["index"].shape == (B,)
    assert m["index"].dtype == jnp.int32
    idx = np.asarray(m["index"])
    assert idx.min() == 0 and idx.max() == n - 1
    np.testing.assert_allclose(m["sigma"], sigma64(idx / n), rtol=2e-6)
    assert np.all(np.isfinite(np.asarray(losses))) and np.all(np.asarray(losses) > 0)
    # Another N, same compiled function.
    _, m2 = run(0.2, jax.random.PRNGKey(8), jnp.int32(2))
    assert np.asarray(m2["index"]).max() <= 1
    assert run._cache_size() == 1


def test_teacher_gets_no_gradient_student_does():
    B = 16
    x0 = jax.random.normal(jax.random.PRNGKey(9), (B,) + SHAPE)
    key = jax.random.PRNGKey(10)
    student = lambda w, x, t, k: w * x / (1.0 + t[:, None, None, None] ** 2)

    def total(w, p):
        teacher = lambda x, t: p * x
        losses, _ = progressive_distillation_loss(
            student, w, teacher, x0, key, num_scales=4, distance=l2, weighting=TRUNC_SNR
        )
        return jnp.sum(losses)

    g_w, g_p = jax.grad(total, argnums=(0, 1))(0.3, 0.7)
    assert float(g_p) == 0.0
    assert abs(float(g_w)) > 1e-6
    # Not vacuous: the target (so the loss) does depend on the teacher's parameter.
    assert abs(float(total(0.3, 0.7)) - float(total(0.3, 0.2))) > 1e-4 * abs(float(total(0.3, 0.7)))
    # ... and differentiating without the stop-gradient would give a nonzero d/dp.
    g_p_fd = (float(total(0.3, 0.7 + 1e-2)) - float(total(0.3, 0.7 - 1e-2))) / 2e-2
    assert abs(g_p_fd) > 1e-6


def test_dropout_key_is_passed_and_differs_from_noise_keys():
    x0 = jnp.zeros((8,) + SHAPE)
    seen = {}

    def student(p, x, t, k):
        seen["key"] = k
        return x

    progressive_distillation_loss(
        student,
        None,
        lambda x, t: 0 * x,
        x0,
        jax.random.PRNGKey(11),
        num_scales=2,
        distance=l2,
        weighting=UNIFORM,
    )
    assert seen["key"].shape == jax.random.PRNGKey(0).shape
    assert not np.array_equal(np.asarray(seen["key"]), np.asarray(jax.random.PRNGKey(11)))


def test_per_example_check_rejects_an_unreduced_distance():
    x0 = jnp.zeros((8,) + SHAPE)
    per_pixel = lambda a, b: ((a - b) ** 2).reshape(a.shape[0], -1).T
    with pytest.raises(ValueError, match="per-example"):
        progressive_distillation_loss(
            lambda p, x, t, k: x,
            None,
            lambda x, t: 0 * x,
            x0,
            jax.random.PRNGKey(0),
            num_scales=2,
            distance=per_pixel,
            weighting=UNIFORM,
        )


# ---- the method row: stages restart from the EMA, the sampler, the configuration ----


def _pd_config():
    from configs import test as test_config

    config = test_config.get_config()
    config.model.unet.update(channels=4, channel_mult=(1,), attn_resolutions=())
    config.training.update(
        loss="pd",
        weighting="truncated-snr",
        start_scales=4,
        distill_steps_per_iter=2,
        init_from_teacher=True,
        ema_rates=(0.5,),
    )
    config.optim.update(optimizer="adam", lr=1e-3)
    return config


def test_pd_schedule_halves_the_student_steps_and_restarts_each_stage():
    method = methods.from_config(_pd_config())
    steps = jnp.arange(10)
    num = [int(method.schedule(s)[1]) for s in steps]
    # 4 steps, then 2 (the last halving comes after log2(4) - 1 = 1 stage and lasts twice as
    # long), then 1.
    assert num == [4, 4, 2, 2, 2, 2, 1, 1, 1, 1]
    restarts = [bool(method.restarts(s)) for s in steps]
    assert restarts == [False, False, True, False, False, False, True, False, False, False]
    assert method.keeps_target and method.needs_teacher and method.samples_as == "progressive"


def test_pd_trains_against_the_frozen_teacher_and_restarts_from_the_ema():
    config = _pd_config()
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    network, tx = networks.build_network(config), train_state.optimizer(config)
    teacher = network.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), int))
    state = update.init_state(config, network, tx, mesh, teacher)
    step = update.train_step_for(config, network, tx, mesh)
    distance = networks.distance_fn(config)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (1, 16, 8, 8, 1)).astype(np.float32),
             "label": np.zeros((1, 16), np.int32)}  # fmt: skip

    def leaves(tree):
        return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))

    for k in range(3):
        before = jax.device_get(state)
        state, metrics = step(state, batch, None, distance, jax.random.key(2))
        assert bool(metrics["finite"]) and int(metrics["num_scales"]) == (4 if k < 2 else 2)
        if k < 2:  # the first stage's teacher is the EDM teacher, never updated (mu = 1)
            assert same(state.target_params, teacher) and not same(state.params, teacher)
        else:  # step 2 starts stage 2: params = target = the EMA, the optimiser starts afresh
            assert same(state.target_params, before.ema_params[0])
            assert not same(state.target_params, teacher)
            counts = [x for x in leaves(state.opt_state) if x.dtype == np.int32]
            assert counts and all(int(c) == 1 for c in counts)


def test_pd_sampler_takes_n_euler_steps_on_its_ramp():
    # A point-mass denoiser D = c makes every Euler step exact: the sample is c wherever it starts.
    c = 0.3
    fns = methods.ModelFns(
        consistency=None, denoiser=lambda p, x, s, y, k: jnp.full_like(x, c), raw=None
    )
    for n in (1, 2, 4):
        sampler = SamplerSpec(kind="progressive", sigmas=(), steps=n)
        fn = sample.make_sampler(fns, sampler, NoiseGrid(), (4, 4, 1))
        images = fn(None, jax.random.key(0), jnp.arange(3), jnp.zeros((3,), jnp.int32))
        np.testing.assert_allclose(images, c, atol=1e-5)
    config = _pd_config()
    config.training.num_steps = 10
    assert sampling_spec.sampler(config) == SamplerSpec(kind="progressive", sigmas=(), steps=1)
    assert sampling_spec.sampler(config, "2").steps == 2
    with pytest.raises(ValueError, match="takes 'N' \\(Euler steps\\)"):
        sampling_spec.sampler(config, "0,22,39")


def test_progdist_curriculum_belongs_to_pd_only():
    config = _pd_config()
    config.training.update(loss="ct", scale_mode="progdist", target_ema_mode="fixed")
    found = spec.problems(config)
    assert any("use training.loss='pd'" in p for p in found), found
