"""Per-example keys on a batch: core/keys.py draws what each example draws alone, and the batched
per-example loss (one loss call, one network call) equals the loss run on each example alone
(the former update.per_example_loss, kept here as the reference) for every row of the table."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test as test_config
from consistency.core import keys
from consistency.experiment import methods, networks, update

B, STEP = 4, 5


def _batch_keys(key, n=B):
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n, dtype=jnp.uint32))


def _each(fn, batch_keys):
    return np.stack([np.asarray(fn(batch_keys[i])) for i in range(batch_keys.shape[0])])


@pytest.mark.parametrize("key", [jax.random.key(3), jax.random.PRNGKey(3)], ids=["typed", "raw"])
def test_draws_on_keys_equal_each_example_drawn_alone(key):
    ks, n = _batch_keys(key), jnp.int32(7)  # a traced bound, as a curriculum's N(k)
    typed = jax.dtypes.issubdtype(ks.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data if typed else np.asarray
    draws = {
        "normal": (lambda k, s: keys.normal(k, s), jax.random.normal, (B, 3, 2)),
        "uniform": (
            lambda k, s: keys.uniform(k, s, minval=1.0, maxval=5.0),
            lambda k, s: jax.random.uniform(k, s, minval=1.0, maxval=5.0),
            (B,),
        ),
        "randint": (
            lambda k, s: keys.randint(k, s, 0, n - 1),
            lambda k, s: jax.random.randint(k, s, 0, n - 1),
            (B,),
        ),
        "bernoulli": (
            lambda k, s: keys.bernoulli(k, 0.3, s),
            lambda k, s: jax.random.bernoulli(k, 0.3, s),
            (B, 5),
        ),
    }
    for name, (batched, single, shape) in draws.items():
        got = jax.jit(lambda ks, batched=batched, shape=shape: batched(ks, shape))(ks)
        want = _each(lambda k, single=single, shape=shape: single(k, (1, *shape[1:]))[0], ks)
        np.testing.assert_array_equal(got, want, err_msg=name)
        # One key: exactly jax.random's call.
        np.testing.assert_array_equal(batched(key, shape), single(key, shape), err_msg=name)
    split = keys.split(ks, 3)
    assert split.shape[:2] == (3, B)
    for j in range(3):
        np.testing.assert_array_equal(
            data(split[j]), _each(lambda k, j=j: data(jax.random.split(k, 3)[j]), ks)
        )
    np.testing.assert_array_equal(data(keys.split(key, 3)), data(jax.random.split(key, 3)))
    folded = keys.fold_in(ks, 0x1AB)
    np.testing.assert_array_equal(
        data(folded), _each(lambda k: data(jax.random.fold_in(k, 0x1AB)), ks)
    )
    assert keys.is_batch(ks) and not keys.is_batch(key)
    with pytest.raises(ValueError, match="4 keys"):
        keys.normal(ks, (B + 1, 2))


def test_per_example_runs_fn_on_each_example_alone():
    ks = _batch_keys(jax.random.key(0))
    x = jnp.arange(B * 3, dtype=jnp.float32).reshape(B, 3)
    fn = lambda k, x, none: (x + jax.random.normal(k, x.shape), none)
    got, none = keys.per_example(fn, ks, x, None)
    want = np.stack([fn(ks[i], x[i : i + 1], None)[0][0] for i in range(B)])
    np.testing.assert_array_equal(got, want)
    assert none is None


def _old_per_example_loss(loss):
    """The reference: the loss on example i alone (a batch of one), key fold_in(key, i), vmapped."""

    def fn(params, target_params, teacher_params, batch, key, step, index):
        def one(example, i):
            single = jax.tree.map(lambda v: v[None], example)
            k = jax.random.fold_in(key, i)
            per, aux = loss(params, target_params, teacher_params, single, k, step)
            return per[0], jax.tree.map(lambda v: v[0] if jnp.ndim(v) else v, aux)

        return jax.vmap(one)(batch, index)

    return fn


def _config(loss, dropout=0.0, **training):
    config = test_config.get_config()
    config.training.update(loss=loss, **training)
    # Smaller than the test UNet still (one level, no attention): fast compiles.
    config.model.unet.update(channels=4, channel_mult=(1,), attn_resolutions=())
    config.model.dropout = dropout
    return config


def _labels(config, guided=False):
    config.data.update(class_conditional=True, num_classes=10)
    config.model.update(null_label=True, guidance_embed_dim=8 if guided else 0)
    return config


def _model(config, **model):
    config.model.update(**model)
    return config


def _vae(config):
    config.model.name = "autoencoder_kl"
    config.model.autoencoder_kl.update(
        block_out_channels=(8, 8), norm_num_groups=4, mid_block_add_attention=False
    )
    return config


SCM = dict(parameterization="trigflow", logvar_features=8)
ICT = dict(
    target_ema_mode="fixed",
    start_ema=0.0,
    scale_mode="exponential",
    start_scales=10,
    end_scales=1280,
    index_sampling="lognormal",
    weighting="ict",
    distance="pseudo_huber",
)
VP_PAIRS = dict(scale_mode="fixed", target_ema_mode="fixed", start_scales=40, skip_steps=20)
CASES = {
    "edm": lambda: _config("edm"),
    "edm_label_dropout": lambda: _labels(_config("edm", label_dropout=0.5)),
    "ddpm": lambda: _model(_config("ddpm"), parameterization="vp_v"),
    "cd": lambda: _config("cd"),
    "cd_vp_teacher": lambda: _model(_config("cd", **VP_PAIRS), parameterization="vp_eps"),
    "ct": lambda: _config("ct"),
    "ict": lambda: _config("ct", **ICT),
    "lcf": lambda: _labels(_config("ct", guidance_min=1.0, guidance_max=5.0), guided=True),
    "pd": lambda: _config("pd", start_scales=4, distill_steps_per_iter=2),
    "ect": lambda: _config("ect", ect_stage_steps=2),
    "cd_continuous": lambda: _config("cd_continuous"),
    "ct_continuous": lambda: _config("ct_continuous", continuous_stopgrad=True),
    "sct": lambda: _model(_config("sct", scm_warmup_steps=10), **SCM),
    "scd": lambda: _model(_config("scd", scm_warmup_steps=10), **SCM),
    "guided_cd": lambda: _labels(_config("guided_cd"), guided=True),
    "vae": lambda: _vae(_config("vae")),
    # model.dropout > 0: each example's masks are its own (the network runs per example).
    "edm_dropout": lambda: _config("edm", dropout=0.3),
    "ct_dropout": lambda: _config("ct", dropout=0.3),
    "sct_dropout": lambda: _model(_config("sct", dropout=0.3, scm_warmup_steps=10), **SCM),
}


def _params(network, config, seed, scale=0.2):
    """Params drawn on the host: every layer, the zero-initialised outputs too, has a gradient."""
    d, rng = config.data, np.random.default_rng(seed)
    x = jnp.zeros((1, d.image_size, d.image_size, d.num_channels))
    shapes = jax.eval_shape(network.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32))
    return jax.tree.map(lambda s: rng.normal(0, scale, s.shape).astype(np.float32), shapes)


def _inputs(config, network):
    """(params, target, teacher, batch, key, step) for make_grad_fn's function."""
    d, rng = config.data, np.random.default_rng(3)
    params = _params(network, config, 0)
    target = jax.tree.map(lambda p: 0.9 * p, params)
    teacher = _params(network.unguided(), config, 1)
    image = rng.uniform(-1, 1, (B, d.image_size, d.image_size, d.num_channels))
    batch = {"image": image.astype(np.float32), "label": np.array([1, 4, 7, 9], np.int32)}
    return params, target, teacher, batch, jax.random.key(2), STEP


