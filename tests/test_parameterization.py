"""Scalings, noise conditioning and weightings against the official code (cm and jcm fixtures)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata

from consistency.core import parameterization as P

RTOL = refdata.FORMULA_RTOL


@pytest.mark.parametrize("case", refdata.cases("cm_formulas"))
def test_scalings_noise_and_weightings_match_cm(case):
    data = refdata.load_json(case["files"][".json"])["scalings"]
    sigma = jnp.asarray(data["sigmas"], jnp.float32)
    ref = data["float32"]
    for name, fn in [
        ("get_scalings", P.edm_scalings),
        ("get_scalings_for_boundary_condition", P.boundary_scalings),
    ]:
        for ours, key in zip(fn(sigma), ("c_skip", "c_out", "c_in"), strict=True):
            np.testing.assert_allclose(ours, ref[name][key], rtol=RTOL, atol=0, err_msg=name + key)
    np.testing.assert_allclose(P.c_noise_adm(sigma), ref["c_noise"], rtol=RTOL)
    np.testing.assert_allclose(P.snr(sigma), ref["snr"], rtol=RTOL)
    for name, values in ref["weightings"].items():
        np.testing.assert_allclose(P.get_weighting(name)(sigma), values, rtol=RTOL, err_msg=name)


@pytest.mark.parametrize("case", refdata.cases("jcm_formulas"))
def test_scalings_and_noise_match_jcm(case):
    data = refdata.load_json(case["files"][".json"])
    sde, ref = data["sde"], data["scalings"]
    t = jnp.asarray(ref["t"], jnp.float32)
    c_skip, c_out, c_in = P.boundary_scalings(t, sigma_data=sde["data_std"], sigma_min=sde["t_min"])
    np.testing.assert_allclose(c_skip, ref["distiller"]["c_skip"], rtol=RTOL)
    np.testing.assert_allclose(c_out, ref["distiller"]["c_out"], rtol=RTOL)
    np.testing.assert_allclose(c_in, ref["c_in"], rtol=RTOL)
    c_skip, c_out, c_in = P.edm_scalings(t, sigma_data=sde["data_std"])
    np.testing.assert_allclose(c_skip, ref["denoiser"]["c_skip"], rtol=RTOL)
    np.testing.assert_allclose(c_out, ref["denoiser"]["c_out"], rtol=RTOL)
    np.testing.assert_allclose(P.c_noise_ncsnpp(t), ref["c_noise"], rtol=RTOL)


def test_boundary_condition_is_exact_identity():
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    net = lambda x_in, c: jnp.full_like(x_in, 7.0)
    f = P.precondition(
        net, x, jnp.full((3,), 0.002), scalings=P.boundary_scalings, noise_cond=P.c_noise_adm
    )
    np.testing.assert_array_equal(f, x)


def test_precondition_feeds_scaled_input_and_noise():
    x = jax.random.normal(jax.random.key(1), (2, 5))
    sigma = jnp.array([0.5, 10.0])
    seen = {}

    def net(x_in, c_noise):
        seen["x_in"], seen["c"] = x_in, c_noise
        return jnp.zeros_like(x_in)

    out = P.precondition(net, x, sigma, scalings=P.edm_scalings, noise_cond=P.c_noise_ncsnpp)
    c_skip, _, c_in = P.edm_scalings(sigma)
    np.testing.assert_allclose(seen["x_in"], c_in[:, None] * x, rtol=1e-6)
    np.testing.assert_allclose(seen["c"], 0.25 * np.log([0.5, 10.0]), rtol=1e-6)
    np.testing.assert_allclose(out, c_skip[:, None] * x, rtol=1e-6)


def test_unknown_names_list_choices():
    with pytest.raises(ValueError, match="choose one of.*karras"):
        P.get_weighting("edm")
    with pytest.raises(ValueError, match="choose one of.*ncsnpp"):
        P.get_noise_conditioning("fourier")


def test_trigflow_scalings_equal_edm_under_sigma_sd_tan_t():
    t = jnp.linspace(0.01, 1.56, 50)
    sigma = 0.5 * jnp.tan(t)
    c_skip, c_out, c_in = P.trigflow_scalings(sigma, sigma_data=0.5)
    e_skip, e_out, e_in = P.edm_scalings(sigma, sigma_data=0.5)
    np.testing.assert_allclose(c_skip, e_skip, rtol=1e-5)
    np.testing.assert_allclose(c_out, -e_out, rtol=1e-5)  # TrigFlow's c_out = -sd sin t
    np.testing.assert_allclose(c_in, e_in, rtol=1e-5)
    np.testing.assert_allclose(P.trigflow_time(sigma, sigma_data=0.5), t, rtol=1e-5)


def test_trigflow_consistency_fn_in_edm_coordinates():
    """precondition(trigflow) at (x_t / cos t, sd tan t) = cos t x_t - sin t sd F(x_t/sd, t)."""
    sd, t = 0.5, jnp.array([0.3, 1.1])
    x_t = jax.random.normal(jax.random.key(2), (2, 6))
    net = lambda x_in, c: jnp.tanh(x_in) * (1 + c[:, None])
    f = P.precondition(
        net,
        x_t / jnp.cos(t)[:, None],
        sd * jnp.tan(t),
        scalings=lambda s: P.trigflow_scalings(s, sigma_data=sd),
        noise_cond=lambda s: P.trigflow_time(s, sigma_data=sd),
    )
    c, s = jnp.cos(t)[:, None], jnp.sin(t)[:, None]
    np.testing.assert_allclose(f, c * x_t - s * sd * net(x_t / sd, t), rtol=1e-5, atol=1e-6)
    zero = P.precondition(
        net, x_t, jnp.zeros(2), scalings=P.trigflow_scalings, noise_cond=P.trigflow_time
    )
    np.testing.assert_array_equal(zero, x_t)  # f(x, 0) = x by construction


def test_ict_weighting_needs_the_pair_and_others_accept_it():
    t, t2 = jnp.array([1.0, 80.0]), jnp.array([0.5, 57.586])
    np.testing.assert_allclose(P.get_weighting("ict")(t, t2), 1 / (t - t2), rtol=1e-6)
    np.testing.assert_allclose(P.get_weighting("snr")(t, t2), P.get_weighting("snr")(t))
