"""Image files: [-1, 1] <-> uint8, PNG grids, and reading image folders, npz files and masks."""

import math
import pathlib

import numpy as np


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float -> uint8 [0, 255], rounding as the references' (x + 1) * 127.5."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8
    )


GRID_MIN_WIDTH = 512  # grids of small images are upscaled (nearest) to at least this width
GRID_BORDER = 2  # pixels of the lines between (and around) the images
GRID_BORDER_VALUE = 128  # mid grey: visible next to black and white digits


def grid_geometry(
    n: int, h: int, w: int, ncols: int | None = None, *, min_width: int = GRID_MIN_WIDTH
) -> tuple[int, int, int]:
    """(rows, columns, nearest-neighbour scale) of a grid of n images of h x w pixels."""
    ncols = ncols or math.ceil(math.sqrt(n))
    return math.ceil(n / ncols), ncols, max(1, math.ceil(min_width / (ncols * w)))


def image_grid(
    images_uint8: np.ndarray,
    ncols: int | None = None,
    *,
    min_width: int = GRID_MIN_WIDTH,
    border: int = GRID_BORDER,
) -> np.ndarray:
    """Tile NHWC uint8 images into one HWC image a person can see: ncols per row (default
    square-ish), each upscaled by the same integer factor (nearest) until the images span at
    least min_width pixels, with `border`-pixel grey lines between and around them."""
    n, h, w, c = images_uint8.shape
    nrows, ncols, scale = grid_geometry(n, h, w, ncols, min_width=min_width)
    big = images_uint8.repeat(scale, axis=1).repeat(scale, axis=2)
    hs, ws = h * scale, w * scale
    shape = (nrows * (hs + border) + border, ncols * (ws + border) + border, c)
    grid = np.full(shape, GRID_BORDER_VALUE, np.uint8)
    for k in range(n):
        r, q = divmod(k, ncols)
        top, left = border + r * (hs + border), border + q * (ws + border)
        grid[top : top + hs, left : left + ws] = big[k]
    return grid


def save_png(path: str | pathlib.Path, image_uint8: np.ndarray) -> None:
    from PIL import Image

    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    arr = image_uint8[..., 0] if image_uint8.shape[-1] == 1 else image_uint8
    Image.fromarray(arr).save(path)


def _channels(images: np.ndarray, num_channels: int, what: str) -> np.ndarray:
    """uint8 NHWC images with num_channels: grey ones repeated for RGB (a one-line note); colour
    ones for a 1-channel model are refused (greyscale would discard their colour)."""
    have = images.shape[-1]
    if have == num_channels:
        return images
    if have == 1 and num_channels == 3:
        print(f"note: {what} is greyscale; its images enter the RGB model as 3 equal channels")
        return np.repeat(images, 3, axis=-1)
    if have == 3 and num_channels == 1:
        colour = np.flatnonzero((images != images[..., :1]).any(axis=(1, 2, 3)))
        if not len(colour):
            return images[..., :1]  # grey images stored as RGB: nothing is lost
        raise ValueError(
            f"edit.input: {what} has {len(colour)} colour image(s) (e.g. number {colour[0]}) but "
            "data.num_channels=1; convert them to greyscale first"
        )
    raise ValueError(f"edit.input: {what} has {have} channels, data.num_channels is {num_channels}")


def read_images(path, *, num_channels: int) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """(uint8 NHWC images, names, labels or None) of a folder of PNGs or an ADM-format .npz.

    Both kinds follow _channels: grey inputs of an RGB model are repeated, colour inputs of a
    greyscale model refused.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        from PIL import Image

        files = sorted(path.glob("*.png"))
        if not files:
            raise FileNotFoundError(f"edit.input: no .png files in {path}")
        images = []
        for f in files:
            try:
                with Image.open(f) as img:
                    grey = img.mode in ("1", "L", "LA", "I", "I;16", "F")
                    images.append(np.asarray(img.convert("L" if grey else "RGB")))
            except OSError as e:
                raise ValueError(f"edit.input: cannot read {f}: {e}") from None
        if len({a.shape[:2] for a in images}) > 1:
            raise ValueError(f"edit.input: the PNGs in {path} differ in size")
        channels = max(1 if a.ndim == 2 else 3 for a in images)
        images = [a[..., None] if a.ndim == 2 else a for a in images]
        images = np.stack([np.repeat(a, channels // a.shape[-1], axis=-1) for a in images])
        colour = [f for f, a in zip(files, images, strict=True) if (a != a[..., :1]).any()]
        if num_channels == 1 and colour:  # as _channels says of an npz, naming a file
            raise ValueError(
                f"edit.input: {len(colour)} of the {len(files)} PNGs in {path} are colour (e.g. "
                f"{colour[0].name}) but data.num_channels=1; convert them to greyscale first"
            )
        images = _channels(images, num_channels, f"the PNG folder {path}")
        return images, [f.stem for f in files], None
    if path.suffix == ".npz" and path.exists():
        try:
            arrays = np.load(path)
            images = arrays["arr_0"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"edit.input: cannot read {path} as an npz with arr_0: {e}") from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"edit.input: {path} arr_0 must be uint8 NHWC with {num_channels} channels, got "
                f"{images.dtype} {images.shape}"
            )
        images = _channels(images, num_channels, str(path))
        labels = arrays["arr_1"] if "arr_1" in arrays.files else None
        return images, [f"{path.stem}_{k:04d}" for k in range(len(images))], labels
    raise FileNotFoundError(f"edit.input: {path} is neither a folder of PNGs nor an .npz file")


def read_mask(path: str, image_size: int) -> np.ndarray:
    """[H, W, 1] float mask, 1 = known: a PNG (white = known), or a centred square hole."""
    if not path:
        mask = np.ones((image_size, image_size, 1), np.float32)
        lo, hi = image_size // 4, image_size - image_size // 4
        mask[lo:hi, lo:hi] = 0.0
        return mask
    from PIL import Image

    try:
        mask = np.asarray(Image.open(path).convert("L"))
    except OSError as e:
        raise ValueError(f"edit.mask: cannot read {path}: {e}") from None
    if mask.shape != (image_size, image_size):
        raise ValueError(f"edit.mask {path} is {mask.shape}, the images {image_size}x{image_size}")
    return (mask >= 128).astype(np.float32)[..., None]
