"""PF-ODE steps and teacher samplers: the official Heun/Euler samplers and a closed-form ODE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata

from consistency.core import ode, schedules


@pytest.mark.parametrize("case", refdata.cases("cm_samplers"))
def test_teacher_samplers_match_cm(case):
    meta = refdata.load_json(case["files"][".json"])
    arrays = np.load(case["files"][".npz"])
    samplers = {"heun": ode.heun_sampler, "euler": ode.euler_sampler}
    ran = 0
    for name, c in meta["cases"].items():
        if c["sampler"] not in samplers:
            continue
        ran += 1
        denoise = refdata.closed_form_denoiser(meta["F_params"], distillation=c["distillation"])
        sigmas = schedules.karras_sigmas(c["steps"], append_zero=True)
        np.testing.assert_allclose(sigmas, arrays[f"{name}/sigmas"], rtol=refdata.FORMULA_RTOL)
        x_T = refdata.nhwc(arrays[f"{name}/x_T"])
        for clip, suffix in [(True, ""), (False, "_noclip")]:
            raw = samplers[c["sampler"]](denoise, x_T, sigmas, clip_denoised=clip)
            ref = refdata.nhwc(arrays[f"{name}/sample{suffix}_raw"])
            refdata.assert_close_scaled(raw, ref, refdata.SAMPLER_RTOL, f"{name}{suffix}_raw")
            ref = refdata.nhwc(arrays[f"{name}/sample{suffix}"])
            refdata.assert_close_scaled(jnp.clip(raw, -1, 1), ref, refdata.SAMPLER_RTOL, name)
    assert ran > 0


def _gaussian_denoiser(s_data):
    # Data ~ N(0, s^2 I): the exact denoiser is D(x, sigma) = s^2/(s^2 + sigma^2) x.
    return lambda x, sigma: (s_data**2 / (s_data**2 + sigma**2))[:, None] * x


def _exact_flow(x, sigma, sigma_next, s_data):
    # PF-ODE solution for Gaussian data: x scales with sqrt(s^2 + sigma^2).
    return x * np.sqrt((s_data**2 + sigma_next**2) / (s_data**2 + sigma**2))


def test_heun_is_second_order_and_beats_euler():
    s_data, sigma = 0.5, 2.0
    x = jax.random.normal(jax.random.key(0), (4, 3))
    denoise = _gaussian_denoiser(s_data)
    errs = {"heun": [], "euler": []}
    for h in (0.4, 0.2, 0.1):
        exact = _exact_flow(np.asarray(x), sigma, sigma - h, s_data)
        for name in errs:
            step = ode.get_solver(name)
            errs[name].append(np.abs(step(denoise, x, sigma, sigma - h) - exact).max())
    heun_rate = np.log2(errs["heun"][1] / errs["heun"][2])
    euler_rate = np.log2(errs["euler"][1] / errs["euler"][2])
    assert 2.6 < heun_rate < 3.4  # local error O(h^3)
    assert 1.6 < euler_rate < 2.4  # local error O(h^2)
    assert all(h < e / 3 for h, e in zip(errs["heun"], errs["euler"], strict=True))


def test_teacher_samplers_converge_to_exact_ode_solution():
    s_data = 0.5
    x_T = 80.0 * jax.random.normal(jax.random.key(1), (8, 2))
    exact = _exact_flow(np.asarray(x_T), 80.0, 0.0, s_data)
    errs = {}
    for name, sampler in [("heun", ode.heun_sampler), ("euler", ode.euler_sampler)]:
        for n in (40, 80):
            sigmas = schedules.karras_sigmas(n, append_zero=True)
            out = sampler(_gaussian_denoiser(s_data), x_T, sigmas, clip_denoised=False)
            errs[name, n] = np.abs(out - exact).max() / np.abs(exact).max()
    assert errs["heun", 80] < 0.02 and errs["heun", 40] / errs["heun", 80] > 3.2  # 2nd order
    assert 1.6 < errs["euler", 40] / errs["euler", 80] < 2.4  # 1st order
    assert errs["heun", 40] < errs["euler", 40] / 5


def test_heun_sampler_uses_2n_minus_1_evaluations():
    calls = []

    def denoise(x, sigma):
        calls.append(1)
        return x * 0.5

    # Under jit the scan body traces once; count evaluations eagerly via a Python loop instead.
    sigmas = schedules.karras_sigmas(6, append_zero=True)
    with jax.disable_jit():
        ode.heun_sampler(denoise, jnp.ones((1, 2)), sigmas)
    assert len(calls) == 2 * 6 - 1


def test_unknown_solver_lists_choices():
    with pytest.raises(ValueError, match="choose one of.*heun"):
        ode.get_solver("rk4")
