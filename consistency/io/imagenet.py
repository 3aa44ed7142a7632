"""ImageNet as the references used it: sorted-WNID labels and ADM's resize-and-crop.

The cm checkpoints (and ADM's VIRTUAL_imagenet64_labeled.npz) index classes by the sorted
WordNet IDs, the order of tensorflow-datasets' imagenet2012 `labels.txt`. The box-resized
`imagenet_resized/64x64` set (Chrabaszcz et al. 2017) numbers them in its authors' order
(`imagenet_resized_labels.txt`): its labels must be remapped before they condition a cm model.
"""

import functools
import importlib.resources

import numpy as np

SORTED_LABELS = ("tensorflow_datasets", "datasets/imagenet2012/labels.txt")
RESIZED_LABELS = ("tensorflow_datasets", "image_classification/imagenet_resized_labels.txt")


def _read_labels(package: str, path: str) -> tuple[str, ...]:
    text = importlib.resources.files(package).joinpath(path).read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@functools.cache
def sorted_wnids() -> tuple[str, ...]:
    """The 1,000 WordNet IDs in the order of the cm/ADM class indices (sorted)."""
    wnids = _read_labels(*SORTED_LABELS)
    if len(wnids) != 1000 or list(wnids) != sorted(wnids):
        raise ValueError(f"{SORTED_LABELS[1]}: expected 1,000 sorted WordNet IDs")
    return wnids


@functools.cache
def resized_wnids() -> tuple[str, ...]:
    """The WordNet IDs in the label order of tfds imagenet_resized (Chrabaszcz et al.)."""
    return _read_labels(*RESIZED_LABELS)


def resized_to_sorted() -> np.ndarray:
    """[1000] int32: imagenet_resized label -> the sorted-WNID (cm/ADM) class index."""
    index = {w: i for i, w in enumerate(sorted_wnids())}
    wnids = resized_wnids()
    if sorted(wnids) != list(sorted_wnids()):
        raise ValueError(f"{RESIZED_LABELS[1]} does not hold the 1,000 ImageNet WordNet IDs")
    return np.asarray([index[w] for w in wnids], np.int32)


class RemappedLabels:
    """A random-access source whose integer labels go through a lookup table."""

    def __init__(self, source, table: np.ndarray):
        self._source, self._table = source, np.asarray(table, np.int32)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = dict(self._source[index])
        record["label"] = self._table[int(record["label"])]
        return record


def adm_center_crop(image, size: int) -> np.ndarray:
    """ADM's preprocessing (guided-diffusion image_datasets.center_crop_arr) of a PIL image:
    halve with a box filter while the short side is >= 2 size, bicubic-resize the short side
    to `size`, then crop the centre square. Returns uint8 HWC (RGB)."""
    return resize_and_crop(image.convert("RGB"), size)


def resize_and_crop(image, size: int) -> np.ndarray:
    """adm_center_crop's resampling in the PIL image's own mode (grey stays grey): uint8 HW[C]."""
    from PIL import Image

    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


class PreparedImageNet:
    """The image folder `prepare --dataset=imagenet64` writes ({wnid}_{id}.png), labelled by the
    sorted-WNID index of each file's WordNet ID (so a subset keeps the cm class indices)."""

    def __init__(self, folder: str):
        import pathlib

        root = pathlib.Path(folder)
        if not (root / "prepared.json").exists():
            raise FileNotFoundError(
                f"data.folder {folder!r} is not a prepared ImageNet folder (no prepared.json): "
                "python -m consistency.io.prepare --dataset=imagenet64 "
                "--source=ILSVRC2012_img_train.tar --out=" + (folder or "DIR")
            )
        index = {w: i for i, w in enumerate(sorted_wnids())}
        self._files = sorted(p for p in root.glob("n*_*.png") if p.name.split("_")[0] in index)
        self._labels = np.asarray([index[p.name.split("_")[0]] for p in self._files], np.int32)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, k: int) -> dict:
        from PIL import Image

        with Image.open(self._files[k]) as img:
            image = np.asarray(img.convert("RGB"))
        return {"image": image, "label": self._labels[k]}
