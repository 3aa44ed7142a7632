"""The digits-style FID's feature networks: small classifiers trained deterministically, cached.

No Inception weights exist offline, and Inception features of small grey images upsampled to
299 px say little, so the digits (8x8) and Fashion-MNIST (32x32) are scored in the penultimate
features of a small classifier trained on the dataset's 'train' split (its accuracy on the 'test'
split is reported). CLASSIFIERS holds one hyper-parameter entry per dataset.

A classifier is trained on the fly (seconds for the digits, minutes for Fashion-MNIST on a CPU)
and cached as an npz named by a hash of its hyper-parameters and training data, rather than
shipped as a weights file: training is a fixed function of the hyper-parameters (fixed init seed,
a fixed sequence of minibatches), so on one machine every evaluation uses the same weights.
Across machines and JAX versions float round-off may change the weights slightly, and with them
the third digit of a digits FID: compare FIDs computed with the same cache file (copy it to
share it).
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
from consistency.measure import metrics
from consistency.measure.digits_classifier import DigitsClassifier

# Every setting that changes the weights; the cache file name is a hash of them. The digits'
# entry predates 'dataset' and 'strides' (its defaults), so its cache name stays as it was.
HPARAMS = {
    "width": 32,  # first conv width (each later conv has twice as many)
    "features": 64,  # penultimate width: the dimension of the digits FID features
    "steps": 300,  # Adam steps
    "batch_size": 128,  # images per step (distinct within a step), drawn by numpy from the seed
    "lr": 1e-3,  # Adam learning rate
    "seed": 0,  # init and minibatch seed
}
# Fashion-MNIST padded to 32x32: one more stride-2 conv (32 -> 16 -> 8), about 3 epochs.
FASHION_HPARAMS = {
    "dataset": "fashion_mnist",
    "strides": [1, 2, 2],
    "width": 16,
    "features": 128,
    "steps": 1500,
    "batch_size": 128,
    "lr": 1e-3,
    "seed": 0,
}
CLASSIFIERS = {"digits": HPARAMS, "fashion_mnist": FASHION_HPARAMS}
INPUT_SHAPES = {"digits": (8, 8, 1), "fashion_mnist": (32, 32, 1)}  # uint8 HWC the network takes
EVAL_BATCH = 1000  # images per classifier call in accuracy(): bounded activations


def dataset_of(hparams: dict) -> str:
    name = hparams.get("dataset", "digits")
    if name not in INPUT_SHAPES:
        raise ValueError(
            f"unknown classifier dataset: {name!r}; choose one of {tuple(CLASSIFIERS)}"
        )
    return name


def _network(hparams: dict) -> DigitsClassifier:
    strides = tuple(hparams.get("strides", (1, 2)))
    return DigitsClassifier(width=hparams["width"], features=hparams["features"], strides=strides)


def _images_and_labels(split: str, dataset: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
    source = data.make_source(dataset, split=split, folder=folder)
    records = [source[i] for i in range(len(source))]
    images = np.stack([r["image"] for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return images, labels


def to_input(images_uint8) -> jax.Array:
    """uint8 [0, 255] NHWC -> float32 [-1, 1]: the training data's and the samples' scaling."""
    return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


def train(hparams: dict = HPARAMS, *, folder: str = "") -> dict:
    """Classifier params trained with Adam on minibatches of the 'train' split (cross-entropy).

    folder: where fashion_mnist's idx files are ('' = the Debian package's folder).
    """
    network = _network(hparams)
    images, labels = _images_and_labels("train", dataset_of(hparams), folder)
    x, y = to_input(images), jnp.asarray(labels)  # scaled outside the step: exact division
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


def logits_of(fn, images: np.ndarray) -> np.ndarray:
    """[N, classes] logits of uint8 images through a make_feature_fn, EVAL_BATCH at a time."""
    parts = [fn(images[i : i + EVAL_BATCH])["logits"] for i in range(0, len(images), EVAL_BATCH)]
    return np.concatenate([np.asarray(p) for p in parts])


def accuracy(
    params: dict, split: str = "test", hparams: dict = HPARAMS, *, folder: str = ""
) -> float:
    """Fraction of a split of the classifier's dataset that it labels correctly."""
    images, labels = _images_and_labels(split, dataset_of(hparams), folder)
    logits = logits_of(make_feature_fn(params, hparams), images)
    return metrics.class_accuracy(logits, labels)


@functools.cache
def data_digest(dataset: str = "digits", folder: str = "") -> str:
    """A digest of a classifier's training data (the 'train' split's images and labels)."""
    images, labels = _images_and_labels("train", dataset, folder)
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]


def cache_path(
    cache_dir: str | pathlib.Path, hparams: dict = HPARAMS, *, folder: str = ""
) -> pathlib.Path:
    """cache_dir/{dataset}_classifier-{hash of the hyper-parameters and training data}.npz."""
    dataset = dataset_of(hparams)
    keyed = {"hparams": hparams, "data": data_digest(dataset, folder)}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    return pathlib.Path(cache_dir) / f"{dataset}_classifier-{key}.npz"


def params_digest(params: dict) -> str:
    """A digest of the classifier's weights: what the features cached from it depend on."""
    h = hashlib.sha256()
    for name, value in sorted(traverse_util.flatten_dict(params, sep="/").items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(value, np.float32).tobytes())
    return h.hexdigest()[:16]


def load_or_train(
    cache_dir: str | pathlib.Path, hparams: dict = HPARAMS, *, folder: str = ""
) -> dict:
    """The cached params for these hyper-parameters, training (and caching) them when absent."""
    path = cache_path(cache_dir, hparams, folder=folder)
    if path.exists():
        with np.load(path) as stored:
            return traverse_util.unflatten_dict({k: stored[k] for k in stored.files}, sep="/")
    params = train(hparams, folder=folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **traverse_util.flatten_dict(params, sep="/"))
    tmp.replace(path)
    return params


def make_feature_fn(params: dict, hparams: dict = HPARAMS):
    """images (uint8 NHWC, INPUT_SHAPES of the dataset) -> {"features" [B, D], "logits"
    [B, 10]}, jitted.

    The params are an argument of the jitted function (buffers, not constants of the program).
    """
    network = _network(hparams)
    dataset = dataset_of(hparams)
    apply = jax.jit(lambda p, images: network.apply({"params": p}, to_input(images)))
    frozen = jax.tree.map(jnp.asarray, params)

    def fn(images):
        if tuple(images.shape[1:]) != INPUT_SHAPES[dataset]:
            raise ValueError(
                f"the {dataset} classifier takes {INPUT_SHAPES[dataset]} images, got {images.shape}"
            )
        return apply(frozen, images)

    return fn


def classifier(
    dataset: str, cache_dir: str | pathlib.Path, *, folder: str = "", hparams: dict | None = None
):
    """make_feature_fn of the cached (else trained) classifier of `dataset` (CLASSIFIERS): its
    "logits" give metrics.class_accuracy, its "features" the FID."""
    if dataset not in CLASSIFIERS:
        raise ValueError(f"no classifier for {dataset!r}; choose one of {tuple(CLASSIFIERS)}")
    hparams = CLASSIFIERS[dataset] if hparams is None else hparams
    if dataset_of(hparams) != dataset:
        raise ValueError(f"hparams of a {dataset_of(hparams)!r} classifier for {dataset!r}")
    return make_feature_fn(load_or_train(cache_dir, hparams, folder=folder), hparams)
