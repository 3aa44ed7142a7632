"""VP teacher solvers (DDIM, LCM's DDIMSolver, DPM-Solver++), guidance and the w embedding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata

from consistency.core import dpm_solver as dpm
from consistency.core import guidance as G
from consistency.core import vp
from consistency.models.guidance import guidance_frequencies, guidance_scale_embedding

CASES = refdata.cases("vp_solvers")
FORMULA, SAMPLER = refdata.FORMULA_RTOL, refdata.SAMPLER_RTOL


def _load(case):
    meta, ref = refdata.load_json(case["files"][".json"]), np.load(case["files"][".npz"])
    b = meta["betas"]
    betas = vp.ddpm_betas(
        schedule=b["beta_schedule"],
        num_train_timesteps=b["num_train_timesteps"],
        beta_start=b["beta_start"],
        beta_end=b["beta_end"],
    )
    return meta, ref, vp.alphas_cumprod(betas)


def _cases(meta, solver):
    return [(n, c) for n, c in meta["cases"].items() if n.split("/")[0] == solver]


def _x0_eps(model_output, x, alpha_bar, prediction):
    alpha, sigma = vp.alpha_sigma(alpha_bar)
    kw = dict(alpha=alpha, sigma=sigma, prediction=prediction)
    return vp.predicted_x0(model_output, x, **kw), vp.predicted_eps(model_output, x, **kw)


@pytest.mark.parametrize("case", CASES)
def test_alphas_cumprod(case):
    _, ref, ac = _load(case)
    np.testing.assert_allclose(ac, ref["alphas_cumprod"], rtol=FORMULA, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_ddim_step(case):
    """DDIMScheduler.step (eta 0) t -> t - k; t - k < 0 uses abar_0 (set_alpha_to_one=False)."""
    meta, ref, ac = _load(case)
    net = refdata.closed_form_vp_net(meta["F_params"], s=meta["s_cond"])
    for name, c in _cases(meta, "ddim"):
        x, mo = ref[f"{name}/sample"], ref[f"{name}/model_output"]
        refdata.assert_close_scaled(net(jnp.asarray(x), c["t"]), mo, FORMULA, name)
        prev_t = c["t"] - meta["skip_k"]
        assert prev_t == c["prev_t"]
        abar_prev = vp.alpha_bar_at(ac, prev_t, final_alpha_cumprod=ac[0])
        np.testing.assert_allclose(abar_prev, c["alpha_prod_t_prev"], rtol=FORMULA)
        x0, eps = _x0_eps(mo, x, ac[c["t"]], c["prediction_type"])
        refdata.assert_close_scaled(x0, ref[f"{name}/pred_original_sample"], FORMULA, name)
        prev = vp.ddim_step(x0, eps, alpha_bar_prev=abar_prev)
        refdata.assert_close_scaled(prev, ref[f"{name}/prev_sample"], FORMULA, name)


@pytest.mark.parametrize("case", CASES)
def test_lcm_ddim_solver(case):
    """train_lcm_distill_sd_wds.py's skip-step grid, get_predicted_* and DDIMSolver.ddim_step."""
    meta, ref, ac = _load(case)
    n_train, k = meta["betas"]["num_train_timesteps"], meta["skip_k"]
    grid = vp.lcm_ddim_timesteps(num_train_timesteps=n_train, ddim_steps=n_train // k)
    np.testing.assert_array_equal(grid, ref["lcm_solver/ddim_timesteps"])
    abar_prev = vp.lcm_ddim_alpha_bars_prev(ac, grid)
    np.testing.assert_allclose(abar_prev, ref["lcm_solver/ddim_alpha_cumprods_prev"], rtol=FORMULA)
    for name, c in _cases(meta, "lcm_ddim_solver"):
        i, start = c["timestep_index"], c["start_timestep"]
        assert grid[i] == start
        assert int(vp.lcm_skip_end(start, skip=k)) == c["end_timestep (max(t-k,0))"]
        inputs = name.replace("lcm_ddim_solver/", "ddim/")
        x, mo = ref[f"{inputs}/sample"], ref[f"{inputs}/model_output"]
        x0, eps = _x0_eps(mo, x, ac[start], c["prediction_type"])
        refdata.assert_close_scaled(x0, ref[f"{name}/pred_x0"], FORMULA, name)
        refdata.assert_close_scaled(eps, ref[f"{name}/pred_noise"], FORMULA, name)
        x_prev = vp.ddim_step(x0, eps, alpha_bar_prev=abar_prev[i])
        refdata.assert_close_scaled(x_prev, ref[f"{name}/x_prev"], FORMULA, name)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("solver", ["dpmpp1", "dpmpp2"])
def test_dpm_solver_pp_each_step(case, solver):
    """Every step of the recorded multistep traces, from the recorded inputs: 1e-5 of scale."""
    meta, ref, ac = _load(case)
    for name, c in _cases(meta, solver):
        ts = c["set_timesteps"]["timesteps"]
        sigmas = [dpm.vp_sigma(ac[t]) for t in ts] + [0.0]
        np.testing.assert_allclose(sigmas, ref[f"{name}/sigmas"], rtol=FORMULA)
        orders = dpm.multistep_orders(len(ts), order=int(solver[-1]))
        assert orders == c["order_used_per_step"], name
        x0_prev = None
        for i, order in enumerate(orders):
            x, mo = ref[f"{name}/sample_in"][i], ref[f"{name}/model_output"][i]
            alpha, sig = dpm.alpha_sigma_of(sigmas[i])
            x0 = vp.predicted_x0(mo, x, alpha=alpha, sigma=sig, prediction=c["prediction_type"])
            span = dict(sigma_s=sigmas[i], sigma_t=sigmas[i + 1])
            if order == 1:
                x_next = dpm.dpmpp_first_order(x, x0, **span)
            else:
                x_next = dpm.dpmpp_second_order(x, x0, x0_prev, sigma_prev=sigmas[i - 1], **span)
            refdata.assert_close_scaled(x_next, ref[f"{name}/prev_sample"][i], FORMULA, name)
            x0_prev = x0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("solver", ["dpmpp1", "dpmpp2"])
def test_dpm_solver_pp_sampler(case, solver):
    """The whole trace with the closed-form model from the first sample: 1e-4 of scale."""
    meta, ref, ac = _load(case)
    net = refdata.closed_form_vp_net(meta["F_params"], s=meta["s_cond"])
    for name, c in _cases(meta, solver):
        final, trace = dpm.dpm_solver_multistep(
            net,
            jnp.asarray(ref[f"{name}/sample_in"][0]),
            timesteps=c["set_timesteps"]["timesteps"],
            alphas_cumprod=ac,
            prediction=c["prediction_type"],
            order=int(solver[-1]),
        )
        refdata.assert_close_scaled(trace, ref[f"{name}/prev_sample"], SAMPLER, name)
        teacher = trace[c["teacher_step_index"]]
        refdata.assert_close_scaled(
            teacher, ref[f"{name}/prev_sample"][c["teacher_step_index"]], SAMPLER, name
        )


@pytest.mark.parametrize("case", CASES)
def test_classifier_free_guidance(case):
    """Both conventions on eps, and LCM's guided teacher step (guidance on x0 and eps)."""
    meta, ref, ac = _load(case)
    t, x, w = meta["cfg_t"], jnp.asarray(ref["cfg/sample"]), ref["cfg/w"]
    np.testing.assert_array_equal(w, meta["w_list"])
    n_train, k = meta["betas"]["num_train_timesteps"], meta["skip_k"]
    grid = vp.lcm_ddim_timesteps(num_train_timesteps=n_train, ddim_steps=n_train // k)
    i = meta["cfg_timestep_index"]
    assert grid[i] == t
    abar_prev = vp.lcm_ddim_alpha_bars_prev(ac, grid)[i]
    for pred in ("epsilon", "v_prediction"):
        p = f"cfg/{pred}/"
        preds = {}
        for branch in ("cond", "uncond"):
            out = refdata.closed_form_vp_net(meta["F_params"], s=meta[f"s_{branch}"])(x, t)
            refdata.assert_close_scaled(out, ref[f"{p}out_{branch}"], FORMULA, p + branch)
            preds[branch] = _x0_eps(ref[f"{p}out_{branch}"], x, ac[t], pred)
            refdata.assert_close_scaled(preds[branch][0], ref[f"{p}{branch}_pred_x0"], FORMULA)
            refdata.assert_close_scaled(preds[branch][1], ref[f"{p}{branch}_pred_noise"], FORMULA)
        (x0_c, eps_c), (x0_u, eps_u) = preds["cond"], preds["uncond"]
        for j, wj in enumerate(w):
            standard = G.guided_standard(eps_c, eps_u, scale=wj)
            refdata.assert_close_scaled(standard, ref[f"{p}eps_standard_form"][j], FORMULA)
            lcm_eps = G.guided_lcm(eps_c, eps_u, w=wj)
            refdata.assert_close_scaled(lcm_eps, ref[f"{p}eps_lcm_form"][j], FORMULA)
            x_prev = vp.ddim_step(G.guided_lcm(x0_c, x0_u, w=wj), lcm_eps, alpha_bar_prev=abar_prev)
            refdata.assert_close_scaled(x_prev, ref[f"{p}guided_x_prev"][j], FORMULA, f"{p}{wj}")


@pytest.mark.parametrize("case", CASES)
def test_guidance_scale_embedding(case):
    """Frequencies to 1e-6; the features to 2e-3 (a 1-ulp exp difference at 15,000 rad)."""
    meta, ref, _ = _load(case)
    w, dim = ref["w_embedding/w"], meta["embed_dim"]
    np.testing.assert_array_equal(w, meta["embed_w"])
    np.testing.assert_allclose(guidance_frequencies(dim), ref["w_embedding/freqs"], rtol=1e-6)
    emb = guidance_scale_embedding(jnp.asarray(w), dim)
    np.testing.assert_allclose(emb, ref["w_embedding/emb"], rtol=0, atol=2e-3)
    np.testing.assert_allclose(emb, ref["w_embedding/emb_f64"], rtol=0, atol=2e-3)
    # the small-argument end of the features is tight: sin then cos (no flip).
    half = dim // 2
    np.testing.assert_allclose(
        emb[:, half - 8 : half], ref["w_embedding/emb"][:, half - 8 : half], atol=1e-5
    )
    np.testing.assert_allclose(emb[:, -8:], ref["w_embedding/emb"][:, -8:], atol=1e-5)
    assert guidance_scale_embedding(jnp.asarray(w), dim + 1)[:, -1].tolist() == [0.0] * len(w)


def test_first_order_solvers_are_ddim():
    """DPM-Solver-1 in either form is DDIM between any two timesteps of the schedule."""
    ac = vp.alphas_cumprod(vp.ddpm_betas(schedule="linear"))
    x0, eps = jax.random.normal(jax.random.key(1), (2, 2, 4, 4, 3))
    for s, t in [(979, 959), (500, 300), (40, 0)]:
        x = vp.q_sample(x0, eps, alpha_bar=ac[s])
        ddim = vp.ddim_step(x0, eps, alpha_bar_prev=ac[t])
        span = dict(sigma_s=dpm.vp_sigma(ac[s]), sigma_t=dpm.vp_sigma(ac[t]))
        refdata.assert_close_scaled(dpm.dpmpp_first_order(x, x0, **span), ddim, 1e-5)
        refdata.assert_close_scaled(dpm.dpm_first_order(x, eps, **span), ddim, 1e-5)
        # with a constant prediction the second-order corrections vanish.
        prev = dict(sigma_prev=dpm.vp_sigma(ac[s + 20]), **span)
        refdata.assert_close_scaled(dpm.dpmpp_second_order(x, x0, x0, **prev), ddim, 1e-5)
        refdata.assert_close_scaled(dpm.dpm_second_order(x, eps, eps, **prev), ddim, 1e-5)


def test_beta_schedules():
    linear = vp.ddpm_betas(schedule="linear", beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(linear, np.linspace(1e-4, 0.02, 1000), rtol=1e-6)
    scaled = vp.ddpm_betas(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    np.testing.assert_allclose(scaled, np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, rtol=1e-6)
    cosine = vp.alphas_cumprod(vp.ddpm_betas(schedule="squaredcos_cap_v2", num_train_timesteps=100))
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(cosine[:90], f(np.arange(1, 91) / 100) / f(0), rtol=1e-5)
    assert vp.ddpm_betas(schedule="cosine").max() == np.float32(0.999)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        vp.ddpm_betas(schedule="quadratic")
    with pytest.raises(ValueError, match="unknown prediction"):
        vp.predicted_x0(x0_ := jnp.zeros((1, 2)), x0_, alpha=1.0, sigma=0.0, prediction="x0")
