"""The network builder and the configured distances (LPIPS inside the jitted step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from consistency.experiment import networks, train, train_state, update
from consistency.io import data, sharding, torch_pt
from consistency.measure import lpips as lp
from consistency.measure.vgg import VGG16_CONVS, VGG16_TAP_CHANNELS


def _random_state_dicts(seed=0):
    """torchvision-VGG16- and LPIPS-v0.1-shaped state dicts: He-scaled convs, non-negative heads."""
    rng = np.random.default_rng(seed)
    vgg, cin = {}, 3
    for index, channels in VGG16_CONVS:
        std = np.sqrt(2.0 / (9 * cin))
        vgg[f"features.{index}.weight"] = rng.normal(0, std, (channels, cin, 3, 3)).astype("f4")
        vgg[f"features.{index}.bias"] = rng.normal(0, 0.01, (channels,)).astype("f4")
        cin = channels
    lin = {
        f"lin{k}.model.1.weight": rng.uniform(0, 0.1, (1, c, 1, 1)).astype("f4")
        for k, c in enumerate(VGG16_TAP_CHANNELS)
    }
    return vgg, lin


@pytest.fixture
def lpips_config(tmp_path, monkeypatch):
    """configs/test.py with distance lpips; the .pth reader returns random state dicts."""
    vgg, lin = _random_state_dicts()
    files = {tmp_path / "vgg16.pth": vgg, tmp_path / "vgg_lin.pth": lin}
    for path in files:
        path.write_bytes(b"")
    monkeypatch.setattr(torch_pt, "load_torch_state_dict", lambda p: files[type(tmp_path)(p)])
    config = test_config.get_config()
    config.training.update(
        distance="lpips",
        lpips_vgg=str(tmp_path / "vgg16.pth"),
        lpips_lin=str(tmp_path / "vgg_lin.pth"),
        lpips_resize=32,
    )
    return config, lp.lpips_params_from_torch(vgg, lin)


def _images(seed, channels=1, size=8, batch=2):
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, channels), minval=-1)


def test_lpips_distance_from_the_configured_files(lpips_config):
    config, params = lpips_config
    distance = networks.distance_fn(config)
    assert isinstance(distance, jax.tree_util.Partial)
    assert len(jax.tree.leaves(distance)) == 2 * len(VGG16_CONVS) + len(VGG16_TAP_CHANNELS)
    x, y = _images(1), _images(2)
    # Grey digits are repeated to RGB, then upsampled to training.lpips_resize.
    rgb = lambda v: lp.resize_for_lpips(jnp.repeat(v, 3, axis=-1), 32)
    expected = lp.lpips_distance(params, rgb(x), rgb(y), resize=False)
    got = jax.jit(lambda d, x, y: d(x, y))(distance, x, y)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got.shape == (2,) and np.all(np.asarray(got) > 0)
    np.testing.assert_allclose(distance(x, x), 0.0, atol=1e-6)


def test_lpips_pooling_option(lpips_config):
    config, params = lpips_config
    x, y = _images(1, channels=3), _images(2, channels=3)
    config.training.lpips_pool = "avg"
    avg = networks.distance_fn(config, lpips_params=params)(x, y)
    expected = lp.lpips_distance(
        params, lp.resize_for_lpips(x, 32), lp.resize_for_lpips(y, 32), pool="avg", resize=False
    )
    np.testing.assert_allclose(avg, expected, rtol=1e-5)
    config.training.lpips_pool = "max"
    assert not np.allclose(networks.distance_fn(config, lpips_params=params)(x, y), avg)
    config.training.lpips_pool = "mean"
    with pytest.raises(ValueError, match="training.lpips_pool.*'max', 'avg'"):
        networks.distance_fn(config, lpips_params=params)


def test_missing_lpips_weights_name_the_keys(lpips_config, tmp_path):
    config, _ = lpips_config
    config.training.lpips_lin = ""
    with pytest.raises(ValueError, match="needs training.lpips_lin"):
        networks.distance_fn(config)
    config.training.lpips_vgg = ""
    with pytest.raises(
        ValueError, match=r"lpips_vgg: give the torchvision VGG16[^\n]*\n.*lpips_lin"
    ):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    config.training.update(lpips_vgg="/no/such/vgg.pth", lpips_lin="/no/such/lin.pth")
    with pytest.raises(FileNotFoundError, match="training.lpips_vgg: no such file"):
        networks.distance_fn(config)


def test_ct_step_with_lpips_on_digits(lpips_config):
    """One CT step of the train loop's jitted step on 1-channel digits with LPIPS: a finite loss,
    and the frozen VGG16 params enter as arguments (a small program), not as constants."""
    config, _ = lpips_config
    config.training.lpips_resize = 16  # VGG16 reaches relu5_3 at 1x1; compiles fast on CPU
    network, tx = networks.build_network(config), train_state.optimizer(config)
    mesh = sharding.make_mesh()
    state = update.init_state(config, network, tx, mesh)
    step = update.train_step_for(config, network, tx, mesh)
    source = data.DigitsSource("train")
    batch = next(
        data.make_batches(
            source,
            seed=0,
            local_batch=16,
            image_size=8,
            num_channels=1,
            random_flip=False,
            num_threads=1,
        )
    )
    batches = sharding.global_array(
        {k: batch[k][None] for k in ("image", "label")}, sharding.stacked_batch_sharding(mesh)
    )
    distance = networks.distance_fn(config)
    lowered = step.lower(state, batches, None, distance, jax.random.key(0))
    # VGG16's 14.7M weights as constants would take hundreds of MB of program text.
    assert len(lowered.as_text()) < 5_000_000
    new_state, metrics = lowered.compile()(state, batches, None, distance, jax.random.key(0))
    assert int(new_state.step) == 1 and bool(metrics["finite"])
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
