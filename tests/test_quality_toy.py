"""The toy quality benchmark's yardsticks: analytic denoiser, exact PF-ODE map, SW2 and MMD."""

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency.core import ode, schedules
from consistency.experiment import methods, update

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import quality_toy as qt
import toy_mixture as tm


def _log_density(mix, x, sigma):
    # log p_sigma(x) = logsumexp_k [ln w_k + ln N(x; m_k, (s_k^2 + sigma^2) I)], written anew.
    var = jnp.asarray(mix.stds) ** 2 + sigma**2
    sq = jnp.sum((x[None] - jnp.asarray(mix.means)) ** 2, axis=-1)
    log_n = -0.5 * sq / var - 0.5 * x.shape[-1] * jnp.log(2 * jnp.pi * var)
    return jax.scipy.special.logsumexp(jnp.log(jnp.asarray(mix.weights)) + log_n)


@pytest.mark.parametrize("dim", [2, 8])
def test_denoiser_is_tweedie_posterior_mean(dim):
    # D*(x, s) = x + s^2 grad log p_s(x) (Tweedie), at noise levels across the whole grid.
    mix = tm.make_mixture(dim)
    sigma = jnp.repeat(jnp.array([0.01, 0.1, 0.5, 2.0, 80.0]), 64)
    x0 = tm.sample_mixture(mix, jax.random.key(0), len(sigma))
    x = x0 + sigma[:, None] * jax.random.normal(jax.random.key(1), x0.shape)
    grad = jax.vmap(jax.grad(lambda x, s: _log_density(mix, x, s)))
    tweedie = jax.jit(lambda x, s: x + s[:, None] ** 2 * grad(x, s))(x, sigma)
    exact = tm.denoiser(mix, np.asarray(x, np.float64), np.asarray(sigma, np.float64), xp=np)
    # float32 Tweedie cancels x against s^2 score: round-off grows with |x| ~ sigma.
    atol = 2e-6 * (1 + np.asarray(sigma))[:, None]
    assert np.all(np.abs(np.asarray(tweedie, np.float64) - exact) < atol)
    teacher = jax.jit(lambda x, s: tm.denoiser(mix, x, s))(x, sigma)  # the CD teacher's path
    assert np.all(np.abs(np.asarray(teacher, np.float64) - exact) < atol)


def test_denoiser_matches_monte_carlo_posterior_mean():
    # E[x0 | x] = sum_j x0_j N(x; x0_j, s^2) / sum_j N(x; x0_j, s^2), x0_j ~ p (self-normalised).
    mix, sigma = tm.make_mixture(2), 0.3
    x0 = np.asarray(tm.sample_mixture(mix, jax.random.key(2), 50_000), np.float64)
    x = np.array([[0.7, 0.0], [0.35, 0.35], [-0.2, 0.5]])
    exact = tm.denoiser(mix, x, sigma, xp=np)
    for point, want in zip(x, exact, strict=True):
        log_w = -0.5 * np.sum((x0 - point) ** 2, axis=1) / sigma**2
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        mean = w @ x0
        stderr = np.sqrt(w**2 @ (x0 - mean) ** 2)
        assert np.all(np.abs(mean - want) < 5 * stderr + 1e-9), (point, mean, want, stderr)


def test_exact_flow_is_the_gaussian_closed_form():
    # One component N(m, s^2 I): f*(x, sigma) = m + (x - m) sqrt(s^2 + eps^2)/sqrt(s^2 + sigma^2).
    s, m = 0.4, np.array([0.3, -0.2, 0.1])
    mix = tm.Mixture(np.ones(1), m[None], np.array([s]))
    sigma = np.array([80.0, 20.0, 2.0, 0.5, 0.05, 0.01])
    x = m + sigma[:, None] * np.random.default_rng(0).normal(size=(len(sigma), 3))
    want = m + (x - m) * np.sqrt((s**2 + tm.SIGMA_MIN**2) / (s**2 + sigma[:, None] ** 2))
    np.testing.assert_allclose(tm.exact_flow(mix, x, sigma), want, rtol=1e-8, atol=1e-8)


def test_exact_flow_agrees_with_the_library_heun_teacher():
    # The same PF-ODE as ode.heun_step on a fine Karras grid: second order, float32.
    mix = tm.make_mixture(2)
    x_T = tm.SIGMA_MAX * jax.random.normal(jax.random.key(3), (256, 2))
    sigmas = schedules.karras_sigmas(400)
    denoise = lambda x, s: tm.denoiser(mix, x, s)

    def body(x, pair):
        return ode.heun_step(denoise, x, pair[0], pair[1]), None

    heun, _ = jax.jit(lambda x: jax.lax.scan(body, x, (sigmas[:-1], sigmas[1:])))(x_T)
    exact = tm.exact_flow(mix, x_T, tm.SIGMA_MAX)
    assert np.abs(np.asarray(heun) - exact).max() < 2e-3
    assert np.abs(np.asarray(heun) - exact).mean() < 1e-4


