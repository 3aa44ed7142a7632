"""Schedules against the official code's recorded grids and curricula (cm and jcm fixtures)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata

from consistency.core import schedules


@pytest.mark.parametrize("case", refdata.cases("cm_formulas"))
def test_karras_grid_matches_cm(case):
    data = refdata.load_json(case["files"][".json"])
    args = data["get_sigmas_karras"]["args"]
    for n, entry in data["get_sigmas_karras"]["by_n"].items():
        ours = schedules.karras_sigmas(int(n), append_zero=True, **args)
        np.testing.assert_allclose(
            ours, entry["float32"], rtol=refdata.FORMULA_RTOL, atol=0, err_msg=f"N={n}"
        )


@pytest.mark.parametrize("case", refdata.cases("cm_formulas"))
def test_loss_grid_matches_cm(case):
    data = refdata.load_json(case["files"][".json"])
    args = data["get_sigmas_karras"]["args"]
    grid_fn = jax.jit(schedules.karras_sigma, static_argnames=("sigma_min", "sigma_max", "rho"))
    for n, entry in data["consistency_losses_grid"].items():
        idx = jnp.asarray(entry["indices"])
        np.testing.assert_allclose(
            grid_fn(idx, int(n), **args), entry["t"], rtol=refdata.FORMULA_RTOL
        )
        np.testing.assert_allclose(
            grid_fn(idx + 1, int(n), **args), entry["t2"], rtol=refdata.FORMULA_RTOL
        )


@pytest.mark.parametrize("case", refdata.cases("cm_formulas"))
def test_ema_and_scales_match_cm(case):
    data = refdata.load_json(case["files"][".json"])
    steps = data["ema_and_scales"]["steps"]
    for name, setting in data["ema_and_scales"]["settings"].items():
        args = dict(setting["args"])

        @jax.jit
        def fn(step, args=args):
            return schedules.ema_and_scales(step, **args)

        for k, step in enumerate(steps):
            mu, n = fn(jnp.int32(step))
            assert int(n) == setting["scales"][k], (name, step)
            np.testing.assert_allclose(float(mu), setting["target_ema"][k], rtol=1e-6)


@pytest.mark.parametrize("case", refdata.cases("jcm_formulas"))
def test_ct_adaptive_matches_jcm(case):
    data = refdata.load_json(case["files"][".json"])
    cfg = data["ct_adaptive"]
    fn = jax.jit(
        lambda step: schedules.ema_and_scales(
            step,
            target_ema_mode="adaptive",
            scale_mode="progressive",
            start_ema=cfg["start_ema"],
            start_scales=cfg["start_scales"],
            end_scales=cfg["end_scales"],
            total_steps=cfg["n_iters"],
        )
    )
    ref = cfg["jit_int32_step"]
    for k, step in enumerate(data["steps"]):
        mu, n = fn(jnp.int32(step))
        assert int(n) == ref["num_scales"][k]
        np.testing.assert_allclose(float(mu), ref["target_ema"][k], rtol=1e-6)
    fixed = data["ct_ema_fixed"]
    for k, step in enumerate(data["steps"]):
        mu, n = schedules.ema_and_scales(
            step,
            target_ema_mode="fixed",
            scale_mode="fixed",
            start_ema=fixed["target_ema"][k],
            start_scales=fixed["num_scales"][k],
            end_scales=fixed["num_scales"][k],
            total_steps=1,
        )
        assert int(n) == fixed["num_scales"][k]
        np.testing.assert_allclose(float(mu), fixed["target_ema"][k], rtol=1e-7)


@pytest.mark.parametrize("case", refdata.cases("jcm_formulas"))
def test_loss_grid_matches_jcm(case):
    data = refdata.load_json(case["files"][".json"])
    sde = data["sde"]
    grid = dict(sigma_min=sde["t_min"], sigma_max=sde["t_max"], rho=sde["rho"])
    fn = jax.jit(lambda i, n: schedules.karras_sigma(i, n, **grid))
    for n, entry in data["loss_sigma_grid"].items():
        idx = jnp.arange(int(n) - 1)
        # N traced as the adaptive schedule passes it: one compilation for every N.
        np.testing.assert_allclose(
            fn(idx, jnp.int32(n)), entry["t_float32_jit"], rtol=refdata.FORMULA_RTOL
        )
        np.testing.assert_allclose(
            fn(idx + 1, jnp.int32(n)), entry["t2_float32_jit"], rtol=refdata.FORMULA_RTOL
        )
        np.testing.assert_allclose(
            schedules.karras_sigmas_float64(np.arange(int(n)), int(n), **grid),
            entry["grid_float64_reference"],
            rtol=1e-12,
        )
    heun = data["heun_sampler"]
    ours = schedules.karras_sigmas(heun["N"], append_zero=True, **grid)
    np.testing.assert_allclose(ours, heun["timesteps_float32"], rtol=refdata.FORMULA_RTOL)


def test_schedule_compiles_once_across_steps():
    traces = []

    @jax.jit
    def fn(step):
        traces.append(1)
        return schedules.ema_and_scales(
            step,
            target_ema_mode="adaptive",
            scale_mode="progressive",
            start_ema=0.9,
            start_scales=2,
            end_scales=150,
            total_steps=800_000,
        )

    ns = [int(fn(jnp.int32(s))[1]) for s in (0, 1, 10_000, 799_999)]
    assert ns == [2, 3, 17, 151] and len(traces) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_ema_mode="ema"), "target_ema_mode: unknown"),
        (dict(scale_mode="linear"), "scale_mode: unknown"),
        (dict(target_ema_mode="adaptive", scale_mode="fixed"), "needs scale_mode='progressive'"),
        (dict(start_scales=1, end_scales=1), "must be >= 2"),
        (dict(start_scales=10, end_scales=5), "end_scales"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs, match):
    args = dict(
        target_ema_mode="fixed",
        scale_mode="progressive",
        start_ema=0.95,
        start_scales=2,
        end_scales=150,
        total_steps=100,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        schedules.ema_and_scales(0, **args)


def test_karras_grid_rejects_small_n():
    with pytest.raises(ValueError, match="num_scales must be >= 2"):
        schedules.karras_sigmas(1)


def test_train_indices_cover_0_to_n_minus_2():
    idx = schedules.sample_train_indices(jax.random.key(0), 4096, jnp.int32(5))
    assert set(np.unique(np.asarray(idx)).tolist()) == {0, 1, 2, 3}


def test_lognormal_sigma_moments():
    s = schedules.sample_lognormal_sigma(jax.random.key(1), 200_000, p_mean=-1.2, p_std=1.2)
    logs = np.log(np.asarray(s))
    assert abs(logs.mean() + 1.2) < 0.01 and abs(logs.std() - 1.2) < 0.01


def test_ict_exponential_curriculum_doubles_every_k_prime():
    fn = jax.jit(
        lambda step: schedules.ema_and_scales(
            step,
            target_ema_mode="fixed",
            scale_mode="exponential",
            start_ema=0.0,
            start_scales=10,
            end_scales=1280,
            total_steps=400_000,
        )
    )
    # K' = floor(400k / (log2 floor(1280/10) + 1)) = 50k steps per stage.
    ns = [int(fn(jnp.int32(k))[1]) for k in range(0, 450_000, 50_000)]
    assert ns == [11, 21, 41, 81, 161, 321, 641, 1281, 1281]
    assert int(fn(jnp.int32(49_999))[1]) == 11 and float(fn(jnp.int32(7))[0]) == 0.0
    assert schedules.max_num_scales("exponential", start_scales=10, end_scales=1280) == 1281


def test_lognormal_index_probabilities():
    grid = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    probs = jax.jit(lambda n: schedules.lognormal_index_probs(n, max_scales=1281, **grid))
    for n in (2, 11, 1281):  # N traced: one compilation
        p = np.asarray(probs(jnp.int32(n)))
        assert p.shape == (1280,) and np.all(p[: n - 1] > 0) and np.all(p[n - 1 :] == 0)
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
    # By hand for N = 3: pairs (80, s1) and (s1, 0.002), s1 = ((80^(1/7) + 0.002^(1/7))/2)^7.
    s1 = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    cdf = lambda s: math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0))
    mass = np.array([cdf(80) - cdf(s1), cdf(s1) - cdf(0.002)])
    p = schedules.lognormal_index_probs(3, max_scales=3, p_mean=-1.1, p_std=2.0, **grid)
    np.testing.assert_allclose(p, mass / mass.sum(), rtol=1e-5)
    idx = schedules.sample_lognormal_indices(
        jax.random.key(0), 20_000, jnp.int32(11), max_scales=21, **grid
    )
    freq = np.bincount(np.asarray(idx), minlength=10) / 20_000
    expect = np.asarray(schedules.lognormal_index_probs(11, max_scales=11, **grid))
    np.testing.assert_allclose(freq, expect, atol=0.01)


def test_ect_r_by_hand():
    t = jnp.array([1.0, 10.0])
    n = 1 + 8 / (1 + np.exp(np.array([1.0, 10.0])))  # n(t) = 1 + 8 sigmoid(-t)
    kw = dict(q=2.0, k=8.0, b=1.0, stage_steps=100)
    np.testing.assert_allclose(schedules.ect_r(t, 0, **kw), np.maximum([1, 10] * (1 - n / 2), 0))
    # Stage 3 (steps 300-399): dt = t n(t) / 2^4.
    r = schedules.ect_r(t, jnp.int32(399), **kw)
    np.testing.assert_allclose(r, [1, 10] * (1 - n / 16), rtol=1e-6)
    assert float(schedules.ect_r(t, 0, **kw)[0]) == 0.0  # n(1)/2 > 1: target x0


def test_tangent_warmup_and_rho_uniform_sigma():
    np.testing.assert_allclose(
        [float(schedules.tangent_warmup(k, 100)) for k in (0, 50, 100, 500)], [0, 0.5, 1, 1]
    )
    assert float(schedules.tangent_warmup(0, 0)) == 1.0
    s = np.asarray(schedules.sample_rho_uniform_sigma(jax.random.key(2), 50_000))
    u = (s ** (1 / 7) - 80 ** (1 / 7)) / (0.002 ** (1 / 7) - 80 ** (1 / 7))
    assert s.min() >= 0.002 and s.max() <= 80.0 and abs(u.mean() - 0.5) < 0.01
