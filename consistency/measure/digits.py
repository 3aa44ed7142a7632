"""The digits FID's feature network: a digits classifier trained deterministically, cached by key.

No Inception weights exist offline, and Inception features of 8x8 grey digits upsampled to 299 px
say little, so the digits are scored in the penultimate features of a small classifier trained
on the DigitsSource 'train' split (its accuracy on the 'test' split is reported).

The classifier is trained on the fly (a few seconds on a CPU) and cached as an npz named by a
hash of its hyper-parameters, rather than shipped as a weights file: training is a fixed function
of the hyper-parameters (fixed init seed, a fixed sequence of minibatches), so on one machine
every evaluation uses the same weights. Across machines and JAX versions float round-off may
change the weights slightly, and with them the third digit of a digits FID: compare digits FIDs
computed with the same cache file (copy it to share it).
"""

import functools
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from consistency.io import data
from consistency.measure.digits_classifier import DigitsClassifier

# Every setting that changes the weights; the cache file name is a hash of them.
HPARAMS = {
    "width": 32,  # first conv width (the second has twice as many)
    "features": 64,  # penultimate width: the dimension of the digits FID features
    "steps": 300,  # Adam steps
    "batch_size": 128,  # images per step (distinct within a step), drawn by numpy from the seed
    "lr": 1e-3,  # Adam learning rate
    "seed": 0,  # init and minibatch seed
}


def _network(hparams: dict) -> DigitsClassifier:
    return DigitsClassifier(width=hparams["width"], features=hparams["features"])


def _images_and_labels(split: str) -> tuple[np.ndarray, np.ndarray]:
    source = data.DigitsSource(split)
    records = [source[i] for i in range(len(source))]
    images = np.stack([r["image"] for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return images, labels


def to_input(images_uint8) -> jax.Array:
    """uint8 [0, 255] NHWC -> float32 [-1, 1]: the training data's and the samples' scaling."""
    return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


def train(hparams: dict = HPARAMS) -> dict:
    """Classifier params trained with Adam on minibatches of the 'train' split (cross-entropy)."""
    network = _network(hparams)
    images, labels = _images_and_labels("train")
    x, y = to_input(images), jnp.asarray(labels)
    rng = np.random.default_rng(hparams["seed"])
    batches = np.stack(
        [rng.choice(len(x), hparams["batch_size"], replace=False) for _ in range(hparams["steps"])]
    )
    params = network.init(jax.random.key(hparams["seed"]), x[:1])["params"]
    tx = optax.adam(hparams["lr"])
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, index):
        def loss(p):
            logits = network.apply({"params": p}, x[index])["logits"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[index]).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for index in batches:
        params, opt_state = step(params, opt_state, jnp.asarray(index))
    return jax.device_get(params)


def accuracy(params: dict, split: str = "test", hparams: dict = HPARAMS) -> float:
    """Fraction of a DigitsSource split the classifier labels correctly."""
    images, labels = _images_and_labels(split)
    logits = make_feature_fn(params, hparams)(images)["logits"]
    return float(np.mean(np.argmax(np.asarray(logits), axis=1) == labels))


@functools.cache
def data_digest() -> str:
    """A digest of the training data (the 'train' split's images and labels)."""
    images, labels = _images_and_labels("train")
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]


def cache_path(cache_dir: str | pathlib.Path, hparams: dict = HPARAMS) -> pathlib.Path:
    """cache_dir/digits_classifier-{hash of the hyper-parameters and training data}.npz."""
    keyed = {"hparams": hparams, "data": data_digest()}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    return pathlib.Path(cache_dir) / f"digits_classifier-{key}.npz"


def params_digest(params: dict) -> str:
    """A digest of the classifier's weights: what the features cached from it depend on."""
    h = hashlib.sha256()
    for name, value in sorted(traverse_util.flatten_dict(params, sep="/").items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(value, np.float32).tobytes())
    return h.hexdigest()[:16]


def load_or_train(cache_dir: str | pathlib.Path, hparams: dict = HPARAMS) -> dict:
    """The cached params for these hyper-parameters, training (and caching) them when absent."""
    path = cache_path(cache_dir, hparams)
    if path.exists():
        with np.load(path) as stored:
            return traverse_util.unflatten_dict({k: stored[k] for k in stored.files}, sep="/")
    params = train(hparams)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **traverse_util.flatten_dict(params, sep="/"))
    tmp.replace(path)
    return params


def make_feature_fn(params: dict, hparams: dict = HPARAMS):
    """images (uint8 NHWC 8x8x1) -> {"features" [B, D], "logits" [B, 10]}, jitted.

    The params are an argument of the jitted function (buffers, not constants of the program).
    """
    network = _network(hparams)
    apply = jax.jit(lambda p, images: network.apply({"params": p}, to_input(images)))
    frozen = jax.tree.map(jnp.asarray, params)

    def fn(images):
        if tuple(images.shape[1:]) != (8, 8, 1):
            raise ValueError(f"the digits classifier takes 8x8x1 images, got {images.shape}")
        return apply(frozen, images)

    return fn
