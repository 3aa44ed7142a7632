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
from consistency.core import distances, losses, ode, parameterization
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
    "vae": (False, False, "autoencoder"),
}
BATCH = 4


def _config(loss: str):
    config = test_config.get_config()
    config.training.loss = loss
    if loss in ("sct", "scd"):
        config.model.update(parameterization="trigflow", logvar_features=8)
    if loss == "vae":
        config.model.name = "autoencoder_kl"
    if loss == "pd":
        config.training.update(start_scales=4, distill_steps_per_iter=2)
    return config


def _fns(scale: float = 0.9):
    """Closed-form model functions: f = D = scale * x (params: a scalar multiplier)."""

    def model(params, x, sigma, y, key):
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
