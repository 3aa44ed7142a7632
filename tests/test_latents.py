"""Latent datasets: encoded once in resumable shards, equal to encoding everything at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency.io import latents as L
from consistency.models.autoencoder_kl import AutoencoderKL

N, SIDE = 11, 8
IDENTITY = {"autoencoder": "tiny-random", "mode": "mean"}


class ListSource:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


@pytest.fixture(scope="module")
def setup():
    model = AutoencoderKL(
        block_out_channels=(8, 8), norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, SIDE, SIDE, 3), dtype=np.uint8)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 3)))
    x = images.astype(np.float32) / 127.5 - 1.0
    posterior = jax.jit(lambda p: model.apply(p, x, method="encode"))(params)
    source = ListSource(images, np.arange(N, dtype=np.int32) % 3)
    return dict(model=model, params=params, source=source, posterior=posterior)


def _encode(setup, out, *, sample=False, batch_size=3, encode=None, **kw):
    encode = encode or L.latent_encoder(setup["model"], setup["params"], sample=sample, seed=4)
    identity = {**IDENTITY, "mode": "sample" if sample else "mean"}
    kw = {"shard_size": 4, "log": lambda s: None, **kw}
    folder = L.encode_dataset(
        setup["source"], encode, out, identity=identity, batch_size=batch_size, **kw
    )
    return L.LatentSource(folder)


def test_mean_latents_equal_encoding_at_once(setup, tmp_path):
    got = _encode(setup, tmp_path)
    want = setup["model"].scale_latents(setup["posterior"].mean)
    assert len(got) == N and got.latents.shape == (N, SIDE // 2, SIDE // 2, 4)
    np.testing.assert_allclose(got.latents, want, atol=1e-5)
    np.testing.assert_array_equal(got.labels, setup["source"].labels)
    assert got[3]["label"] == 0 and got[3]["latent"].shape == (4, 4, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [L.LABELS, L.LATENTS, L.META]


def test_sampled_latents_use_per_example_noise(setup, tmp_path):
    a = _encode(setup, tmp_path / "a", sample=True, batch_size=3).latents
    b = _encode(setup, tmp_path / "b", sample=True, batch_size=5).latents
    np.testing.assert_allclose(a, b, atol=1e-5)  # independent of the batch size
    posterior, model = setup["posterior"], setup["model"]
    noise = (model.unscale_latents(a) - posterior.mean) / posterior.std
    key = jax.random.key(4)
    want = jax.random.normal(jax.random.fold_in(key, 7), noise.shape[1:])
    np.testing.assert_allclose(noise[7], want, atol=1e-3)
    assert np.abs(noise).max() > 1.0  # a sample, not the mean


def test_interrupted_run_resumes_from_finished_shards(setup, tmp_path):
    encode = L.latent_encoder(setup["model"], setup["params"], sample=True, seed=4)
    calls = []

    def failing(images, ids):
        if len(calls) == 3:  # shard 0 is two batches: fail inside shard 1
            raise RuntimeError("preempted")
        calls.append(ids)
        return encode(images, ids)

    with pytest.raises(RuntimeError, match="preempted"):
        _encode(setup, tmp_path, sample=True, encode=failing)
    assert [p.name for p in sorted(tmp_path.glob("shard_*"))] == ["shard_00000000-00000004.npz"]
    calls.clear()
    resumed = _encode(setup, tmp_path, sample=True, encode=failing).latents
    assert min(int(c.min()) for c in calls) == 4  # shard 0 was not encoded again
    whole = _encode(setup, tmp_path / "whole", sample=True).latents
    np.testing.assert_allclose(resumed, whole, atol=1e-6)


def test_a_folder_of_another_encoding_is_refused(setup, tmp_path):
    _encode(setup, tmp_path)
    with pytest.raises(ValueError, match="mode: 'mean' there, 'sample' now"):
        _encode(setup, tmp_path, sample=True)
    with pytest.raises(ValueError, match="shard_size"):
        _encode(setup, tmp_path, shard_size=5)
    with pytest.raises(FileNotFoundError, match="run the encoding first"):
        L.LatentSource(tmp_path / "nothing")
