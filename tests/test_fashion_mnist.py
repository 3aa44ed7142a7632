"""Fashion-MNIST's idx reader, padding and labels; data.classes; its classifier at 32x32.

Synthetic idx files in tmp_path stand for Debian's dataset-fashion-mnist, so nothing here needs
the package installed.
"""

import gzip
import struct

import numpy as np
import pytest

from configs import base
from consistency.experiment import evaluate, sample, sampling_spec, spec
from consistency.io import data, fashion_mnist, sharding
from consistency.measure import digits, metrics

TINY = dict(digits.FASHION_HPARAMS, width=4, features=8, steps=2, batch_size=8)


def write_idx(path, array: np.ndarray) -> None:
    """An idx file: 0, 0, type code, ndim, big-endian uint32 dimensions, big-endian data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    raw = header + np.ascontiguousarray(array).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def fake_fashion(folder, n_train: int = 24, n_test: int = 12):
    """The four idx .gz files of a tiny Fashion-MNIST: image k is filled with 10 * label + 5
    inside its 28x28 frame, labels k mod 10; returns {split: (images, labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.repeat(10 * labels + 5, 28 * 28).reshape(n, 28, 28).astype(np.uint8)
        images[:, 0, 0] = 255  # a corner pixel, to see where the padding put it
        names = fashion_mnist.FILES[split]
        write_idx(folder / names[0], images)
        write_idx(folder / names[1], labels)
        out[split] = images, labels
    return out


def test_idx_round_trip_and_a_bad_magic(tmp_path):
    for name, array in [
        ("a.gz", np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
        ("b", np.arange(-3, 3, dtype=">i4")),
        ("c.gz", np.linspace(0, 1, 6, dtype=">f4").reshape(3, 2)),
    ]:
        write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / name), array)
    (tmp_path / "bad").write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="not an idx file"):
        fashion_mnist.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="2 data bytes"):
        fashion_mnist.read_idx(tmp_path / "short")


