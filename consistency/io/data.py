"""Image data: tfds ArrayRecord sources, image folders, digits, Fashion-MNIST; batched by grain."""

import dataclasses
import pathlib
from collections.abc import Iterator
from typing import NamedTuple

import grain
import numpy as np

from consistency.io import fashion_mnist, imagenet

DATASETS = (
    "digits", "fashion_mnist", "cifar10", "imagenet64", "imagenet64_chrabaszcz", "lsun_bedroom",
    "image_folder",
)  # fmt: skip
# Our names -> tensorflow-datasets names (read as ArrayRecord through tfds.data_source).
TFDS_NAMES = {
    "cifar10": "cifar10",
    # Chrabaszcz et al.'s box-resized ImageNet: labels remapped to the sorted WordNet IDs of the
    # cm checkpoints; its pixels are not ADM's, so its FID is not comparable with ADM's batch.
    "imagenet64_chrabaszcz": "imagenet_resized/64x64",
    "lsun_bedroom": "lsun/bedroom",
}
# Datasets that python -m consistency.io.prepare writes as an image folder (data.folder), with
# the source it reads.
PREPARE_SOURCES = {"cifar10": "cifar-10-python.tar.gz", "lsun_bedroom": "LMDB_OR_FOLDER"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes read as one channel


@dataclasses.dataclass(frozen=True)
class DigitsSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as uint8 records.

    split 'train' holds the images whose index is not a multiple of 5 (1,437), 'test' the others
    (360), 'all' every image: a fixed split so the test set can serve as an FID floor.
    """

    split: str = "train"

    def __post_init__(self):
        from sklearn.datasets import load_digits

        if self.split not in ("train", "test", "all"):
            raise ValueError(f"unknown digits split: {self.split!r}; choose train, test or all")
        digits = load_digits()
        keep = np.arange(len(digits.images))
        if self.split != "all":
            keep = keep[(keep % 5 != 0) if self.split == "train" else (keep % 5 == 0)]
        # Pixel values are 0..16: map them onto the 0..255 range of every other source.
        images = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)[..., None]
        object.__setattr__(self, "_images", images)
        object.__setattr__(self, "_labels", digits.target[keep].astype(np.int32))

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self._images[index], "label": self._labels[index]}


def source_labels(source) -> np.ndarray:
    """Every record's label: a source's `labels` array where it has one, else read record by
    record (an image folder knows its labels without decoding)."""
    for attr in ("labels", "_labels"):
        if getattr(source, attr, None) is not None:
            return np.asarray(getattr(source, attr), np.int64)
    return np.asarray([int(source[i]["label"]) for i in range(len(source))], np.int64)


class ClassSubset:
    """The records of a source whose label is one of `classes` (data.classes), labels unchanged
    (a class-conditional network keeps its data.num_classes rows)."""

    def __init__(self, source, classes):
        self.source, self.classes = source, tuple(int(c) for c in classes)
        labels = source_labels(source)
        self.index = np.flatnonzero(np.isin(labels, self.classes))
        self.labels = labels[self.index].astype(np.int32)
        if not len(self.index):
            raise ValueError(f"data.classes={self.classes}: no record has one of these labels")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.index[index])]


def filter_classes(source, classes):
    """source unchanged for classes = () (every class), else its ClassSubset."""
    return ClassSubset(source, classes) if len(classes) else source


@dataclasses.dataclass(frozen=True)
class ImageFolderSource:
    """Every image under a folder (recursively, sorted), labelled by its file-name prefix.

    As the ImageNet/LSUN reference loader does, the class name is the part of the file name
    before the first '_' (sorted class names give the indices).
    """

    folder: str

    def __post_init__(self):
        root = pathlib.Path(self.folder)
        if not root.is_dir():
            raise FileNotFoundError(f"data.folder {self.folder!r} is not a directory")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"data.folder {self.folder!r} holds no images ({IMAGE_SUFFIXES})")
        classes = sorted({p.name.split("_")[0] for p in files})
        index = {c: i for i, c in enumerate(classes)}
        object.__setattr__(self, "_files", files)
        object.__setattr__(self, "_labels", [index[p.name.split("_")[0]] for p in files])
        object.__setattr__(self, "num_classes", len(classes))

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        path = self._files[index]
        try:
            with Image.open(path) as img:
                image = np.asarray(img.convert("L" if img.mode in GREY_MODES else "RGB"))
        except OSError as e:  # truncated since the scan: name the file, not PIL's internals
            raise ValueError(f"data.folder: cannot read {path}: {e}") from None
        return {"image": image, "label": np.int32(self._labels[index])}


# Folders up to this many images are decoded in full before training; larger ones (LSUN, a
# prepared ImageNet) only have their headers read (PIL verify), so start-up stays in minutes.
SCAN_DECODE_LIMIT = 20000


class FolderReport(NamedTuple):
    """scan_folder's findings: problems (errors, one line each) and warnings (one line each)."""

    problems: list[str]
    warnings: list[str]


def _is_grey(img) -> bool:
    if img.mode in GREY_MODES:
        return True
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., :1] == rgb).all())


