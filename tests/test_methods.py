"""The method table: each row's properties, its loss against the core loss it wraps, and the
rule that nothing jitted closes over the config."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import test as test_config
from consistency.core import distances, losses, ode, parameterization, schedules
from consistency.experiment import edit, methods, networks, sample, spec, train_state, update
from consistency.io import sharding

# name -> (needs_teacher, keeps_target with the test config's mu > 0, samples_as)
PROPERTIES = {
    "edm": (False, False, "diffusion"),
    "cd": (True, True, "consistency"),
    "ct": (False, True, "consistency"),
    "pd": (True, True, "progressive"),
    "ect": (False, False, "consistency"),
    "cd_continuous": (True, False, "consistency"),
    "ct_continuous": (False, False, "consistency"),
    "sct": (False, False, "consistency"),
    "scd": (True, False, "consistency"),
    "guided_cd": (True, True, "consistency"),
    "vae": (False, False, "autoencoder"),
    "ddpm": (False, False, "diffusion"),
}
BATCH = 4


def _config(loss: str):
    config = test_config.get_config()
    config.training.loss = loss
    if loss in ("sct", "scd"):
        config.model.update(parameterization="trigflow", logvar_features=8)
    if loss == "pd":
        config.training.update(start_scales=4, distill_steps_per_iter=2)
    if loss == "vae":
        config.model.name = "autoencoder_kl"
    if loss == "ddpm":
        config.model.parameterization = "vp_eps"
    if loss == "guided_cd":
        config.data.update(class_conditional=True, num_classes=10)
        config.model.update(null_label=True, guidance_embed_dim=8)
    return config


def _fns(scale: float = 0.9):
    """Closed-form model functions: f = D = scale * x (params: a scalar multiplier)."""

    def model(params, x, sigma, y, key, guidance=None):
        return params * scale * x

    def autoencode(params, x, key):  # D(z) = params * scale * x, KL = |x|^2
        return params * scale * x, jnp.sum(x**2, axis=(1, 2, 3))

    return methods.ModelFns(
        consistency=model,
        denoiser=model,
        raw=model,
        log_weight=lambda p, c: 0.1 * c,
        autoencode=autoencode,
    )


def _batch():
    x = jax.random.uniform(jax.random.key(0), (BATCH, 4, 4, 1), minval=-1)
    return {"image": x, "label": jnp.zeros((BATCH,), jnp.int32)}


def test_the_table_holds_every_method_and_its_properties():
    assert set(methods.METHODS) == set(PROPERTIES)
    for name, (teacher, target, samples_as) in PROPERTIES.items():
        method = methods.from_config(_config(name))
        assert method.name == name and methods.row(name) is type(method)
        assert (method.needs_teacher, method.keeps_target, method.samples_as) == (
            teacher,
            target,
            samples_as,
        ), name
    with pytest.raises(ValueError, match="training.loss: unknown 'gan'; choose one of"):
        methods.row("gan")


def test_ict_settings_make_the_target_the_online_params():
    config = _config("ct")
    config.training.update(
        target_ema_mode="fixed",
        scale_mode="exponential",
        start_ema=0.0,
        start_scales=10,
        end_scales=1280,
    )
    assert not methods.from_config(config).keeps_target


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_every_row_returns_per_example_losses(name):
    method = methods.from_config(_config(name))
    distance = jax.tree_util.Partial(distances.l2_norm if "continuous" in name else distances.l2)
    per, metrics = method.loss(
        _fns(), distance, 1.0, 1.0, 1.0, _batch(), jax.random.key(1), jnp.int32(3)
    )
    axis = "reconstruction" if name == "vae" else "sigma"  # an autoencoder has no noise levels
    assert per.shape == (BATCH,) and metrics[axis].shape == (BATCH,)
    assert np.all(np.isfinite(per))


def test_vae_row_is_the_reconstruction_plus_the_weighted_kl():
    config = _config("vae")
    config.training.update(distance="lpips", vae_kl_weight=0.5, vae_lpips_weight=2.0)
    batch, key = _batch(), jax.random.key(0)
    x, y = 0.9 * batch["image"], batch["image"]  # _fns: D(z) = 0.9 x
    kl = jnp.sum(y**2, axis=(1, 2, 3))
    # lpips: LDM's l1 + weight x the injected distance (here l2 stands in for LPIPS)
    per, metrics = methods.from_config(config).loss(
        _fns(), distances.l2, 1.0, None, None, batch, key, 0
    )
    want = distances.l1(x, y) + 2.0 * distances.l2(x, y) + 0.5 * kl
    np.testing.assert_allclose(per, want, rtol=1e-6)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-6)
    config.training.distance = "l2"  # the distance alone
    per, _ = methods.from_config(config).loss(_fns(), distances.l2, 1.0, None, None, batch, key, 0)
    np.testing.assert_allclose(per, distances.l2(x, y) + 0.5 * kl, rtol=1e-6)
    config.model.name = "unet"
    assert any("model.name='autoencoder_kl'" in p for p in methods.problems(config))


def test_edm_label_dropout_rate_on_a_batch():
    """training.label_dropout: the share of examples the denoiser sees with the null class."""
    config = _config("edm")
    config.data.update(class_conditional=True, num_classes=10)
    config.training.label_dropout = 0.25
    assert any("model.null_label" in p for p in methods.problems(config))
    config.model.null_label = True
    method = methods.from_config(config)
    assert (method.label_dropout, method.null_class) == (0.25, 10)
    assert networks.build_network(config).module.num_classes == 11  # the null row

    def model(params, x, sigma, y, key):  # D = 1 exactly where the label is the null class
        return jnp.broadcast_to((y == 10).astype(jnp.float32)[:, None, None, None], x.shape)

    fns = methods.ModelFns(consistency=model, denoiser=model, raw=model)
    n = 4096
    batch = {"image": jnp.zeros((n, 2, 2, 1)), "label": jnp.arange(n, dtype=jnp.int32) % 10}
    per_example = update.per_example_loss(functools.partial(method.loss, fns, None))
    index = jnp.arange(n, dtype=jnp.uint32)
    per, _ = per_example(1.0, None, None, batch, jax.random.key(5), jnp.int32(0), index)
    rate = float(np.mean(np.asarray(per) > 0))
    assert abs(rate - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n), rate
    without = methods.from_config(_config("edm"))
    per, _ = update.per_example_loss(functools.partial(without.loss, fns, None))(
        1.0, None, None, batch, jax.random.key(5), jnp.int32(0), index
    )
    assert not np.any(np.asarray(per) > 0)


def test_cd_and_ct_rows_call_their_core_losses_with_the_configured_fields():
    config = _config("cd")
    config.training.update(weighting="snr", solver="euler", distance="l1")
    method = methods.from_config(config)
    fns, batch, key, step = _fns(), _batch(), jax.random.key(2), jnp.int32(5)
    got, _ = method.loss(fns, distances.l1, 1.0, 0.5, 2.0, batch, key, step)
    m = config.model
    mu, n = method.schedule(step)
    want, _ = losses.consistency_distillation_loss(
        lambda p, x, s, k: fns.consistency(p, x, s, None, k),
        1.0,
        0.5,
        lambda x, s: fns.denoiser(2.0, x, s, None, None),
        ode.euler_step,
        batch["image"],
        key,
        num_scales=n,
        distance=distances.l1,
        weighting=parameterization.get_weighting("snr"),
        sigma_min=m.sigma_min,
        sigma_max=m.sigma_max,
        rho=m.rho,
    )
    np.testing.assert_array_equal(got, want)
    ct = methods.from_config(_config("ct"))
    got, _ = ct.loss(fns, distances.l2, 1.0, 0.5, None, batch, key, step)
    want, _ = losses.consistency_training_loss(
        lambda p, x, s, k: fns.consistency(p, x, s, None, k),
        1.0,
        0.5,
        batch["image"],
        key,
        num_scales=ct.schedule(step)[1],
        distance=distances.l2,
        weighting=parameterization.get_weighting("uniform"),
        sigma_min=m.sigma_min,
        sigma_max=m.sigma_max,
        rho=m.rho,
    )
    np.testing.assert_array_equal(got, want)


def test_distances_each_method_takes():
    # jcm's continuous-time 'l2' is the tangent's norm: the row says so, in one place.
    assert methods.distance_name(methods.CTContinuous, "l2") == "l2_norm"
    assert methods.distance_name(methods.CT, "l2") == "l2"
    config = _config("cd_continuous")
    config.training.distance = "lpips"
    assert any("not supported by training.loss='cd_continuous'" in p for p in spec.problems(config))
    config.training.update(distance="l1", continuous_stopgrad=True)
    assert any(
        "continuous_stopgrad needs training.distance='l2'" in p for p in spec.problems(config)
    )


# ---- nothing jitted closes over the config ----


def _reaches_config(obj, seen=None, depth=0) -> bool:
    """Whether a ConfigDict is reachable from obj through closures, partials, bound methods,
    dataclass fields and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 12:
        return False
    seen.add(id(obj))
    if isinstance(obj, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
        return True
    children = []
    if isinstance(obj, functools.partial | jax.tree_util.Partial):
        children = [obj.func, *obj.args, *obj.keywords.values()]
    elif isinstance(obj, types.MethodType):
        children = [obj.__func__, obj.__self__]
    elif isinstance(obj, types.FunctionType):
        cells = [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
        children = cells + list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, list | tuple | set):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    return any(_reaches_config(c, seen, depth + 1) for c in children)


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def test_the_closure_walker_finds_a_config():
    config = test_config.get_config()
    assert _reaches_config(lambda: config.seed)
    assert _reaches_config(functools.partial(print, config=config))
    assert not _reaches_config(lambda: 1)


def test_no_jitted_function_closes_over_the_config(monkeypatch):
    jitted = []
    real_jit = jax.jit

    def recording_jit(fn, *args, **kwargs):
        jitted.append(fn)
        return real_jit(fn, *args, **kwargs)

    monkeypatch.setattr(jax, "jit", recording_jit)
    config = test_config.get_config()
    config.edit.update(task="denoise", input="unused.npz")
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    network, tx = networks.build_network(config), train_state.optimizer(config)
    update.train_step_for(config, network, tx, mesh)
    update.init_state(config, network, tx, mesh)
    sample.make_sample_fn(config, network)
    edit.make_edit_fn(config, network)
    assert len(jitted) >= 4
    found = [getattr(fn, "__qualname__", repr(fn)) for fn in jitted if _reaches_config(fn)]
    assert not found, f"jitted functions that close over the config: {found}"


# ---- skip-step pairs (LCM) and guided CD ----


def _cd_loss_before_skip_steps(fns, params, target, teacher, x0, key, *, num_scales, m):
    """CD as consistency_distillation_loss computed it before training.skip_steps existed."""
    k_idx, k_z, k_drop = jax.random.split(key, 3)
    index = jax.random.randint(k_idx, (x0.shape[0],), 0, jnp.asarray(num_scales, jnp.int32) - 1)
    grid = dict(sigma_min=m.sigma_min, sigma_max=m.sigma_max, rho=m.rho)
    t = schedules.karras_sigma(index, num_scales, **grid)
    t2 = schedules.karras_sigma(index + 1, num_scales, **grid)
    z = jax.random.normal(k_z, x0.shape, jnp.float32)
    return losses.consistency_loss_at(
        lambda p, x, s, k: fns.consistency(p, x, s, None, k),
        params,
        target,
        lambda x_t, t, t2, x0, z: ode.heun_step(
            lambda x, s: fns.denoiser(teacher, x, s, None, None), x_t, t, t2
        ),
        x0,
        t,
        t2,
        z,
        k_drop,
        distance=distances.l2,
        weighting=parameterization.get_weighting("uniform"),
    )


def test_skip_one_is_the_cd_loss_bit_for_bit():
    config = _config("cd")
    assert config.training.skip_steps == 1
    method = methods.from_config(config)
    fns, batch, step = _fns(), _batch(), jnp.int32(5)
    for seed in range(3):
        key = jax.random.key(seed)
        got, _ = method.loss(fns, distances.l2, 1.0, 0.5, 2.0, batch, key, step)
        n = method.schedule(step)[1]
        want = _cd_loss_before_skip_steps(
            fns, 1.0, 0.5, 2.0, batch["image"], key, num_scales=n, m=config.model
        )
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("loss", ["cd", "ct"])
def test_skip_k_draws_pairs_k_grid_points_apart(loss):
    n, k, b = 40, 7, 2048
    config = _config(loss)
    config.training.update(
        scale_mode="fixed", target_ema_mode="fixed", start_scales=n, end_scales=n, skip_steps=k
    )
    method = methods.from_config(config)
    seen = []

    def sigma_as_output(params, x, sigma, y, key, guidance=None):
        return jnp.broadcast_to(parameterization.broadcast_to(sigma, x), x.shape)

    fns = methods.ModelFns(consistency=sigma_as_output, denoiser=_fns().denoiser, raw=None)
    record = lambda a, b: (seen.append((a[:, 0, 0, 0], b[:, 0, 0, 0])), distances.l2(a, b))[1]
    batch = {"image": jnp.zeros((b, 1, 1, 1)), "label": jnp.zeros((b,), jnp.int32)}
    _, aux = method.loss(fns, record, 1.0, 1.0, 1.0, batch, jax.random.key(3), jnp.int32(0))
    (online, target) = seen[0]
    index = np.asarray(aux["index"])
    m = config.model
    grid = dict(sigma_min=m.sigma_min, sigma_max=m.sigma_max, rho=m.rho)
    assert index.min() == 0 and index.max() == n - 1 - k  # every start, none past the grid
    np.testing.assert_array_equal(online, schedules.karras_sigma(index, n, **grid))
    np.testing.assert_array_equal(target, schedules.karras_sigma(index + k, n, **grid))
    np.testing.assert_array_equal(aux["sigma"], online)


def test_skip_steps_is_checked_against_the_grid_and_the_rows():
    config = _config("cd")
    config.training.update(
        scale_mode="fixed", target_ema_mode="fixed", start_scales=10, end_scales=10, skip_steps=10
    )
    assert any("training.skip_steps=10: must be in [1, N - 1]" in p for p in spec.problems(config))
    config.training.update(skip_steps=3, index_sampling="lognormal")
    assert any("takes training.index_sampling='uniform'" in p for p in spec.problems(config))
    config = _config("ect")
    config.training.skip_steps = 2
    assert any("training.skip_steps=2: training.loss='ect'" in p for p in spec.problems(config))


def test_guided_cd_at_w_zero_is_cd_bit_for_bit_and_draws_w_per_example():
    config = _config("guided_cd")
    config.training.update(guidance_min=0.0, guidance_max=0.0)
    guided, plain = methods.from_config(config), methods.from_config(_config("cd"))
    fns, batch, key, step = _fns(), _batch(), jax.random.key(4), jnp.int32(5)
    got, aux = guided.loss(fns, distances.l2, 1.0, 0.5, 2.0, batch, key, step)
    want, _ = plain.loss(fns, distances.l2, 1.0, 0.5, 2.0, batch, key, step)
    np.testing.assert_array_equal(got, want)
    assert np.all(np.asarray(aux["w"]) == 0)
    config.training.update(guidance_min=1.0, guidance_max=5.0)
    method, n = methods.from_config(config), 4096
    per_example = update.per_example_loss(functools.partial(method.loss, fns, distances.l2))
    images = {"image": jnp.zeros((n, 2, 2, 1)), "label": jnp.zeros((n,), jnp.int32)}
    index = jnp.arange(n, dtype=jnp.uint32)
    _, aux = per_example(1.0, 1.0, 1.0, images, key, step, index)
    w = np.asarray(aux["w"])
    assert w.min() >= 1.0 and w.max() <= 5.0 and len(np.unique(w)) > n - 8  # float32 ties
    assert abs(w.mean() - 3.0) < 5 * (4.0 / np.sqrt(12 * n)), w.mean()


def test_guided_cd_config_checks():
    config = _config("guided_cd")
    config.model.guidance_embed_dim = 0
    assert any("needs model.guidance_embed_dim > 0" in p for p in spec.problems(config))
    config = _config("guided_cd")
    config.model.null_label = False
    assert any("model.null_label" in p for p in spec.problems(config))
    config = _config("guided_cd")
    config.training.update(guidance_min=3.0, guidance_max=1.0)
    assert any("give w_min <= w_max" in p for p in spec.problems(config))
    config = _config("cd")
    config.model.guidance_embed_dim = 8
    assert any("model.guidance_embed_dim=8: training.loss='cd'" in p for p in spec.problems(config))
    config = _config("cd")
    config.sampling.guidance = 2.0
    assert any("sampling.guidance=2.0: needs a guided student" in p for p in spec.problems(config))
    config = _config("edm")
    config.sampling.guidance = 2.0
    assert any("sampling.guidance=2.0: needs model.null_label" in p for p in spec.problems(config))
