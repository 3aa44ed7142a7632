"""Discrete VP (DDPM) teachers in EDM variables: the denoiser, DDIM and DPM-Solver-2 teacher steps
against diffusers' fixtures, the ddpm row, and CD / guided CD on a VP teacher's timesteps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata

from configs import lcd_digits
from configs import test as test_config
from consistency.core import distances, dpm_solver, losses, ode, samplers, vp
from consistency.core import parameterization as P
from consistency.core.samplers import SamplerSpec
from consistency.experiment import methods, networks, sample, sampling_spec, spec

CASES = refdata.cases("vp_solvers")
FORMULA = refdata.FORMULA_RTOL


def _fixture(case):
    meta, ref = refdata.load_json(case["files"][".json"]), np.load(case["files"][".npz"])
    b = meta["betas"]
    schedule = vp.VPSchedule(
        num_train_timesteps=b["num_train_timesteps"],
        beta_start=b["beta_start"],
        beta_end=b["beta_end"],
        beta_schedule=b["beta_schedule"],
    )
    return meta, ref, schedule


def _vp_denoiser(net, sigmas, prediction):
    """D(x, sigma) of a VP network net(x_vp, t): EDM variables, c_noise = the timestep."""
    return functools.partial(
        P.precondition,
        net,
        scalings=functools.partial(P.vp_scalings, prediction=prediction),
        noise_cond=functools.partial(P.vp_timestep, sigmas=sigmas),
    )


def _ddim_cases(meta):
    return [(n, c) for n, c in meta["cases"].items() if n.startswith("ddim/")]


@pytest.mark.parametrize("case", CASES)
def test_edm_variable_ddim_step_is_diffusers_ddim(case):
    """ode.ddim_step on x = x_vp/sqrt(abar_t), sigma_t = sqrt((1-abar)/abar), times sqrt(abar'),
    is DDIMScheduler.step (t -> t - 20; abar_0 below 0) and vp.ddim_step: ~2e-7 of scale."""
    meta, ref, schedule = _fixture(case)
    ac, sigmas, k = schedule.alphas_cumprod(), schedule.sigmas(), meta["skip_k"]
    net = refdata.closed_form_vp_net(meta["F_params"], s=meta["s_cond"])
    errors = []
    for name, c in _ddim_cases(meta):
        t, end = c["t"], max(c["t"] - k, 0)  # t = 19: diffusers' final abar is abar_0
        np.testing.assert_allclose(ac[end], c["alpha_prod_t_prev"], rtol=FORMULA)
        denoise = _vp_denoiser(net, sigmas, c["prediction_type"])
        x_vp = jnp.asarray(ref[f"{name}/sample"])
        x = x_vp / np.sqrt(ac[t])
        x0 = denoise(x, sigmas[t])
        errors.append(
            refdata.assert_close_scaled(x0, ref[f"{name}/pred_original_sample"], FORMULA, name)
        )
        step = ode.ddim_step(denoise, x, sigmas[t], sigmas[end]) * np.sqrt(ac[end])
        errors.append(refdata.assert_close_scaled(step, ref[f"{name}/prev_sample"], FORMULA, name))
        alpha, sigma = vp.alpha_sigma(ac[t])
        eps = vp.predicted_eps(
            net(x_vp, t), x_vp, alpha=alpha, sigma=sigma, prediction=c["prediction_type"]
        )
        core = vp.ddim_step(x0, eps, alpha_bar_prev=ac[end])
        refdata.assert_close_scaled(step, core, FORMULA, name)
        # Euler in EDM variables is the same step (algebraically; here to round-off).
        euler = ode.euler_step(denoise, x, sigmas[t], sigmas[end]) * np.sqrt(ac[end])
        refdata.assert_close_scaled(euler, ref[f"{name}/prev_sample"], FORMULA, name)
    assert max(errors) < 1e-6, max(errors)


@pytest.mark.parametrize("case", CASES)
def test_guided_vp_teacher_step_is_lcms_guided_ddim_step(case):
    """GuidedCD's teacher (D(y) + w (D(y) - D(null)), one batched call) and ode.ddim_step at
    LCM's pair 759 -> 739: train_lcm_distill_sd_wds.py's guided x_prev for every w."""
    meta, ref, schedule = _fixture(case)
    ac, sigmas = schedule.alphas_cumprod(), schedule.sigmas()
    t, end = meta["cfg_t"], meta["cfg_t"] - meta["skip_k"]
    nets = {
        b: refdata.closed_form_vp_net(meta["F_params"], s=meta[f"s_{b}"])
        for b in ("cond", "uncond")
    }
    x = jnp.asarray(ref["cfg/sample"]) / np.sqrt(ac[t])
    y = jnp.zeros((x.shape[0],), jnp.int32)
    method = methods.GuidedCD(null_class=10)
    for pred in ("epsilon", "v_prediction"):

        def denoise(params, x, s, labels, key, pred=pred):
            both = lambda x_in, c: jnp.where(
                P.broadcast_to(labels == 10, x_in), nets["uncond"](x_in, c), nets["cond"](x_in, c)
            )
            return _vp_denoiser(both, sigmas, pred)(x, s)

        for j, w in enumerate(meta["w_list"]):
            guided = method.guided_teacher(denoise, None, y, jnp.full((2,), w, jnp.float32))
            step = ode.ddim_step(guided, x, sigmas[t], sigmas[end]) * np.sqrt(ac[end])
            want = ref[f"cfg/{pred}/guided_x_prev"][j]
            refdata.assert_close_scaled(step, want, FORMULA, f"{pred} w={w}")


def _gaussian_denoiser(s_data):
    return lambda x, sigma: x * s_data**2 / (s_data**2 + P.broadcast_to(sigma, x) ** 2)


def test_dpm_solver_2_is_second_order_on_gaussian_data():
    """Exact PF-ODE map x sqrt((c^2 + s'^2)/(c^2 + s^2)): local error O(h^3), below DDIM's."""
    c, sigma = 0.5, 2.0
    x = jax.random.normal(jax.random.key(0), (4, 3))
    denoise = _gaussian_denoiser(c)
    errs = {"dpm_solver_2": [], "ddim": []}
    for h in (0.4, 0.2, 0.1):
        s_next = sigma * np.exp(-h)
        exact = np.asarray(x) * np.sqrt((c**2 + s_next**2) / (c**2 + sigma**2))
        for name in errs:
            out = ode.get_solver(name)(denoise, x, sigma, s_next)
            errs[name].append(np.abs(np.asarray(out) - exact).max())
    rate = np.log2(errs["dpm_solver_2"][1] / errs["dpm_solver_2"][2])
    assert 2.6 < rate < 3.4, errs
    assert 1.6 < np.log2(errs["ddim"][1] / errs["ddim"][2]) < 2.4, errs
    assert all(a < b / 5 for a, b in zip(errs["dpm_solver_2"], errs["ddim"], strict=True))


@pytest.mark.parametrize("case", CASES)
def test_dpm_solver_2_is_two_dpm_solver_pp_first_order_steps(case):
    """DPM-Solver++(2S): DPM-Solver++(1) to the lambda midpoint, then the full step with the
    midpoint's x0 (core/dpm_solver.py on x_vp), on the fixture's VP net at 759 -> 739."""
    meta, ref, schedule = _fixture(case)
    ac, sigmas = schedule.alphas_cumprod(), schedule.sigmas()
    net = refdata.closed_form_vp_net(meta["F_params"], s=meta["s_cond"])
    t, end = meta["cfg_t"], meta["cfg_t"] - meta["skip_k"]
    x_vp = jnp.asarray(ref["cfg/sample"])
    for pred in ("epsilon", "v_prediction"):
        denoise = _vp_denoiser(net, sigmas, pred)
        s, s_next = jnp.float32(sigmas[t]), jnp.float32(sigmas[end])
        s_mid = jnp.sqrt(s * s_next)
        got = ode.dpm_solver_2_step(denoise, x_vp / np.sqrt(ac[t]), s, s_next)
        u = dpm_solver.dpmpp_first_order(
            x_vp, denoise(x_vp / np.sqrt(ac[t]), s), sigma_s=s, sigma_t=s_mid
        )
        alpha_mid, _ = dpm_solver.alpha_sigma_of(s_mid)
        x0_mid = denoise(u / alpha_mid, s_mid)
        want = dpm_solver.dpmpp_first_order(x_vp, x0_mid, sigma_s=s, sigma_t=s_next)
        refdata.assert_close_scaled(got * np.sqrt(ac[end]), want, FORMULA, pred)
        # it is not the first-order step: the net is far from linear here.
        ddim = ode.ddim_step(denoise, x_vp / np.sqrt(ac[t]), s, s_next) * np.sqrt(ac[end])
        assert np.abs(np.asarray(ddim - want)).max() > 1e-4


def test_vp_scalings_timestep_and_boundary():
    sigmas = vp.VPSchedule().sigmas()
    t = P.vp_timestep(jnp.asarray(sigmas), sigmas=sigmas)
    np.testing.assert_array_equal(t, np.arange(1000, dtype=np.float32))  # grid levels: exact
    mid = P.vp_timestep(jnp.sqrt(sigmas[499] * sigmas[500]), sigmas=sigmas)
    assert abs(float(mid) - 499.5) < 1e-3
    assert float(P.vp_timestep(1e-4, sigmas=sigmas)) == 0.0
    assert float(P.vp_timestep(1e4, sigmas=sigmas)) == 999.0
    s = jnp.asarray([sigmas[0], 0.3, 2.0, 40.0], jnp.float32)
    for pred in ("epsilon", "v_prediction"):
        skip, out, c_in = P.vp_boundary_scalings(
            s, prediction=pred, sigma_data=0.5, sigma_min=float(sigmas[0])
        )
        assert float(skip[0]) == 1.0 and float(out[0]) == 0.0  # f(x, sigma(0)) = x exactly
        # f = EDM's boundary scalings on F_edm = (D_vp - c_skip_edm x)/c_out_edm.
        x, F = 1.3, -0.7
        skip_v, out_v, _ = P.vp_scalings(s, prediction=pred)
        d_vp = skip_v * x + out_v * F
        skip_e, out_e, _ = P.edm_scalings(s, sigma_data=0.5)
        skip_b, out_b, _ = P.boundary_scalings(s, sigma_data=0.5, sigma_min=float(sigmas[0]))
        want = skip_b * x + out_b * (d_vp - skip_e * x) / out_e
        np.testing.assert_allclose(skip * x + out * F, want, rtol=1e-5)
        np.testing.assert_allclose(c_in, 1 / np.sqrt(1 + np.asarray(s, np.float64) ** 2), rtol=1e-6)


# ---- the ddpm row ----


def _ddpm_config(prediction="vp_eps"):
    config = test_config.get_config()
    config.training.loss = "ddpm"
    config.model.parameterization = prediction
    config.model.vp.update(num_train_timesteps=50, beta_schedule="scaled_linear")
    return config


@pytest.mark.parametrize("prediction", ["vp_eps", "vp_v"])
def test_ddpm_loss_is_the_eps_or_v_mse_at_integer_timesteps(prediction):
    """F = 0.3 x_t: the per-example loss is mean((0.3 x_t - target)^2), target eps or v, with eps
    recovered from what the network saw; t covers 0..T-1; the oracle network scores ~0."""
    method = methods.from_config(_ddpm_config(prediction))
    ac = method.discrete.alphas_cumprod()
    seen = {}

    def raw(params, x_in, t, y, key):
        seen.update(x=x_in, t=t)
        return params * x_in

    fns = methods.ModelFns(consistency=None, denoiser=None, raw=raw)
    n = 512
    x0 = jax.random.uniform(jax.random.key(1), (n, 2, 2, 1), minval=-1)
    batch = {"image": x0, "label": jnp.zeros((n,), jnp.int32)}
    per, aux = method.loss(fns, None, 0.3, None, None, batch, jax.random.key(2), 0)
    t = np.asarray(aux["timestep"])
    np.testing.assert_array_equal(np.asarray(seen["t"]), t.astype(np.float32))
    assert t.min() == 0 and t.max() == 49 and len(np.unique(t)) == 50
    abar = ac[t].astype(np.float64)[:, None, None, None]
    x_t = np.asarray(seen["x"], np.float64)
    eps = (x_t - np.sqrt(abar) * np.asarray(x0)) / np.sqrt(1 - abar)
    target = eps if prediction == "vp_eps" else np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0
    want = np.mean((0.3 * x_t - target) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(per, want, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(aux["sigma"], np.sqrt((1 - abar) / abar).ravel(), rtol=1e-5)

    # A point mass at x0 = 0.25: the exact eps / v is a function of (x_t, t).
    def oracle(params, x_in, t, y, key):
        a = jnp.asarray(ac)[t.astype(jnp.int32)][:, None, None, None]
        e = (x_in - jnp.sqrt(a) * 0.25) / jnp.sqrt(1 - a)
        return e if prediction == "vp_eps" else jnp.sqrt(a) * e - jnp.sqrt(1 - a) * 0.25

    fns = methods.ModelFns(consistency=None, denoiser=None, raw=oracle)
    batch["image"] = jnp.full_like(x0, 0.25)
    per, _ = method.loss(fns, None, None, None, None, batch, jax.random.key(3), 0)
    assert float(jnp.max(per)) < 1e-6


def test_ddpm_label_dropout_rate():
    config = _ddpm_config()
    config.data.update(class_conditional=True, num_classes=10)
    config.training.label_dropout = 0.3
    assert any("model.null_label" in p for p in methods.problems(config))
    config.model.null_label = True
    method = methods.from_config(config)

    def raw(params, x_in, t, y, key):  # a huge output exactly where the label is the null class
        big = 1e3 * (y == 10).astype(jnp.float32)
        return jnp.broadcast_to(big[:, None, None, None], x_in.shape)

    n = 4096
    fns = methods.ModelFns(consistency=None, denoiser=None, raw=raw)
    batch = {"image": jnp.zeros((n, 2, 2, 1)), "label": jnp.arange(n, dtype=jnp.int32) % 10}
    per, _ = method.loss(fns, None, None, None, None, batch, jax.random.key(5), 0)
    rate = float(np.mean(np.asarray(per) > 1e4))
    assert abs(rate - 0.3) < 5 * np.sqrt(0.3 * 0.7 / n), rate


def test_vp_config_checks():
    config = _ddpm_config()
    config.model.vp.beta_schedule = "quadratic"
    assert any(
        p.startswith("model.vp.beta_schedule: unknown 'quadratic'") for p in spec.problems(config)
    )
    config = _ddpm_config()
    config.model.vp.update(beta_start=0.02, beta_end=0.01)
    assert any("need 0 < beta_start <= beta_end < 1" in p for p in spec.problems(config))
    config = _ddpm_config()
    config.model.parameterization = "edm"
    assert any(
        "training.loss='ddpm' takes one of ('vp_eps', 'vp_v')" in p for p in spec.problems(config)
    )
    config = lcd_digits.get_config("vp_student")
    config.training.skip_steps = 1000
    assert any("training.skip_steps=1000: must be in [1, 999]" in p for p in spec.problems(config))
    config = lcd_digits.get_config("vp_student")
    config.training.update(scale_mode="progressive", end_scales=400)
    assert any("a VP teacher's grid is its" in p for p in spec.problems(config))
    config = lcd_digits.get_config("vp_student")
    config.training.loss = "ct"
    assert any(
        "model.parameterization='vp_eps': training.loss='ct'" in p for p in spec.problems(config)
    )


def test_ddim_sampler_of_a_vp_teacher_is_diffusers_trailing_ddim():
    """--mode=sample of a ddpm run: DDIM on the trailing timesteps to abar = 1, as a loop of
    vp.ddim_step on x_vp (a closed-form eps network), from x_T = sigma(T-1) z."""
    config = _ddpm_config()
    config.sampling.update(teacher_steps=7, clip_denoised=False)
    sampler = sampling_spec.sampler(config)
    assert sampler.kind == "ddim" and sampler.steps == 7
    schedule = methods.vp_schedule(config)
    ac, sigmas = schedule.alphas_cumprod(), schedule.sigmas()
    ts = vp.ddim_timesteps(num_train_timesteps=50, num_inference_steps=7)
    assert ts.tolist() == [49, 42, 35, 28, 20, 13, 6]  # round(50 - 50 i/7) - 1
    net = lambda x_vp, t: 0.4 * jnp.tanh(x_vp + P.broadcast_to(t, x_vp) / 50)
    denoise = _vp_denoiser(net, sigmas, "epsilon")
    fns = methods.ModelFns(consistency=None, denoiser=lambda p, x, s, y, k: denoise(x, s), raw=None)
    fn = sample.make_sampler(fns, sampler, methods.noise_grid(config), (2, 2, 1), clip_output=False)
    ids = jnp.arange(3)
    got = fn(None, jax.random.key(0), ids, jnp.zeros((3,), jnp.int32))
    x = float(sigmas[-1]) * samplers.per_sample_normal(jax.random.key(0), ids, (2, 2, 1), 0)
    x_vp = x * np.sqrt(ac[49])
    for i, t in enumerate(ts):
        alpha, sigma = vp.alpha_sigma(ac[t])
        eps = net(x_vp, jnp.full((3,), t))
        x0 = vp.predicted_x0(eps, x_vp, alpha=alpha, sigma=sigma, prediction="epsilon")
        x_vp = vp.ddim_step(x0, eps, alpha_bar_prev=ac[ts[i + 1]] if i + 1 < len(ts) else 1.0)
    refdata.assert_close_scaled(got, x_vp, FORMULA)


# ---- CD and guided CD with a VP teacher ----


def _spy_fns(seen):
    def consistency(params, x, sigma, y, key, guidance=None):
        seen.append(sigma)
        return params * x

    return methods.ModelFns(
        consistency=consistency, denoiser=lambda p, x, s, y, k: p * 0.9 * x, raw=None
    )


def test_cd_with_a_vp_teacher_takes_lcms_pairs_of_its_timesteps():
    config = lcd_digits.get_config("vp_student")
    config.training.update(loss="cd", skip_steps=20)
    config.model.guidance_embed_dim = 0
    method = methods.from_config(config)
    sigmas = methods.vp_schedule(config).sigmas()
    seen, n = [], 2048
    batch = {"image": jnp.zeros((n, 1, 1, 1)), "label": jnp.zeros((n,), jnp.int32)}
    _, aux = method.loss(_spy_fns(seen), distances.l2, 1.0, 1.0, 1.0, batch, jax.random.key(3), 0)
    online, target = (np.asarray(s) for s in seen)
    start = np.asarray(aux["index"])
    assert set(start.tolist()) == set(range(19, 1000, 20))  # LCM's 50 starts
    np.testing.assert_array_equal(online, sigmas[start])
    np.testing.assert_array_equal(target, sigmas[np.maximum(start - 20, 0)])
    np.testing.assert_array_equal(aux["sigma"], online)


@pytest.mark.parametrize("solver", ["ddim", "dpm_solver_2"])
def test_guided_cd_at_w_zero_with_a_vp_teacher_is_cd(solver):
    config = lcd_digits.get_config("vp_student")
    config.training.update(solver=solver, guidance_min=0.0, guidance_max=0.0)
    plain_config = lcd_digits.get_config("vp_student")
    plain_config.training.update(loss="cd", solver=solver)
    plain_config.model.guidance_embed_dim = 0
    guided, plain = methods.from_config(config), methods.from_config(plain_config)
    assert guided.discrete is not None and guided.solver == solver
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1)
    batch = {"image": x, "label": jnp.array([1, 2, 3, 4])}
    for seed in range(2):
        key = jax.random.key(seed)
        got, aux = guided.loss(_spy_fns([]), distances.l2, 1.0, 0.5, 2.0, batch, key, 0)
        want, _ = plain.loss(_spy_fns([]), distances.l2, 1.0, 0.5, 2.0, batch, key, 0)
        np.testing.assert_array_equal(got, want)
        assert np.all(np.asarray(aux["w"]) == 0)


def test_vp_student_on_a_real_unet_starts_at_the_boundary_and_guides_like_the_teacher():
    """The tiny UNet as a vp_eps model: f(x, sigma(0)) = x; the guided teacher at w = 0 is the
    conditional teacher for both teacher steps; at w > 0 it moves the step."""
    config = lcd_digits.get_config("vp_student")
    config.model.unet.update(channels=8, channel_mult=(1,), attn_resolutions=())
    network = networks.build_network(config)
    y = jnp.array([3, 7])
    params = network.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), y)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    params = jax.tree.unflatten(
        tree, [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    )
    teacher = {k: v for k, v in params.items() if k != "guidance_proj"}
    fns, method = networks.model_fns(network, config), methods.from_config(config)
    sigmas = methods.vp_schedule(config).sigmas()
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    w = jnp.full((2,), 2.0)
    f0 = fns.consistency(params, x, jnp.full((2,), sigmas[0]), y, None, guidance=w)
    np.testing.assert_array_equal(f0, x)
    denoise = fns.teacher_denoiser()
    s, s2 = jnp.asarray(sigmas[[759, 300]]), jnp.asarray(sigmas[[739, 280]])
    x = x * s[:, None, None, None]
    for name in ("ddim", "dpm_solver_2"):
        step = ode.get_solver(name)
        plain = step(lambda x, s: denoise(teacher, x, s, y, None), x, s, s2)
        zero = method.guided_teacher(denoise, teacher, y, jnp.zeros(2))
        np.testing.assert_allclose(step(zero, x, s, s2), plain, rtol=0, atol=1e-5)
        moved = step(method.guided_teacher(denoise, teacher, y, w), x, s, s2)
        assert np.abs(np.asarray(moved - plain)).max() > 1e-3


def test_ddpm_losses_ddpm_loss_rejects_an_unknown_prediction():
    with pytest.raises(ValueError, match="unknown VP prediction"):
        losses.ddpm_loss(
            lambda p, x, t, k: x,
            None,
            jnp.zeros((2, 1)),
            jax.random.key(0),
            alphas_cumprod=np.ones(4, np.float32) * 0.5,
            prediction="sample",
        )
    with pytest.raises(ValueError, match="unknown sampler kind"):
        SamplerSpec(kind="dpm")


def test_lcd_digits_vp_teacher_then_vp_student_one_step_each(tmp_path):
    """configs/lcd_digits.py:vp_teacher (ddpm, DDIM grids) then :vp_student from its
    checkpoint: one real step each on the digits; the student starts as the teacher (plus the
    zero guidance projection) and the pipeline samples it."""
    from consistency.experiment import train
    from consistency.experiment.pipeline import ConsistencyPipeline

    runs = {}
    for variant in ("vp_teacher", "vp_student"):
        config = lcd_digits.get_config(variant)
        config.model.unet.update(channels=8, channel_mult=(1,), attn_resolutions=())
        config.training.update(batch_size=8, num_steps=1, log_every=1, snapshot_every=1)
        config.sampling.update(grid_size=2, batch_size=2, teacher_steps=4)
        config.eval.every_steps = 0
        config.data.num_threads = 1
        if variant == "vp_student":
            config.training.teacher_checkpoint = str(runs["vp_teacher"] / "checkpoints")
        runs[variant] = tmp_path / variant
        state = train.train_and_evaluate(config, str(runs[variant]))
        assert int(state.step) == 1 and (runs[variant] / "samples" / "grid_0000001.png").exists()
    pipe = ConsistencyPipeline.from_workdir(runs["vp_student"])
    images = pipe(batch_size=3, guidance_scale=3.0, output_type="np", seed=1)
    assert images.shape == (3, 8, 8, 1) and np.isfinite(images).all()
