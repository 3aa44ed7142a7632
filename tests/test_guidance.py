"""Classifier-free guidance: label dropout, guided combinations, the networks' w input (LCM)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from consistency.core import guidance as G
from consistency.models.adm import ADMUNet, adm_param_shapes
from consistency.models.unet import UNet

W_DIM = 16


def _unet(guided):
    return UNet(out_channels=1, channels=8, channel_mult=(1, 2), guidance_embed_dim=W_DIM * guided)


def _adm(guided):
    return ADMUNet(
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        channel_mult=(1,),
        num_classes=10,
        use_scale_shift_norm=True,  # 32 groups of 1 channel would erase an additive embedding
        guidance_embed_dim=W_DIM * guided,
    )


NETS = {"unet": (_unet, (2, 8, 8, 1), None), "adm": (_adm, (2, 4, 4, 3), jnp.array([3, 7]))}


def _inputs(shape, y):
    x = jax.random.normal(jax.random.key(1), shape)
    return x, jnp.array([1.5, -20.0]), y


def _flat(params):
    return traverse_util.flatten_dict(params, sep="/")


@pytest.fixture(scope="module", params=sorted(NETS))
def built(request):
    make, shape, y = NETS[request.param]
    x, c, y = _inputs(shape, y)
    plain = make(False).init(jax.random.key(0), x, c, y)["params"]
    guided_net = make(True)
    guided = guided_net.init(jax.random.key(0), x, c, y, guidance=jnp.zeros((2,)))["params"]
    return make, guided_net, plain, guided, (x, c, y)


def test_params_are_the_unguided_tree_plus_the_projection(built):
    _, _, plain, guided, _ = built
    flat_plain, flat_guided = _flat(plain), _flat(guided)
    extra = sorted(set(flat_guided) - set(flat_plain))
    assert extra == ["guidance_proj/Dense_0/kernel"], extra
    assert flat_guided[extra[0]].shape[0] == W_DIM
    # same names, shapes and initial values: a teacher's params load into the student as they are.
    for k, v in flat_plain.items():
        np.testing.assert_array_equal(flat_guided[k], v, err_msg=k)
    np.testing.assert_array_equal(flat_guided[extra[0]], 0.0)  # zero-initialised projection


def test_w_has_no_effect_without_the_projection(built):
    make, guided_net, plain, guided, (x, c, y) = built
    reference = make(False).apply({"params": plain}, x, c, y)
    for w in (0.0, 1.0, 7.5):
        out = guided_net.apply({"params": guided}, x, c, y, guidance=jnp.full((2,), w))
        np.testing.assert_array_equal(out, reference)


def test_w_changes_the_output_through_the_projection(built):
    _, guided_net, _, guided, (x, c, y) = built
    # the projection and the zero-initialised output convs get random weights.
    flat = _flat(guided)
    keys = dict(zip(flat, jax.random.split(jax.random.key(2), len(flat)), strict=True))
    params = traverse_util.unflatten_dict(
        {
            k: 0.1 * jax.random.normal(keys[k], v.shape) if not np.any(v) else v
            for k, v in flat.items()
        },
        sep="/",
    )
    run = lambda w: guided_net.apply({"params": params}, x, c, y, guidance=jnp.asarray(w))
    a, b = run([1.0, 1.0]), run([4.0, 4.0])
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    np.testing.assert_array_equal(run([1.0, 1.0]), a)
    mixed = run([1.0, 4.0])  # per-example w
    np.testing.assert_allclose(mixed[0], a[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], b[1], atol=1e-5)


def test_guidance_given_exactly_when_the_network_is_guided(built):
    make, guided_net, plain, guided, (x, c, y) = built
    with pytest.raises(ValueError, match="guidance"):
        guided_net.apply({"params": guided}, x, c, y)
    with pytest.raises(ValueError, match="guidance"):
        make(False).apply({"params": plain}, x, c, y, guidance=jnp.ones((2,)))


def test_adm_param_shapes_include_the_projection():
    shapes = adm_param_shapes(_adm(True))["params"]
    assert shapes["guidance_proj"]["Dense_0"]["kernel"].shape == (W_DIM, 32)
    assert "guidance_proj" not in adm_param_shapes(_adm(False))["params"]


def test_guidance_conventions_agree():
    cond, uncond = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 2))
    np.testing.assert_array_equal(G.guided_lcm(cond, uncond, w=0.0), cond)
    w = jnp.asarray([0.0, 1.5, 7.0])
    np.testing.assert_allclose(
        G.guided_lcm(cond, uncond, w=w), G.guided_standard(cond, uncond, scale=1 + w), atol=2e-6
    )


def test_label_dropout_rate_on_a_batch():
    y = jnp.arange(20_000, dtype=jnp.int32) % 10
    for rate in (0.0, 0.1, 0.5, 1.0):
        dropped = G.drop_labels(y, jax.random.key(3), rate=rate, null_class=10)
        is_null = np.asarray(dropped == 10)
        # binomial standard error sqrt(p (1-p)/n) <= 0.0036: 5 of them.
        assert abs(is_null.mean() - rate) < 0.018, (rate, is_null.mean())
        np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(y)[~is_null])


# ---- the guided CD row on a real (tiny) UNet: teacher step and student input ----


def _guided_setup():
    from configs import lcd_digits
    from consistency.experiment import methods, networks

    config = lcd_digits.get_config("student")
    config.model.unet.update(channels=8, channel_mult=(1,), attn_resolutions=())
    config.model.guidance_embed_dim = W_DIM
    network = networks.build_network(config)
    y = jnp.array([3, 7])
    params = network.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), y)
    # Random weights everywhere but the projection (the output conv is zero-initialised).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    noisy = [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    params = {**jax.tree.unflatten(tree, noisy), "guidance_proj": params["guidance_proj"]}
    teacher = {k: v for k, v in params.items() if k != "guidance_proj"}
    return config, network, params, teacher, y, methods, networks


def test_guided_teacher_step_at_w_zero_is_the_unguided_step():
    from consistency.core import ode

    config, network, _, teacher, y, methods, networks = _guided_setup()
    fns, method = networks.model_fns(network, config), methods.from_config(config)
    denoise = fns.teacher_denoiser()
    x = 20.0 * jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t, t2 = jnp.array([20.0, 3.0]), jnp.array([15.0, 2.0])
    plain = ode.heun_step(lambda x, s: denoise(teacher, x, s, y, None), x, t, t2)
    zero = method.guided_teacher(denoise, teacher, y, jnp.zeros(2))
    np.testing.assert_allclose(ode.heun_step(zero, x, t, t2), plain, rtol=0, atol=1e-5)
    # w = 2: LCM's cond + w (cond - uncond) of two separate calls, the null class 10.
    null = jnp.full_like(y, 10)
    cond, uncond = denoise(teacher, x, t, y, None), denoise(teacher, x, t, null, None)
    got = method.guided_teacher(denoise, teacher, y, jnp.full(2, 2.0))(x, t)
    np.testing.assert_allclose(got, cond + 2.0 * (cond - uncond), rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(cond - uncond))) > 1e-3  # the null class is another input


def test_student_output_depends_on_w_only_through_the_embedding():
    config, network, params, teacher, y, _, networks = _guided_setup()
    f = networks.model_fns(network, config).consistency
    f_teacher = networks.model_fn(network.unguided(), config, "consistency")
    x, s = jax.random.normal(jax.random.key(2), (2, 8, 8, 1)), jnp.array([5.0, 0.5])
    at = lambda p, w: f(p, x, s, y, None, guidance=jnp.full(2, w))
    base = f_teacher(teacher, x, s, y, None)
    np.testing.assert_array_equal(at(params, 0.0), base)  # zero projection: the teacher
    np.testing.assert_array_equal(at(params, 4.0), base)
    kernel = params["guidance_proj"]["Dense_0"]["kernel"]
    live = {**params, "guidance_proj": {"Dense_0": {"kernel": 0.1 + 0 * kernel}}}
    assert float(jnp.max(jnp.abs(at(live, 0.0) - at(live, 4.0)))) > 1e-3
    with pytest.raises(ValueError, match="pass w"):
        f(params, x, s, y, None)
    start = networks.student_from_teacher(network, params, teacher)
    assert jax.tree.structure(start) == jax.tree.structure(params)
    assert not np.any(np.asarray(start["guidance_proj"]["Dense_0"]["kernel"]))
