"""LCF (Luo et al. 2023): consistency training of a guided student, w given to both copies, and
the run that starts from a guided checkpoint (training.init_checkpoint)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lcd_latent_digits
from consistency.core import distances
from consistency.experiment import methods, networks, resume, sample, spec, train_state, update
from consistency.experiment.train_state import TrainState
from consistency.io import checkpoints, sharding

W_DIM = 8


def _config(variant="lcf", guided=True):
    """configs/lcd_latent_digits.py at test size (the network only: no file is read)."""
    config = lcd_latent_digits.get_config(variant)
    config.model.unet.update(channels=8, channel_mult=(1,), attn_resolutions=())
    config.model.guidance_embed_dim = W_DIM if guided else 0
    return config


def _noisy(params, seed):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


def _guided_params():
    """(network, online, target) of the tiny guided UNet: random weights, zero guidance_proj."""
    network = networks.build_network(_config())
    params = network.init(jax.random.key(0), jnp.zeros((2, 4, 4, 2)), jnp.array([5, 9]))
    zero = params["guidance_proj"]
    online = {**_noisy(params, 1), "guidance_proj": zero}
    target = {**_noisy(params, 2), "guidance_proj": zero}
    return network, online, target


def _batch():
    x = jax.random.normal(jax.random.key(3), (4, 4, 4, 2))
    return {"image": x, "label": jnp.array([5, 6, 8, 9])}


def test_guided_ct_with_a_zero_guidance_projection_is_ct_bit_for_bit():
    config = _config()
    config.training.update(guidance_min=1.0, guidance_max=5.0)  # w > 0: it must not matter
    network, online, target = _guided_params()
    guided = methods.from_config(config)
    plain = methods.from_config(_config(guided=False))
    assert guided.guided_net and not plain.guided_net and guided.keeps_target
    unguided = lambda p: {k: v for k, v in p.items() if k != "guidance_proj"}
    fns = networks.model_fns(network, config)
    plain_fns = networks.model_fns(network.unguided(), _config(guided=False))
    for seed in range(2):
        key, step = jax.random.key(10 + seed), jnp.int32(7)
        got, aux = guided.loss(fns, distances.l2, online, target, None, _batch(), key, step)
        want, plain_aux = plain.loss(
            plain_fns, distances.l2, unguided(online), unguided(target), None, _batch(), key, step
        )
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(aux["sigma"], plain_aux["sigma"])
        w = np.asarray(aux["w"])
        assert w.shape == (4,) and w.min() >= 1.0 and w.max() <= 5.0 and len(set(w)) == 4
        assert "w" not in plain_aux


def test_guided_ct_gives_the_same_w_to_the_online_and_the_target_network():
    config = _config()
    method = methods.from_config(config)
    seen = []

    def spy(params, x, sigma, y, key, guidance=None):
        seen.append(guidance)
        return params * x

    fns = methods.ModelFns(consistency=spy, denoiser=None, raw=None)
    key = jax.random.key(4)
    _, aux = method.loss(fns, distances.l2, 1.0, 0.5, None, _batch(), key, jnp.int32(0))
    online, target = seen
    np.testing.assert_array_equal(online, target)
    np.testing.assert_array_equal(online, method.sample_w(key, 4))  # GuidedCD's draw
    np.testing.assert_array_equal(aux["w"], online)
    # On the real network w reaches the loss once the projection is not zero.
    network, params, target_params = _guided_params()
    fns = networks.model_fns(network, config)
    live = lambda p: {**p, "guidance_proj": jax.tree.map(lambda a: a + 0.1, p["guidance_proj"])}
    loss = lambda p, t: method.loss(fns, distances.l2, p, t, None, _batch(), key, jnp.int32(0))[0]
    zero, moved = loss(params, target_params), loss(live(params), live(target_params))
    assert float(jnp.max(jnp.abs(zero - moved))) > 1e-6


def test_guided_ct_and_init_checkpoint_checks(tmp_path):
    config = _config()
    config.training.update(guidance_min=3.0, guidance_max=1.0)
    assert any("give w_min <= w_max" in p for p in spec.problems(config))
    config = _config()
    config.training.loss = "ect"
    assert any(
        "model.guidance_embed_dim=8: training.loss='ect'" in p for p in spec.problems(config)
    )
    config = _config()
    config.training.init_from_teacher = True
    assert any("init_checkpoint and training.init_from_teacher" in p for p in spec.problems(config))
    config = _config()
    config.training.init_checkpoint = str(tmp_path / "none")
    with pytest.raises(spec.ConfigError, match="training.init_checkpoint: no checkpoint directory"):
        spec.check_paths(config, mode="train")


def _write_student(config, directory):
    """A guided_cd run's checkpoint of the network: online params and an EMA copy that differ."""
    network, online, _ = _guided_params()
    ema = _noisy(online, 5)
    state = TrainState.create(online, train_state.optimizer(config), num_ema=1, with_target=True)
    state = state.replace(ema_params=(ema,))
    fingerprint = checkpoints.param_fingerprint(sample.abstract_params(config, network))
    ckpt = checkpoints.Checkpointer(directory)
    ckpt.save(3, state, resume.checkpoint_meta(_config("student"), fingerprint))
    ckpt.close()
    return network, ema, fingerprint


def test_init_checkpoint_starts_params_target_and_ema_exactly_from_the_guided_student(tmp_path):
    config = _config()
    config.training.init_checkpoint = str(tmp_path / "student")
    network, ema, fingerprint = _write_student(config, tmp_path / "student")
    mesh, tx = sharding.make_mesh(), train_state.optimizer(config)
    start = resume.load_start(config, fingerprint, mesh)
    state = update.init_state(config, network, tx, mesh, start=start)
    assert int(state.step) == 0 and state.target_params is not None
    for copy in (state.params, state.target_params, *state.ema_params):
        assert jax.tree.structure(copy) == jax.tree.structure(ema)
        for got, want in zip(jax.tree.leaves(copy), jax.tree.leaves(ema), strict=True):
            np.testing.assert_array_equal(got, want)
    plain = _config(guided=False)  # the unguided network: another fingerprint
    plain.training.init_checkpoint = config.training.init_checkpoint
    shapes = sample.abstract_params(plain, networks.build_network(plain))
    with pytest.raises(checkpoints.ModelMismatchError, match="LCF: model.guidance_embed_dim"):
        resume.load_start(plain, checkpoints.param_fingerprint(shapes), mesh)
