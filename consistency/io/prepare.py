"""Offline data preparation: the paper's datasets as image folders the trainer reads.

    python -m consistency.io.prepare --dataset=cifar10 --source=cifar-10-python.tar.gz --out=DIR
    python -m consistency.io.prepare --dataset=imagenet64 --source=ILSVRC2012_img_train.tar \
        --out=DIR
    python -m consistency.io.prepare --dataset=lsun_bedroom --source=FOLDER_OR_LMDB --out=DIR

Each writes `DIR/{class}_{index}.png` (the class before the first '_' is the label, in sorted
order: the CIFAR-10 label order, ImageNet's sorted WordNet IDs as the cm checkpoints use) and
`DIR/prepared.json`; train with `--config.data.folder=DIR` (the configs' data.name chooses how).
ImageNet and LSUN go through ADM's resize-and-crop (imagenet.adm_center_crop). A rerun skips
the images already written, so an interrupted preparation continues. Nothing is downloaded.
"""

import argparse
import io
import json
import pathlib
import pickle
import sys
import tarfile
import time
from collections.abc import Iterator

import numpy as np

from consistency.io import imagenet

DATASETS = {"cifar10": 32, "imagenet64": 64, "lsun_bedroom": 256, "lsun_cat": 256}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".JPEG")


def _cifar10(source: pathlib.Path, split: str) -> Iterator[tuple[str, str, np.ndarray]]:
    """(class name, record id, uint8 32x32x3) of the python-pickle CIFAR-10 (tarball or folder)."""
    names = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]

    def batches(read):
        meta = pickle.loads(read("batches.meta"), encoding="bytes")
        labels = [n.decode() for n in meta[b"label_names"]]
        if labels != sorted(labels):  # the folder's sorted class names must give the label order
            raise ValueError(f"unexpected CIFAR-10 label names {labels}")
        for name in names:
            batch = pickle.loads(read(name), encoding="bytes")
            images = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for k, (image, label) in enumerate(zip(images, batch[b"labels"], strict=True)):
                yield labels[label], f"{name}-{k:05d}", image

    if source.is_dir():
        yield from batches(lambda name: (source / name).read_bytes())
        return
    with tarfile.open(source) as tar:
        members = {pathlib.Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        yield from batches(lambda name: tar.extractfile(members[name]).read())


def _open_image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _imagenet(source: pathlib.Path, size: int) -> Iterator[tuple[str, str, np.ndarray]]:
    """ILSVRC2012 train images (the tar of per-class tars, or a folder of WNID folders),
    resized and cropped as ADM did."""
    wnids = set(imagenet.sorted_wnids())
    if source.is_dir():
        for folder in sorted(p for p in source.iterdir() if p.name in wnids):
            for path in sorted(folder.iterdir()):
                if path.suffix in IMAGE_SUFFIXES:
                    image = _open_image(path.read_bytes())
                    yield folder.name, path.stem, imagenet.adm_center_crop(image, size)
        return
    with tarfile.open(source) as outer:
        for member in outer:
            wnid = pathlib.Path(member.name).stem
            if not member.isfile() or wnid not in wnids:
                continue
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                for item in inner:
                    if item.isfile():
                        image = _open_image(inner.extractfile(item).read())
                        name = pathlib.Path(item.name).stem
                        yield wnid, name, imagenet.adm_center_crop(image, size)


def _lsun(source: pathlib.Path, category: str, size: int) -> Iterator[tuple[str, str, np.ndarray]]:
    """An LSUN category from its lmdb export (needs the `lmdb` package) or an image folder."""
    if source.is_dir() and not (source / "data.mdb").exists():
        for path in sorted(p for p in source.rglob("*") if p.suffix in IMAGE_SUFFIXES):
            yield (
                category,
                path.stem,
                imagenet.adm_center_crop(_open_image(path.read_bytes()), size),
            )
        return
    try:
        import lmdb
    except ImportError:
        raise SystemExit(
            f"{source} is an LSUN lmdb database: pip install lmdb (or export it to images)"
        ) from None
    env = lmdb.open(str(source), readonly=True, lock=False, readahead=False, max_readers=1)
    with env.begin(write=False) as txn:
        for key, value in txn.cursor():
            yield category, key.decode(), imagenet.adm_center_crop(_open_image(value), size)


def records(dataset: str, source: pathlib.Path, split: str = "train"):
    """(class, id, uint8 HWC) of a dataset's source, preprocessed as its reference code did."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {tuple(DATASETS)}")
    if not source.exists():
        raise FileNotFoundError(f"--source: no such file or folder {str(source)!r}")
    if dataset == "cifar10":
        return _cifar10(source, split)
    if dataset == "imagenet64":
        return _imagenet(source, DATASETS[dataset])
    return _lsun(source, dataset.removeprefix("lsun_"), DATASETS[dataset])


def prepare(dataset: str, source, out, *, split: str = "train", limit: int = 0) -> dict:
    """Write the dataset as DIR/{class}_{id}.png (resumable); returns prepared.json's record."""
    from PIL import Image

    source, out = pathlib.Path(source), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start, written, skipped, counts = time.time(), 0, 0, {}
    for k, (label, name, image) in enumerate(records(dataset, source, split)):
        if limit and k >= limit:
            break
        counts[label] = counts.get(label, 0) + 1
        path = out / f"{label}_{name}.png"
        if path.exists():
            skipped += 1
            continue
        tmp = path.with_name(path.stem + ".tmp.png")
        Image.fromarray(image).save(tmp)
        tmp.replace(path)
        written += 1
        if written % 5000 == 0:
            rate = written / (time.time() - start)
            print(f"{dataset}: {written + skipped} images ({rate:.0f}/s)", flush=True)
    record = {
        "dataset": dataset, "split": split, "source": str(source), "images": written + skipped,
        "classes": len(counts), "image_size": DATASETS[dataset], "written": written,
        "skipped_existing": skipped, "seconds": round(time.time() - start, 1),
    }  # fmt: skip
    (out / "prepared.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--source", required=True, help="the downloaded archive or folder")
    parser.add_argument("--out", required=True, help="the image folder to write")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--limit", type=int, default=0, help="stop after this many (0 = all)")
    args = parser.parse_args(argv)
    try:
        record = prepare(args.dataset, args.source, args.out, split=args.split, limit=args.limit)
    except (ValueError, FileNotFoundError, tarfile.TarError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    print(f"train with: --config.data.folder={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