def scan_folder(folder: str, *, num_channels: int, image_size: int) -> FolderReport:
    """Open every image of an image folder before training: unreadable files and (for
    num_channels=1) colour images are problems naming the files; images of another size than
    image_size x image_size (centre-cropped and resized) a warning with their count."""
    from PIL import Image

    source = ImageFolderSource(folder)
    decode = len(source._files) <= SCAN_DECODE_LIMIT
    bad, colour, sizes = [], [], {}
    for path in source._files:
        try:
            with Image.open(path) as img:
                sizes[img.size] = sizes.get(img.size, 0) + 1
                if not decode:
                    img.verify()  # the file's structure (PNG: every chunk's CRC), no pixels
                    continue
                img.load()  # decodes: a truncated file fails here, not mid-training
                if num_channels == 1 and not _is_grey(img):
                    colour.append(path)
        except (OSError, ValueError) as e:
            bad.append(f"{path} ({e})")
    problems, warnings = [], []
    if bad:
        problems.append(f"data.folder: {len(bad)} unreadable image(s), e.g. {bad[0]}; remove them")
    if colour:
        problems.append(
            f"data.folder: {len(colour)} colour image(s) for data.num_channels=1, e.g. "
            f"{colour[0]}; convert them to greyscale or set data.num_channels=3"
        )
    other = sum(n for size, n in sizes.items() if size != (image_size, image_size))
    if other:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
        warnings.append(
            f"data.folder: {other} of {len(source)} images are not {image_size}x{image_size} "
            f"(sizes {shown}{', ...' if len(sizes) > 4 else ''}); they are resized and "
            "centre-cropped (data.image_size)"
        )
    return FolderReport(problems, warnings)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(message, flush=True)