def test_sliced_w2_and_mmd_separate_shifted_sets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1000, 2)), rng.normal(size=(1000, 2))
    assert tm.sliced_w2(a, a) == 0.0
    # A translation by d moves every projection by <theta, d>: SW2 = |d| sqrt(E theta_1^2).
    shifted = tm.sliced_w2(a, a + [0.5, 0.0])
    assert 0.5 * 0.6 < shifted < 0.5 * 0.8  # sqrt(1/2) = 0.707 for theta uniform on the circle
    assert tm.sliced_w2(a, b) < 0.1 < tm.sliced_w2(a, b + [0.5, 0.0])
    h = tm.median_bandwidth(a)
    assert abs(tm.mmd2_unbiased(a, b, bandwidth=h)) < 2e-3
    assert tm.mmd2_unbiased(a, b + [0.5, 0.0], bandwidth=h) > 2e-2
    with pytest.raises(ValueError, match="equal-size"):
        tm.sliced_w2(a, b[:10])


def test_the_toy_methods_are_rows_of_the_method_table():
    # Every entry trains a row of experiment/methods/; the target copy theta- is kept exactly
    # where mu > 0 (CD, CT), and the row's fields land in the results' JSON.
    rows = {m.name: m.row(400) for m in (qt.EDM, *qt.METHODS)}
    assert all(isinstance(r, methods.Method) for r in rows.values())
    cd = {f"CD-{s} N={n}" for s in ("Euler", "Heun") for n in (9, 18, 40)}
    kept = {name for name, r in rows.items() if r.keeps_target}
    assert kept == cd | {"CT N=18", "CT adaptive 2->40"}
    assert rows["ECT q=2 (from EDM)"].stage_steps == 50  # 8 equal stages of the run
    assert rows["CT adaptive 2->40"].curriculum.total_steps == 400
    assert rows["iCT 10->1280"].index_sampler() is not None
    for m in (qt.EDM, *qt.METHODS):
        config = json.loads(json.dumps(m.config(400)))
        assert config["loss"] == rows[m.name].name and config["distance"] == m.distance


def test_model_fns_give_cd_the_exact_teacher():
    # teacher_params None: the denoiser is D*; with params, the MLP under the EDM scalings.
    mix, net = tm.make_mixture(2), qt.MLP(width=32, depth=2)
    fns, params = qt.model_fns(net, mix), qt.init_params(net, 2)
    sigma = jnp.geomspace(0.01, 80.0, 16)
    z = jax.random.normal(jax.random.key(9), (16, 2))
    x = tm.sample_mixture(mix, jax.random.key(8), 16) + sigma[:, None] * z
    exact = tm.denoiser(mix, x, sigma)
    np.testing.assert_array_equal(fns.denoiser(None, x, sigma, None, None), exact)
    np.testing.assert_array_equal(
        fns.denoiser(params, x, sigma, None, None), qt.denoiser_model(net)(params, x, sigma)
    )
    np.testing.assert_array_equal(
        fns.consistency(params, x, sigma, None, None), qt.consistency_model(net)(params, x, sigma)
    )


def test_a_short_cd_run_lowers_the_consistency_error(monkeypatch):
    # Through the production train step: qt.train builds it with the CD row.
    built = []
    make = update.make_train_step
    monkeypatch.setattr(
        update,
        "make_train_step",
        lambda spec, method, *a: built.append(method) or make(spec, method, *a),
    )
    mix, net = tm.make_mixture(2), qt.MLP(width=32, depth=2)
    settings = dataclasses.replace(qt.QUICK, steps=100, chunk=100, batch=64, lr=3e-3)
    method = next(m for m in qt.METHODS if m.name == "CD-Heun N=18")
    x0 = tm.sample_mixture(mix, jax.random.key(4), 64)
    sigma = jnp.full((64,), 5.0)
    x = x0 + sigma[:, None] * jax.random.normal(jax.random.key(5), x0.shape)
    exact = tm.exact_flow(mix, x, sigma)
    init = qt.init_params(net, 2)
    params, loss = qt.train(method, mix, net, settings)
    fn = jax.jit(qt.consistency_model(net))
    before = np.linalg.norm(np.asarray(fn(init, x, sigma)) - exact, axis=1).mean()
    after = np.linalg.norm(np.asarray(fn(params, x, sigma)) - exact, axis=1).mean()
    assert np.isfinite(loss) and after < 0.7 * before, (before, after)
    assert [type(m) for m in built] == [methods.CD] and built[0].solver == "heun"


def test_ect_from_a_diffusion_init_lowers_the_consistency_error():
    # ECT tunes the EDM-trained MLP into a consistency model: E|f - f*| at sigma = 5 must fall
    # well below the diffusion init's (the toy benchmark runs this at full scale). 800 steps:
    # after/before is 0.37-0.64 over seeds 0-4 (seed 0: 0.54); at 400 steps it spread 0.59-0.79.
    mix, net = tm.make_mixture(2), qt.MLP(width=64, depth=3)
    settings = dataclasses.replace(qt.QUICK, steps=800, chunk=800, batch=128, lr=3e-3)
    x0 = tm.sample_mixture(mix, jax.random.key(6), 128)
    sigma = jnp.full((128,), 5.0)
    x = x0 + sigma[:, None] * jax.random.normal(jax.random.key(7), x0.shape)
    exact = tm.exact_flow(mix, x, sigma)
    fn = jax.jit(qt.consistency_model(net))
    init, _ = qt.train(qt.EDM, mix, net, settings)
    method = next(m for m in qt.METHODS if m.name == "ECT q=2 (from EDM)")
    params, loss = qt.train(method, mix, net, settings, init=init)
    before = np.linalg.norm(np.asarray(fn(init, x, sigma)) - exact, axis=1).mean()
    after = np.linalg.norm(np.asarray(fn(params, x, sigma)) - exact, axis=1).mean()
    assert np.isfinite(loss) and after < 0.7 * before, (before, after)
