"""ImageNet's label order and ADM's preprocessing; the offline preparation of the datasets."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from consistency.io import data, imagenet, prepare


def test_sorted_wnids_are_the_cm_class_order_and_resized_labels_are_remapped():
    wnids = imagenet.sorted_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"  # tench ... toilet tissue
    table = imagenet.resized_to_sorted()
    assert sorted(table.tolist()) == list(range(1000))  # a permutation
    resized = imagenet.resized_wnids()
    assert all(resized[k] == wnids[table[k]] for k in range(1000))
    # The two orders share almost no position: conditioning a cm model on the raw
    # imagenet_resized label names another class for nearly every image.
    assert np.sum(table == np.arange(1000)) < 10


def test_remapped_source_changes_only_labels():
    source = [{"image": np.zeros((2, 2, 3), np.uint8), "label": np.int32(k)} for k in range(3)]
    remapped = imagenet.RemappedLabels(source, np.array([5, 7, 9]))
    assert len(remapped) == 3 and [int(remapped[k]["label"]) for k in range(3)] == [5, 7, 9]
    assert source[1]["label"] == 1


def _adm_by_hand(image: Image.Image, size: int) -> np.ndarray:
    """ADM's recipe written out independently: 2x2 box means in numpy while the short side is
    >= 2 size (the test images have even sides there; PIL filters rows, rounds to uint8, then
    columns), PIL bicubic to the short side, centre crop."""
    arr = np.asarray(image.convert("RGB"), np.float64)
    while min(arr.shape[:2]) >= 2 * size:
        h, w = arr.shape[0] // 2, arr.shape[1] // 2
        rows = np.floor(arr[:, : 2 * w].reshape(-1, w, 2, 3).mean(axis=2) + 0.5)
        arr = np.floor(rows[: 2 * h].reshape(h, 2, w, 3).mean(axis=1) + 0.5)
    small = Image.fromarray(arr.astype(np.uint8))
    scale = size / min(small.size)
    small = small.resize(tuple(round(x * scale) for x in small.size), Image.BICUBIC)
    out = np.asarray(small)
    top, left = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
    return out[top : top + size, left : left + size]


def test_adm_center_crop_matches_the_recipe_on_synthetic_full_size_images():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:384, 0:512]
    smooth = np.stack([(127 + 100 * np.sin((x + 2 * y) / (17 + 9 * c))) for c in range(3)], -1)
    images = [
        Image.fromarray(smooth.astype(np.uint8)),  # 512 x 384: two halvings, then bicubic
        Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)),  # one halving
        Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)),  # upsampled
    ]
    for image in images:
        got = imagenet.adm_center_crop(image, 64)
        assert got.shape == (64, 64, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - _adm_by_hand(image, 64).astype(int))
        assert diff.max() == 0, diff.max()


def _cifar_tarball(path, per_batch=2):
    rng = np.random.default_rng(1)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"]
    names.append("truck")
    batches = {}
    with tarfile.open(path, "w:gz") as tar:

        def add(name, obj):
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        add("batches.meta", {b"label_names": [n.encode() for n in names]})
        for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
            pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, per_batch).tolist()
            batches[name] = (pixels, labels)
            add(name, {b"data": pixels, b"labels": labels})
    return names, batches


def test_cifar10_from_the_python_tarball_keeps_pixels_and_labels(tmp_path):
    names, batches = _cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    record = prepare.prepare("cifar10", tmp_path / "cifar-10-python.tar.gz", tmp_path / "c10")
    assert record["images"] == 10 and record["written"] == 10
    source = data.make_source("cifar10", folder=str(tmp_path / "c10"))  # as configs name it
    assert isinstance(source, data.ImageFolderSource)
    got = {}
    for k in range(len(source)):
        got[source._files[k].stem] = source[k]
    pixels, labels = batches["data_batch_2"]
    item = got[f"{names[labels[1]]}_data_batch_2-00001"]
    np.testing.assert_array_equal(item["image"], pixels[1].reshape(3, 32, 32).transpose(1, 2, 0))
    # The folder's classes are the present label names, sorted: CIFAR-10's label order.
    train = [name for name in batches if name != "test_batch"]
    present = sorted({names[v] for name in train for v in batches[name][1]})
    assert int(item["label"]) == present.index(names[labels[1]])
    again = prepare.prepare("cifar10", tmp_path / "cifar-10-python.tar.gz", tmp_path / "c10")
    assert again["written"] == 0 and again["skipped_existing"] == 10  # resumable


def test_imagenet_from_the_train_tar_is_resized_and_labelled_by_sorted_wnid(tmp_path):
    wnids = ["n01440764", "n15075141"]
    rng = np.random.default_rng(2)
    with tarfile.open(tmp_path / "train.tar", "w") as outer:
        for wnid in wnids:
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for k in range(2):
                    buf = io.BytesIO()
                    pixels = rng.integers(0, 256, (150 + 10 * k, 200, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(buf, format="PNG")
                    info = tarfile.TarInfo(f"{wnid}_{k}.JPEG")
                    info.size = buf.tell()
                    buf.seek(0)
                    inner.addfile(info, buf)
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = inner_bytes.tell()
            inner_bytes.seek(0)
            outer.addfile(info, inner_bytes)
    assert prepare.main(["--dataset=imagenet64", f"--source={tmp_path / 'train.tar'}",
                         f"--out={tmp_path / 'in64'}"]) == 0  # fmt: skip
    source = imagenet.PreparedImageNet(str(tmp_path / "in64"))
    assert len(source) == 4
    labels = sorted(int(source[k]["label"]) for k in range(4))
    assert labels == [0, 0, 999, 999]  # the global sorted-WNID indices, not 0/1
    assert all(source[k]["image"].shape == (64, 64, 3) for k in range(4))
    meta = json.loads((tmp_path / "in64" / "prepared.json").read_text())
    assert meta["classes"] == 2 and meta["image_size"] == 64


def test_unprepared_folder_names_the_command(tmp_path):
    try:
        imagenet.PreparedImageNet(str(tmp_path))
    except FileNotFoundError as e:
        assert "python -m consistency.io.prepare --dataset=imagenet64" in str(e)
    else:
        raise AssertionError("an unprepared folder was accepted")
    assert prepare.main(["--dataset=cifar10", "--source=/no/such.tar.gz", "--out=x"]) == 2


def test_chrabaszcz_source_remaps_labels_to_sorted_wnids(capsys):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=8):
        raw = tfds.data_source("imagenet_resized/64x64", split="train")
        source = data.make_source("imagenet64_chrabaszcz", split="train")
        table = imagenet.resized_to_sorted()
        for k in range(len(raw)):
            assert int(source[k]["label"]) == table[int(raw[k]["label"])]
    assert "not comparable with ADM's reference batch" in capsys.readouterr().out


def test_imagenet64_without_a_prepared_folder_names_the_command():
    try:
        data.make_source("imagenet64", folder="")
    except FileNotFoundError as e:
        assert "consistency.io.prepare --dataset=imagenet64" in str(e)
    else:
        raise AssertionError("an unprepared ImageNet was accepted")


def test_training_crop_is_adm_crop_and_keeps_grey_images_grey():
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        data.center_crop(rgb, 32), imagenet.adm_center_crop(Image.fromarray(rgb), 32)
    )
    grey = rng.integers(0, 256, (40, 50, 1), dtype=np.uint8)
    out = data.center_crop(grey, 16)
    assert out.shape == (16, 16, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(
        out[..., 0], imagenet.adm_center_crop(Image.fromarray(grey[..., 0]), 16)[..., 0]
    )
    already = grey[:16, :16]
    assert data.center_crop(already, 16) is already


def test_unprepared_tfds_dataset_names_the_command_and_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="consistency.io.prepare --dataset=cifar10"):
        data.make_source("cifar10", data_dir=str(tmp_path))
    assert not any(tmp_path.rglob("*.tar.gz"))  # nothing was fetched into the data_dir