def _tfds_source(name: str, *, split: str, data_dir: str | None):
    """tfds' ArrayRecord source of an already prepared dataset: never a download (it hangs
    offline); a missing dataset is an error naming the preparation command."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(TFDS_NAMES[name], split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises assorted types for 'not prepared' / wrong file format
        how = (
            f"python -m consistency.io.prepare --dataset={name} --source={PREPARE_SOURCES[name]} "
            f"--out=DIR, then --config.data.folder=DIR"
            if name in PREPARE_SOURCES
            else f"prepare tfds '{TFDS_NAMES[name]}' as array_record in data.data_dir"
        )
        raise FileNotFoundError(
            f"data.name={name!r}: tfds '{TFDS_NAMES[name]}' is not prepared in data.data_dir="
            f"{data_dir or '~/tensorflow_datasets'!s} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}); {how}"
        ) from None


def make_source(
    name: str, *, split: str = "train", data_dir: str | None = None, folder=None, classes=()
):
    """A random-access source of {'image': uint8 HWC, 'label': int} records; with `classes`,
    only the records of those labels (filter_classes)."""
    return filter_classes(_source(name, split=split, data_dir=data_dir, folder=folder), classes)


def _source(name: str, *, split: str, data_dir: str | None, folder):
    if name == "digits":
        return DigitsSource(split)
    if name == "fashion_mnist":
        return fashion_mnist.FashionMNISTSource(split, folder or fashion_mnist.FOLDER)
    if name == "image_folder":
        if not folder:
            raise ValueError("data.name='image_folder' needs data.folder set to an image directory")
        return ImageFolderSource(folder)
    if name == "imagenet64":  # ImageNet as ADM prepared it (python -m consistency.io.prepare)
        return imagenet.PreparedImageNet(folder or "")
    if name in PREPARE_SOURCES and folder:  # as python -m consistency.io.prepare wrote it
        return ImageFolderSource(folder)
    if name in TFDS_NAMES:
        source = _tfds_source(name, split=split, data_dir=data_dir)
        if name == "imagenet64_chrabaszcz":
            _warn_once(
                "WARNING: data.name='imagenet64_chrabaszcz' is the box-resized ImageNet of "
                "tfds imagenet_resized (labels remapped to sorted WordNet IDs); its FID is not "
                "comparable with ADM's reference batch: prepare ImageNet with "
                "python -m consistency.io.prepare --dataset=imagenet64"
            )
            return imagenet.RemappedLabels(source, imagenet.resized_to_sorted())
        return source
    raise ValueError(f"unknown dataset: {name!r}; choose one of {DATASETS}")


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """imagenet.adm_center_crop (the ImageNet/LSUN references' preprocessing) of a uint8 HWC
    array of any channel count; an image already size x size is unchanged."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    from PIL import Image

    grey = image.shape[-1] == 1
    out = imagenet.resize_and_crop(Image.fromarray(image[..., 0] if grey else image), size)
    return out[..., None] if grey else out


@dataclasses.dataclass(frozen=True)
class Preprocess(grain.transforms.RandomMap):
    """uint8 HWC -> float32 in [-1, 1] (x/127.5 - 1), centre crop, random horizontal flip.

    Latent records {'latent', 'label'} (io.latents.LatentSource) are taken as they are, float32,
    flipped only with random_flip; their shape must be image_size x image_size x num_channels.
    """

    image_size: int
    num_channels: int
    random_flip: bool

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        if "latent" in record:
            return self._latent(record, rng)
        image = np.asarray(record["image"])
        if image.ndim == 2:
            image = image[..., None]
        image = center_crop(image, self.image_size)
        if image.shape[-1] == 1 and self.num_channels == 3:  # grey images for an RGB model
            image = np.repeat(image, 3, axis=-1)
        elif image.shape[-1] == 3 and self.num_channels == 1 and (image[..., :1] == image).all():
            image = image[..., :1]  # grey images stored as RGB
        if image.shape[-1] != self.num_channels:
            raise ValueError(
                f"images have {image.shape[-1]} channels but data.num_channels is "
                f"{self.num_channels}"
            )
        if self.random_flip and rng.random() < 0.5:
            image = image[:, ::-1]
        label = np.int32(record.get("label", 0))
        return {"image": image.astype(np.float32) / 127.5 - 1.0, "label": label}

    def _latent(self, record: dict, rng: np.random.Generator) -> dict:
        latent = np.asarray(record["latent"], np.float32)
        want = (self.image_size, self.image_size, self.num_channels)
        if latent.shape != want:
            raise ValueError(
                f"latents are {latent.shape} but data.image_size, data.num_channels say {want}"
            )
        if self.random_flip and rng.random() < 0.5:
            latent = latent[:, ::-1]
        return {"image": latent, "label": np.int32(max(int(record.get("label", 0)), 0))}


def make_batches(
    source,
    *,
    seed: int,
    local_batch: int,
    image_size: int,
    num_channels: int,
    random_flip: bool,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
) -> Iterator[dict]:
    """Infinite local batches; batch k is a function of (seed, k) alone, so resuming repeats none.

    The shuffled stream (reshuffled every epoch) is cut into blocks of local_batch examples, dealt
    round-robin: process p's batch k is block k P + p, rows [p b, (p+1) b) of the global batch k
    (b = local_batch, P = process_count). Each host reads only its own rows, and the global batch
    (and each example's random flip) is the same for any number of processes.
    """
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    ds = ds.random_map(Preprocess(image_size, num_channels, random_flip), seed=seed + 1)
    ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count][start_step:]
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    return iter(ds.to_iter_dataset(options))