def test_the_source_pads_to_32_and_keeps_labels(tmp_path):
    stored = fake_fashion(tmp_path)
    for split, (images, labels) in stored.items():
        source = data.make_source("fashion_mnist", split=split, folder=str(tmp_path))
        assert len(source) == len(images)
        for k in (0, 7, len(images) - 1):
            record = source[k]
            image = record["image"]
            assert image.shape == (32, 32, 1) and image.dtype == np.uint8
            np.testing.assert_array_equal(image[2:30, 2:30, 0], images[k])
            border = np.ones((32, 32), bool)
            border[2:30, 2:30] = False
            assert not image[border].any()  # zeros: the background
            assert int(record["label"]) == labels[k]
    with pytest.raises(ValueError, match="choose train or test"):
        data.make_source("fashion_mnist", split="all", folder=str(tmp_path))


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.make_source("fashion_mnist", folder=str(tmp_path / "nowhere"))
    message = str(e.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.folder" in message
    assert "train-images-idx3-ubyte.gz" in message


def test_class_filter_keeps_only_those_labels_in_any_source(tmp_path):
    fake_fashion(tmp_path)
    whole = data.make_source("fashion_mnist", folder=str(tmp_path))
    part = data.make_source("fashion_mnist", folder=str(tmp_path), classes=(3, 8))
    assert len(part) == 5  # of 24 labels k mod 10: 3, 13, 23 and 8, 18
    assert sorted({int(part[i]["label"]) for i in range(len(part))}) == [3, 8]
    np.testing.assert_array_equal(part[1]["image"], whole[8]["image"])  # order kept
    assert data.filter_classes(whole, ()) is whole
    digits_part = data.make_source("digits", classes=(0,))
    assert len(digits_part) > 100 and set(digits_part.labels) == {0}
    records = [{"image": np.zeros((2, 2, 1), np.uint8), "label": k % 3} for k in range(6)]
    assert [r["label"] for r in data.filter_classes(records, (2,))] == [2, 2]  # read per record
    with pytest.raises(ValueError, match="no record"):
        data.filter_classes(records, (7,))


def _problems(**updates):
    config = base.get_config()
    for key, value in updates.items():
        section, name = key.split("__")
        config[section][name] = value
    return spec.problems(config, mode="eval")


def test_classes_and_features_are_validated_in_one_line_each():
    assert not _problems(data__classes=(0, 4, 9))
    for bad in [(10,), (-1,), (2, 2)]:
        (line,) = [p for p in _problems(data__classes=bad) if p.startswith("data.classes")]
        assert "distinct labels in [0, data.num_classes=10)" in line
    assert not _problems(data__classes=(1, 2), data__class_conditional=True)
    config = base.get_config()
    config.data.update(name="fashion_mnist", image_size=32, classes=(0, 1))
    config.eval.features = "fashion_mnist"
    assert not spec.problems(config, mode="eval")
    config.data.split = "all"
    assert spec.problems(config, mode="eval") == [
        "data.split='all': fashion_mnist has 'train' and 'test'"
    ]
    config.data.update(split="train", image_size=8)
    (line,) = spec.problems(config, mode="eval")
    assert line.startswith("eval.features='fashion_mnist': its classifier takes 32x32x1 images")


def test_class_accuracy():
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    assert metrics.class_accuracy(logits, np.array([0, 1, 2, 2])) == 0.75
    with pytest.raises(ValueError, match="logits"):
        metrics.class_accuracy(logits, np.array([0, 1]))


def test_the_classifier_at_32x32_caches_and_gives_features_and_logits(tmp_path):
    fake_fashion(tmp_path / "data")
    folder = str(tmp_path / "data")
    fn = digits.classifier("fashion_mnist", tmp_path / "cache", folder=folder, hparams=TINY)
    (path,) = (tmp_path / "cache").glob("*.npz")
    assert path.name.startswith("fashion_mnist_classifier-")
    assert path == digits.cache_path(tmp_path / "cache", TINY, folder=folder)
    images = data.make_source("fashion_mnist", split="test", folder=folder)
    batch = np.stack([images[k]["image"] for k in range(5)])
    out = fn(batch)
    assert out["features"].shape == (5, 8) and out["logits"].shape == (5, 10)
    assert np.isfinite(np.asarray(out["logits"])).all()
    with pytest.raises(ValueError, match=r"takes \(32, 32, 1\) images"):
        fn(np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="hparams of a 'fashion_mnist' classifier"):
        digits.classifier("digits", tmp_path / "cache", hparams=TINY)
    params = digits.load_or_train(tmp_path / "cache", TINY, folder=folder)
    assert 0.0 <= digits.accuracy(params, "test", TINY, folder=folder) <= 1.0


def test_eval_scores_fashion_mnist_with_its_classifier(tmp_path, monkeypatch):
    """eval.features='fashion_mnist' picks its classifier; the reference is of data.classes;
    class-conditional samples get a class accuracy."""
    monkeypatch.setitem(digits.CLASSIFIERS, "fashion_mnist", TINY)
    fake_fashion(tmp_path / "data")
    config = base.get_config()
    config.data.update(name="fashion_mnist", image_size=32, folder=str(tmp_path / "data"))
    config.data.update(classes=(1, 2, 3), class_conditional=True)
    config.eval.update(features="fashion_mnist", batch_size=8, reference_limit=0)
    mesh = sharding.make_mesh()
    extract = evaluate.make_extractor(config, evaluate.cache_dir(config, tmp_path))
    assert list((tmp_path / "eval" / "cache").glob("fashion_mnist_classifier-*.npz"))
    ref, name = evaluate.reference(config, tmp_path, extract, mesh, "fashion_mnist")
    assert name == "fashion_mnist:train, classes (1, 2, 3)" and ref["pool"].shape == (9, 8)
    test = evaluate.split_features(config, "test", extract, mesh)
    labels = data.make_source(
        "fashion_mnist", split="test", folder=config.data.folder, classes=(1, 2, 3)
    ).labels
    assert len(test["pool"]) == len(labels) == 4  # 1, 2, 3, 1 of labels k mod 10, k < 12
    result = evaluate.score(
        test,
        ref,
        kind="fashion_mnist",
        labels=evaluate.class_labels(config, "fashion_mnist", labels),
    )
    assert np.isfinite(result["fid"]) and 0.0 <= result["class_accuracy"] <= 1.0
    config.data.class_conditional = False
    assert evaluate.class_labels(config, "fashion_mnist", labels) is None


def test_vae_fashion_trains_encode_then_data_classes_pick_latents(tmp_path):
    """configs/vae_fashion.py (tiny widths) trains 2 steps on the 32x32 images and exports its
    vae/; latent_fashion's --mode=encode encodes every class once; data.classes then selects
    the training latents of those labels from the one cache."""
    from configs import latent_fashion, vae_fashion
    from consistency.experiment import encode, latent, train

    stored = fake_fashion(tmp_path / "data")
    config = vae_fashion.get_config()
    config.data.update(folder=str(tmp_path / "data"), num_threads=1)
    config.model.autoencoder_kl.update(block_out_channels=(8, 8, 8), norm_num_groups=4)
    config.training.update(batch_size=8, num_steps=2, log_every=1, snapshot_every=2)
    config.sampling.grid_size = 8
    train.train_and_evaluate(config, str(tmp_path / "vae_run"))
    user = latent_fashion.get_config()
    user.data.folder = str(tmp_path / "data")
    user.latent.update(vae=str(tmp_path / "vae_run"), batch_size=8)
    assert latent.latent_shape(user) == (8, 4) and not latent.shape_problems(user)
    encode.run(user, str(tmp_path / "latent_run"))
    every = latent.training_source(user, str(tmp_path / "latent_run"))
    np.testing.assert_array_equal(every.labels, stored["train"][1])
    user.data.classes = (1, 2)
    part = latent.training_source(user, str(tmp_path / "latent_run"))
    assert len(part) == 6 and {int(part[i]["label"]) for i in range(6)} == {1, 2}
    assert part[0]["latent"].shape == (8, 8, 4)


def test_random_sample_labels_come_from_data_classes():
    """FID samples of a class subset draw their labels from data.classes (the reference's)."""
    config = base.get_config()
    config.data.update(class_conditional=True, num_classes=10, classes=(3, 7))
    labels = sample.sample_labels(config, np.arange(400))
    assert set(labels.tolist()) == {3, 7} and 150 < (labels == 3).sum() < 250
    config.data.classes = ()
    assert len(set(sample.sample_labels(config, np.arange(400)).tolist())) == 10
    config.sampling.class_label = 5
    assert set(sample.sample_labels(config, np.arange(10)).tolist()) == {5}


def test_eval_shards_are_keyed_by_data_classes(monkeypatch, tmp_path):
    """Samples of another class subset are never reused: the shard folder's hash covers
    data.classes."""
    monkeypatch.setattr(evaluate, "feature_network_id", lambda *a: "net")
    config = base.get_config()
    config.data.update(class_conditional=True, num_classes=10)
    sampler = sampling_spec.sampler(config, "1")

    def folder(classes):
        config.data.classes = classes
        return evaluate._setting_dir(config, tmp_path, 5, "1", sampler, "digits", "ckpt")

    plain, clothes, shoes = folder(()), folder((0, 1, 2)), folder((5, 7))
    assert len({plain, clothes, shoes}) == 3 and folder((0, 1, 2)) == clothes
