"""How long `python -m consistency.io.prepare` takes and how much it writes, per dataset.

    python benchmarks/prepare_speed.py [--images 200]

No dataset can be downloaded here, so the sources are built from natural photographs (the two
sample images shipped with scikit-learn, 427x640): random crops of ImageNet's typical sizes as
JPEGs in ILSVRC2012's tar-of-tars layout, LSUN-style JPEG folders, and a CIFAR-10 python-pickle
tarball of 32x32 crops. It prints images/s, bytes per written PNG, and the extrapolation to each
full dataset (one process; the command is single-threaded).
"""

import argparse
import io
import pickle
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from consistency.io import imagenet, prepare

FULL_SIZES = {"cifar10": 50_000, "imagenet64": 1_281_167, "lsun_bedroom": 3_033_042}


def _crops(count: int, rng: np.random.Generator, sizes: list[tuple[int, int]]):
    photos = load_sample_images().images
    for k in range(count):
        photo = photos[k % len(photos)]
        h, w = sizes[k % len(sizes)]
        h, w = min(h, photo.shape[0]), min(w, photo.shape[1])
        top = rng.integers(0, photo.shape[0] - h + 1)
        left = rng.integers(0, photo.shape[1] - w + 1)
        crop = photo[top : top + h, left : left + w]
        yield crop[:, ::-1] if k % 2 else crop


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def imagenet_tar(path: Path, count: int, rng) -> None:
    """ILSVRC2012_img_train.tar's layout: one tar per WNID holding JPEGs (375x500 and others)."""
    wnids = imagenet.sorted_wnids()[:: max(1, 1000 // 10)][:10]
    crops = list(_crops(count, rng, [(375, 500), (333, 500), (500, 375), (427, 640)]))
    with tarfile.open(path, "w") as outer:
        for c, wnid in enumerate(wnids):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for k, crop in enumerate(crops[c :: len(wnids)]):
                    _add(inner, f"{wnid}_{k}.JPEG", _jpeg(crop))
            _add(outer, f"{wnid}.tar", inner_bytes.getvalue())


def lsun_folder(path: Path, count: int, rng) -> None:
    """LSUN images as exported from the lmdb: JPEGs whose short side is 256."""
    path.mkdir()
    for k, crop in enumerate(_crops(count, rng, [(256, 341), (256, 384), (256, 256)])):
        (path / f"{k:07d}.jpg").write_bytes(_jpeg(crop))


def cifar_tarball(path: Path, count: int, rng) -> None:
    """cifar-10-python.tar.gz: five pickled batches of 32x32 images (rows of 3072 uint8)."""
    images = [
        np.asarray(Image.fromarray(c).resize((32, 32), Image.BOX))
        for c in _crops(count, rng, [(96, 96), (128, 128), (160, 160)])
    ]
    rows = np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images])
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": names}))
        for b, part in enumerate(np.array_split(np.arange(count), 5)):
            batch = {
                b"data": rows[part],
                b"labels": [int(k % 10) for k in part],
                b"filenames": [f"img_{k}.png".encode() for k in part],
            }
            _add(tar, f"cifar-10-batches-py/data_batch_{b + 1}", pickle.dumps(batch))
        test = {b"data": rows[:10], b"labels": list(range(10)), b"filenames": [b"t"] * 10}
        _add(tar, "cifar-10-batches-py/test_batch", pickle.dumps(test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        f"{'dataset':<14}{'images':>8}{'img/s':>9}{'KB/png':>9}"
        f"{'full set':>11}{'hours':>8}{'GB':>8}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        builders = {
            "cifar10": (cifar_tarball, "cifar.tar.gz"),
            "imagenet64": (imagenet_tar, "train.tar"),
            "lsun_bedroom": (lsun_folder, "bedroom"),
        }
        for dataset, (build, name) in builders.items():
            build(root / name, args.images, rng)
            out = root / f"{dataset}_out"
            start = time.perf_counter()
            record = prepare.prepare(dataset, root / name, out)
            seconds = time.perf_counter() - start
            pngs = list(out.glob("*.png"))
            kb = sum(p.stat().st_size for p in pngs) / len(pngs) / 1e3
            rate = record["written"] / seconds
            full = FULL_SIZES[dataset]
            print(
                f"{dataset:<14}{record['written']:>8}{rate:>9.1f}{kb:>9.2f}"
                f"{full:>11,}{full / rate / 3600:>8.2f}{full * kb / 1e6:>8.1f}"
            )


if __name__ == "__main__":
    main()
