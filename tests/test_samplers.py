"""One-step and multistep samplers against the official code and diffusers, with recorded noise."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata

from consistency.core import samplers
from consistency.core.parameterization import c_noise_adm

CM_CASES = refdata.cases("cm_samplers")


def _load(case):
    meta = refdata.load_json(case["files"][".json"])
    arrays = np.load(case["files"][".npz"])
    return meta, arrays


@pytest.mark.parametrize("case", CM_CASES)
def test_consistency_samplers_match_cm(case):
    meta, arrays = _load(case)
    ran = 0
    for name, c in meta["cases"].items():
        if c["sampler"] not in ("onestep", "multistep"):
            continue
        ran += 1
        f = refdata.closed_form_denoiser(meta["F_params"], distillation=c["distillation"])
        noise = refdata.nhwc(arrays[f"{name}/noise"])
        x_T = refdata.nhwc(arrays[f"{name}/x_T"])
        for clip, suffix in [(True, ""), (False, "_noclip")]:
            if c["sampler"] == "onestep":
                sigma_max = float(
                    arrays[f"{name}/sigmas"][0]
                )  # the reference evaluates at sigmas[0]
                run = lambda out, f=f, x=x_T, s=sigma_max: samplers.onestep_sample(
                    f, x, sigma_max=s, clip_output=out
                )
            else:
                sigmas = samplers.index_sigmas(c["ts"], c["steps"])
                np.testing.assert_allclose(sigmas, c["t_float64"], rtol=1e-7)
                k = len(sigmas)
                run = lambda out, f=f, x=x_T, s=sigmas, z=noise[1:k], cl=clip: (
                    samplers.multistep_sample(f, x, s, z, clip_denoised=cl, clip_output=out)
                )
            for out, raw in [(True, ""), (False, "_raw")]:
                refdata.assert_close_scaled(
                    run(out),
                    refdata.nhwc(arrays[f"{name}/sample{suffix}{raw}"]),
                    refdata.SAMPLER_RTOL,
                    f"{name}{suffix}{raw}",
                )
    assert ran > 0


@pytest.mark.parametrize("case", refdata.cases("diffusers_scheduler"))
def test_diffusers_sigma_tables(case):
    meta = refdata.load_json(case["files"][".json"])
    for table in meta["tables"].values():
        cfg = table["config"]
        grid = dict(sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"], rho=cfg["rho"])
        entries = [
            ({"num_inference_steps": int(k)}, v) for k, v in table["num_inference_steps"].items()
        ]
        entries += [
            ({"timesteps": [int(t) for t in k.split(",")]}, v)
            for k, v in table["custom_timesteps"].items()
        ]
        for kwargs, ref in entries:
            sigmas = samplers.diffusers_sigmas(cfg["num_train_timesteps"], **kwargs, **grid)
            # diffusers appends sigma_min as the terminator of its sigma list.
            full = np.append(sigmas, np.float32(cfg["sigma_min"]))
            np.testing.assert_allclose(full, ref["sigmas"], rtol=refdata.FORMULA_RTOL)

            np.testing.assert_allclose(
                c_noise_adm(sigmas), ref["timesteps"], rtol=refdata.FORMULA_RTOL, atol=1e-3
            )


def _parse_trace_setup(setup: str):
    """(N, timesteps, F_params) from the trace's recorded setup line (it has no structured form)."""
    n = int(re.search(r"num_train_timesteps=(\d+)", setup).group(1))
    timesteps = [int(t) for t in re.search(r"timesteps=\[([\d, ]+)\]", setup).group(1).split(",")]
    m = re.search(r"(\w+)\(([-\d.e]+)\*scaled \+ ([-\d.e]+)\*t\)\*([-\d.e]+)", setup)
    f_params = dict(
        act=m.group(1),
        a=float(m.group(2)),
        b=float(m.group(3)),
        scale=float(m.group(4)),
        shift_t=0.0,
    )
    return n, timesteps, f_params


@pytest.mark.parametrize("case", refdata.cases("diffusers_scheduler"))
def test_diffusers_step_trace(case):
    meta = refdata.load_json(case["files"][".json"])
    arrays = np.load(case["files"]["_trace.npz"])
    steps = meta["step_trace"]["steps"]
    n, timesteps, f_params = _parse_trace_setup(meta["step_trace"]["setup"])
    cfg = meta["tables"][str(n)]["config"]
    sigmas = samplers.diffusers_sigmas(n, timesteps=timesteps)
    np.testing.assert_allclose(sigmas, [s["sigma"] for s in steps], rtol=refdata.FORMULA_RTOL)
    f = refdata.closed_form_denoiser(f_params, distillation=True)
    noise = refdata.nhwc(arrays["step_noise"])
    grid = dict(sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"])
    whole = samplers.multistep_sample(
        f,
        refdata.nhwc(arrays["sample_init"]),
        sigmas,
        noise[: len(sigmas) - 1],
        clip_denoised=cfg["clip_denoised"],
        clip_output=False,
        **grid,
    )
    refdata.assert_close_scaled(whole, refdata.nhwc(arrays["final"]), refdata.SAMPLER_RTOL, "final")


def test_index_api_equals_sigma_api_and_diffusers_mode():
    f = lambda x, s: jnp.tanh(x / (1 + s[:, None]))
    x_T = 80.0 * jax.random.normal(jax.random.key(0), (3, 6))
    noise = jax.random.normal(jax.random.key(1), (1, 3, 6))
    by_index = samplers.multistep_sample(f, x_T, samplers.index_sigmas((0, 22, 39), 40), noise)
    by_diffusers = samplers.multistep_sample(
        f, x_T, samplers.diffusers_sigmas(40, timesteps=[22, 0]), noise
    )
    np.testing.assert_array_equal(by_index, by_diffusers)
    np.testing.assert_allclose(
        samplers.diffusers_sigmas(40, timesteps=[22, 0]), [80, 1.3823680], rtol=1e-6
    )


def test_sample_noise_is_per_sample_id():
    f = lambda x, s: jnp.tanh(0.1 * x)
    key = jax.random.key(3)
    sigmas = samplers.index_sigmas((0, 5, 9), 10)
    all_ = samplers.sample(f, key, jnp.arange(6), (4, 4, 1), sigmas)
    part = samplers.sample(f, key, jnp.arange(3, 5), (4, 4, 1), sigmas)
    np.testing.assert_array_equal(all_[3:5], part)
    assert not np.allclose(all_[0], all_[1])


@pytest.mark.parametrize(
    "ts, n, match",
    [
        ((0, 22), 40, "must end at N-1"),
        ((0, 22, 22, 39), 40, "strictly increasing"),
        ((0,), 40, "at least 2"),
        ((0, 1), 1, "must be >= 2"),
    ],
)
def test_index_api_rejects_bad_indices(ts, n, match):
    with pytest.raises(ValueError, match=match):
        samplers.index_sigmas(ts, n)


def test_sigma_api_rejects_out_of_range_and_increasing():
    with pytest.raises(ValueError, match="must lie in"):
        samplers.validate_sigmas([100.0, 1.0])
    with pytest.raises(ValueError, match="must lie in"):
        samplers.validate_sigmas([1.0, 0.001])
    with pytest.raises(ValueError, match="strictly decreasing"):
        samplers.validate_sigmas([1.0, 2.0])
    with pytest.raises(ValueError, match="strictly descending"):
        samplers.diffusers_sigmas(40, timesteps=[0, 22])
