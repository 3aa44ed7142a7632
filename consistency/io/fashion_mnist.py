"""Fashion-MNIST from its idx files (Debian's dataset-fashion-mnist), padded to 32x32x1."""

import dataclasses
import functools
import gzip
import pathlib

import numpy as np

# Debian's dataset-fashion-mnist package installs the four idx files here (no network needed).
FOLDER = "/usr/share/datasets/fashion-mnist"
FILES = {  # split -> (images, labels): the file names of the original release
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """The array of an idx file (LeCun's MNIST format; gzipped when the name ends in .gz): two
    zero bytes, a type code, the number of dimensions, then each dimension as big-endian uint32."""
    raw = pathlib.Path(path).read_bytes()
    if str(path).endswith(".gz"):
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    body = raw[4 + 4 * ndim :]
    if len(body) != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"{path}: {len(body)} data bytes for an idx array of shape {shape}")
    return np.frombuffer(body, dtype).reshape(shape)


def _paths(folder: str, split: str) -> list[pathlib.Path]:
    paths = [pathlib.Path(folder) / name for name in FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"data.name='fashion_mnist': no {missing[0]}; install Debian's package "
            f"(apt-get install dataset-fashion-mnist) or set data.folder to a folder holding "
            f"the four idx .gz files ({', '.join(n for pair in FILES.values() for n in pair)})"
        )
    return paths


@functools.cache
def _read(paths: tuple[pathlib.Path, ...], stamps) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 32, 32, 1], int32 [N]) of an images and a labels file; `stamps` (their sizes
    and mtimes) keys the cache, so a replaced file is read again."""
    images, labels = (read_idx(p) for p in paths)
    if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{paths[0]}: fashion_mnist images are N x 28 x 28 with N labels; got images "
            f"{images.shape}, labels {labels.shape}"
        )
    # Pad 28x28 -> 32x32 with the background (0), so two stride-2 halvings stay whole.
    images = np.pad(images.astype(np.uint8), ((0, 0), (2, 2), (2, 2)))[..., None]
    return images, labels.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class FashionMNISTSource:
    """Fashion-MNIST (Xiao et al. 2017) from its idx files, padded with zeros to 32x32x1 uint8.

    split 'train' holds 60,000 images, 'test' 10,000; labels 0-9 (T-shirt/top, Trouser,
    Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot). The files come with
    Debian's dataset-fashion-mnist package (FOLDER), or any folder (data.folder).
    """

    split: str = "train"
    folder: str = FOLDER

    def __post_init__(self):
        if self.split not in FILES:
            raise ValueError(f"unknown fashion_mnist split: {self.split!r}; choose train or test")
        paths = tuple(p.resolve() for p in _paths(self.folder, self.split))
        stamps = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
        images, labels = _read(paths, stamps)
        object.__setattr__(self, "_images", images)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self._images[index], "label": self.labels[index]}