def _assert_round_off(got, want, tol=1e-5):
    value, grads, per, aux = got
    ref_value, ref_grads, ref_per, ref_aux = want
    np.testing.assert_allclose(value, ref_value, rtol=tol, atol=1e-6)
    np.testing.assert_allclose(per, ref_per, rtol=tol, atol=1e-6)
    assert set(aux) == set(ref_aux)
    for name in aux:
        assert aux[name].shape == ref_aux[name].shape == (B,), name
        np.testing.assert_allclose(aux[name], ref_aux[name], rtol=tol, atol=1e-6, err_msg=name)
    assert float(optax.tree.norm(ref_grads)) > 0
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        # Relative to the leaf's scale: entries near zero carry round-off of its size.
        assert float(jnp.max(jnp.abs(g - r))) <= tol * float(jnp.max(jnp.abs(r))) + 1e-12


@pytest.mark.parametrize("case", list(CASES))
def test_batched_grad_fn_equals_each_example_alone(case, monkeypatch):
    config = CASES[case]()
    assert methods.problems(config) == []
    assert methods.from_config(config).name == config.training.loss
    network = networks.build_network(config)
    assert network.draws_dropout == (config.model.dropout > 0)
    loss = update.loss_for(config, network, networks.distance_fn(config))
    args = _inputs(config, network)
    got = jax.jit(update.make_grad_fn(loss))(*args)
    monkeypatch.setattr(update, "per_example_loss", _old_per_example_loss)
    want = jax.jit(update.make_grad_fn(loss))(*args)
    # PD's target x_t - t (x_t3 - x_t)/(t3 - t) is O(1) out of x_t ~ sigma = 80: round-off of
    # 80 eps in it (and the gradient), where the other rows stay within 1e-5.
    _assert_round_off(got, want, tol=3e-5 if case == "pd" else 1e-5)


def test_dropout_masks_stay_per_example_and_rate_zero_runs_the_batch_at_once():
    config = _config("ct", dropout=0.5)
    network = networks.build_network(config)
    params = _params(network, config, 0)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(B, 8, 8, 1)), jnp.float32)
    c, y, ks = (
        jnp.linspace(-1.0, 1.0, B),
        jnp.zeros((B,), jnp.int32),
        _batch_keys(jax.random.key(5)),
    )
    apply = jax.jit(network.apply)
    got = apply(params, x, c, y, ks)
    alone = [apply(params, x[i : i + 1], c[i : i + 1], y[i : i + 1], ks[i])[0] for i in range(B)]
    np.testing.assert_allclose(got, np.stack(alone), rtol=1e-5, atol=1e-6)
    # One example in every row: the rows differ by their masks alone.
    same = apply(params, jnp.repeat(x[:1], B, 0), jnp.repeat(c[:1], B), y, ks)
    assert all(float(jnp.max(jnp.abs(same[i] - same[0]))) > 1e-3 for i in range(1, B))
    assert float(jnp.max(jnp.abs(got - apply(params, x, c, y, None)))) > 1e-3
    # Rate 0: keys or none, the same batched call (train switches only dropout).
    config.model.dropout = 0.0
    plain = networks.build_network(config)
    assert not plain.draws_dropout
    np.testing.assert_array_equal(
        jax.jit(plain.apply)(params, x, c, y, ks), jax.jit(plain.apply)(params, x, c, y, None)
    )
