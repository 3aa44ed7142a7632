"""LCM's scheduler (betas, boundary scalings, timesteps, step, multistep sampler) vs diffusers."""

import jax.numpy as jnp
import numpy as np
import pytest
import refdata

from consistency.core import parameterization as P
from consistency.core import vp

CASES = refdata.cases("lcm_scheduler")


def _load(case):
    return refdata.load_json(case["files"][".json"]), np.load(case["files"][".npz"])


def _alphas_cumprod(kw):
    betas = vp.ddpm_betas(
        schedule=kw["beta_schedule"],
        num_train_timesteps=kw["num_train_timesteps"],
        beta_start=kw["beta_start"],
        beta_end=kw["beta_end"],
    )
    return betas, vp.alphas_cumprod(betas)


@pytest.mark.parametrize("case", CASES)
def test_betas_and_alphas_cumprod(case):
    meta, ref = _load(case)
    betas, ac = _alphas_cumprod(meta["scheduler_kwargs"])
    np.testing.assert_allclose(betas, ref["betas"], rtol=refdata.FORMULA_RTOL, atol=0)
    np.testing.assert_allclose(ac, ref["alphas_cumprod"], rtol=refdata.FORMULA_RTOL, atol=0)
    # torch's float32 cumprod accumulates in float64; a float32 running product drifts ~1e-6.
    np.testing.assert_allclose(ac, ref["alphas_cumprod"], rtol=4e-7, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_boundary_scalings(case):
    meta, ref = _load(case)
    scaling = meta["scheduler_kwargs"]["timestep_scaling"]
    c_skip, c_out = P.lcm_scalings(ref["scalings/timesteps"], timestep_scaling=scaling)
    np.testing.assert_allclose(c_skip, ref["scalings/c_skip"], rtol=refdata.FORMULA_RTOL, atol=0)
    np.testing.assert_allclose(c_out, ref["scalings/c_out"], rtol=refdata.FORMULA_RTOL, atol=0)
    at_zero = P.lcm_scalings(jnp.zeros((1,), jnp.int32), timestep_scaling=scaling)
    assert float(at_zero[0][0]) == 1.0 and float(at_zero[1][0]) == 0.0


def _timesteps(meta, c):
    kw = meta["scheduler_kwargs"]
    return vp.lcm_timesteps(
        num_train_timesteps=kw["num_train_timesteps"],
        original_inference_steps=kw["original_inference_steps"],
        **c["set_timesteps_kwargs"],
    )


@pytest.mark.parametrize("case", CASES)
def test_timesteps_and_alphas_per_step(case):
    meta, ref = _load(case)
    _, ac = _alphas_cumprod(meta["scheduler_kwargs"])
    for name, c in meta["cases"].items():
        ts = _timesteps(meta, c)
        assert list(ts) == c["timesteps"] == list(ref[f"{name}/timesteps"]), name
        np.testing.assert_allclose(ac[ts], c["alphas_cumprod_t"], rtol=refdata.FORMULA_RTOL)
        assert ref[f"{name}/noise"].shape[0] == c["num_noise_draws"] == len(ts) - 1


@pytest.mark.parametrize("case", CASES)
def test_each_step_from_recorded_inputs(case):
    """LCMScheduler.step on the recorded sample, model output and noise: 1e-5 of scale."""
    meta, ref = _load(case)
    kw = meta["scheduler_kwargs"]
    _, ac = _alphas_cumprod(kw)
    net = refdata.closed_form_vp_net(meta["F_params"])
    for name, c in meta["cases"].items():
        ts, noise = c["timesteps"], ref[f"{name}/noise"]
        for i, t in enumerate(ts):
            x, mo = ref[f"{name}/sample_in"][i], ref[f"{name}/model_output"][i]
            t_b = jnp.full(x.shape[:1], t, jnp.int32)
            refdata.assert_close_scaled(net(jnp.asarray(x), t_b), mo, refdata.FORMULA_RTOL, name)
            prev, denoised = vp.lcm_step(
                jnp.asarray(mo),
                jnp.asarray(x),
                t=t_b,
                alpha_bar=ac[t],
                alpha_bar_next=c["alphas_cumprod_prev"][i],
                noise=noise[i] if i < len(noise) else None,
                prediction=c["prediction_type"],
                timestep_scaling=kw["timestep_scaling"],
            )
            tol = refdata.FORMULA_RTOL
            refdata.assert_close_scaled(denoised, ref[f"{name}/denoised"][i], tol, name)
            refdata.assert_close_scaled(prev, ref[f"{name}/prev_sample"][i], tol, name)


@pytest.mark.parametrize("case", CASES)
def test_multistep_sampler_with_the_closed_form_model(case):
    """The whole LCM loop from the latents and recorded noise: 1e-4 of scale."""
    meta, ref = _load(case)
    kw = meta["scheduler_kwargs"]
    _, ac = _alphas_cumprod(kw)
    net = refdata.closed_form_vp_net(meta["F_params"])
    for name, c in meta["cases"].items():
        final, denoised = vp.lcm_sample(
            net,
            jnp.asarray(ref["latents"]),
            timesteps=_timesteps(meta, c),
            alphas_cumprod=ac,
            noise=jnp.asarray(ref[f"{name}/noise"]),
            prediction=c["prediction_type"],
            timestep_scaling=kw["timestep_scaling"],
        )
        assert denoised.shape[0] == c["num_model_calls"]
        refdata.assert_close_scaled(final, ref[f"{name}/final_denoised"], refdata.SAMPLER_RTOL)
        refdata.assert_close_scaled(denoised, ref[f"{name}/denoised"], refdata.SAMPLER_RTOL)


def test_timesteps_strength_and_errors():
    full = vp.lcm_timesteps(num_inference_steps=4)
    assert list(full) == [999, 759, 499, 259]
    # strength shortens the distillation grid (img2img): 25 of 50 steps, k = 20.
    assert list(vp.lcm_timesteps(num_inference_steps=2, strength=0.5)) == [499, 259]
    # custom timesteps keep the last int(n * strength) of them.
    assert list(vp.lcm_timesteps(timesteps=[999, 639, 259], strength=0.7)) == [639, 259]
    with pytest.raises(ValueError, match="exactly one"):
        vp.lcm_timesteps(num_inference_steps=2, timesteps=[999, 499])
    with pytest.raises(ValueError, match="descend"):
        vp.lcm_timesteps(timesteps=[499, 999])
    with pytest.raises(ValueError, match="num_inference_steps"):
        vp.lcm_timesteps(num_inference_steps=51)
