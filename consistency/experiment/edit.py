"""--mode=edit: zero-shot editing (Algorithm 4) of image files with a checkpoint's model."""

import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from consistency.core import editing, samplers
from consistency.experiment import latent, methods, networks, sample, sampling_spec, spec
from consistency.io import image_io


class EditResult(NamedTuple):
    """Float NHWC images: inputs, the task's reference ('before'), edited output.

    edited is not clipped: it keeps the known components exactly (Algorithm 4's R), which may
    leave [-1, 1] (a white patch mean plus detail); the uint8 files clip it.
    """

    inputs: np.ndarray | None
    reference: np.ndarray | None
    edited: np.ndarray
    out_dir: pathlib.Path
    names: list[str]


def validate(config) -> None:
    """One clear message per bad edit key, before a checkpoint is read."""
    spec.validate(config, mode="edit")
    spec.check_paths(config, mode="edit")


def _fit(images: np.ndarray, config) -> np.ndarray:
    """Check the size; low-resolution superres inputs (size / patch_size) are upsampled."""
    size, p = config.data.image_size, config.edit.patch_size
    if config.edit.task == "superres" and images.shape[1:3] == (size // p, size // p):
        images = images.repeat(p, axis=1).repeat(p, axis=2)  # nearest: patch means are the pixels
    if images.shape[1:3] != (size, size):
        raise ValueError(f"edit.input images are {images.shape[1:3]}, data.image_size is {size}")
    return images


def make_edit_fn(config, network: networks.Network):
    """jitted fn(params, images, mask, labels, ids) -> (edited, reference) for edit.task."""
    e, grid = config.edit, methods.noise_grid(config)  # a VP model's: its timesteps' range
    task, p, noise_sigma = e.task, e.patch_size, e.noise_sigma
    cm = _consistency_fn(config, network)
    sampler, key = sampling_spec.edit_sampler(config), jax.random.key(e.seed)
    sigmas = np.asarray(sampler.sigmas, np.float32)
    levels = dict(sigma_min=grid.sigma_min, sigma_max=grid.sigma_max)
    opts = dict(key=key, clip_denoised=sampler.clip_denoised, **levels)

    def fn(params, images, mask, labels, ids):
        f = lambda x, s: cm(params, x, s, labels, None)
        if task == "inpaint":
            return editing.inpaint(f, images, mask, sigmas, sample_ids=ids, **opts)
        if task == "colorize":
            return editing.colorize(f, images, sigmas, sample_ids=ids, **opts)
        if task == "superres":
            return editing.superresolve(f, images, sigmas, patch_size=p, sample_ids=ids, **opts)
        if task == "stroke":
            return editing.stroke_guided(f, images, sigmas, sample_ids=ids, **opts), images
        noisy = images + noise_sigma * samplers.per_sample_normal(key, ids, images.shape[1:], 0)
        return editing.denoise(f, noisy, noise_sigma, **levels), noisy

    return jax.jit(fn)


def _consistency_fn(config, network: networks.Network):
    """f(params, x, sigma, y, key); a guided student edits at w = sampling.guidance."""
    cm = networks.model_fn(network, config, "consistency")
    w = sampling_spec.sampling_guidance(config)
    if w is None:
        return cm
    return lambda p, x, s, y, k: cm(p, x, s, y, k, guidance=jnp.full(x.shape[:1], w, jnp.float32))


def _batched(fn, batch: int, *arrays):
    """fn over slices of `batch` (the last one padded, then cut): one compiled shape."""
    n, outs = len(arrays[0]), []
    for start in range(0, n, batch):
        rows = np.minimum(np.arange(start, start + batch), n - 1)  # pad with the last image
        outs.append([np.asarray(o) for o in fn(*[a[rows] for a in arrays])])
    return [np.concatenate(parts)[:n] for parts in zip(*outs, strict=True)]


def _interpolate(config, network, params):
    """Pairs of latents z0, z1 (fold_in(seed, pair)) and f(T slerp(z0, z1, a)) along a."""
    e, d = config.edit, config.data
    cm = _consistency_fn(config, network)
    ids, sigma_max = np.arange(e.num_pairs), methods.noise_grid(config).sigma_max
    shape, key = (d.image_size, d.image_size, d.num_channels), jax.random.key(e.seed)
    alphas = jnp.linspace(0.0, 1.0, e.num_interpolations)
    clip = not latent.enabled(config)  # latents are decoded, then clipped

    @jax.jit
    def fn(params, labels):
        z0 = samplers.per_sample_normal(key, ids, shape, 0)
        z1 = samplers.per_sample_normal(key, ids, shape, 1)
        f = lambda x, s: cm(params, x, s, jnp.tile(labels, len(alphas)), None)
        x = editing.interpolate(f, z0, z1, alphas, sigma_max=sigma_max, clip_output=clip)
        return jnp.swapaxes(x, 0, 1).reshape(-1, *shape)  # pair-major

    labels = sample.sample_labels(config, ids)
    edited = np.asarray(fn(params, jnp.asarray(labels)))
    names = [f"pair{p:03d}_{k:02d}" for p in ids for k in range(e.num_interpolations)]
    return edited, names, np.repeat(labels, e.num_interpolations)


def load_checked_params(config, workdir, network, *, ema_index: int, step: int):
    """EMA params of workdir/checkpoints (step -1: the newest sound one), digest verified and
    checked against the config's network and method."""
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    wanted = None if step < 0 else step
    params, _, step = sample.load_checked(
        config, ckpt_dir, network, ema_index=ema_index, step=wanted
    )
    return params, step


def write_edits(out_dir, stem: str, names, edited, labels, rows) -> pathlib.Path:
    """name.png per image, stem.npz (arr_0 uint8 NHWC[, arr_1 labels]) and a grid of `rows`."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = image_io.to_uint8(edited)
    for name, image in zip(names, images, strict=True):
        image_io.save_png(out_dir / f"{name}.png", image)
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    np.savez(out_dir / f"{stem}.npz", **arrays)
    grid = image_io.image_grid(image_io.to_uint8(np.concatenate(rows)), ncols=len(rows[0]))
    image_io.save_png(out_dir / "before_after.png", grid)
    return out_dir / "before_after.png"


def run_edit(config, workdir) -> EditResult:
    """--mode=edit: edit.input edited by edit.task with EMA params of a checkpoint of workdir."""
    validate(config)
    e, d = config.edit, config.data
    network = networks.build_network(config)
    params, step = load_checked_params(
        config, workdir, network, ema_index=e.ema_index, step=e.checkpoint_step
    )
    out_dir = pathlib.Path(e.out or pathlib.Path(workdir) / "edits" / e.task)
    if e.task == "interpolate":
        edited, names, labels = _interpolate(config, network, params)
        decode = latent.decoder(config)  # a latent model's interpolations, decoded to images
        edited = edited if decode is None else np.asarray(decode(edited))
        k = e.num_interpolations
        keep = labels if d.class_conditional else None
        grid = write_edits(
            out_dir,
            "interpolations",
            names,
            edited,
            keep,
            list(edited.reshape(-1, k, *edited.shape[1:])),
        )
        print(f"wrote {len(edited)} interpolations ({e.num_pairs} pairs) to {out_dir}; {grid}")
        return EditResult(None, None, edited, out_dir, names)
    images, names, labels = image_io.read_images(e.input, num_channels=d.num_channels)
    images = _fit(images, config).astype(np.float32) / 127.5 - 1.0
    ids = np.arange(len(images))
    if labels is None:
        labels = sample.sample_labels(config, ids)
    mask = image_io.read_mask(e.mask, d.image_size)
    masks = np.broadcast_to(mask, images.shape)
    edit = make_edit_fn(config, network)
    fn = lambda x, m, y, i: edit(params, x, m, y, i)
    edited, reference = _batched(fn, config.sampling.batch_size, images, masks, labels, ids)
    rows = [images, edited] if e.task == "stroke" else [images, reference, edited]
    stem = pathlib.Path(e.input).stem
    keep = labels if d.class_conditional else None
    grid = write_edits(out_dir, stem, names, edited, keep, [r[:64] for r in rows])
    levels = [e.noise_sigma] if e.task == "denoise" else sampling_spec.edit_sampler(config).sigmas
    sigmas = ", ".join(f"{s:.3g}" for s in levels)
    print(
        f"{e.task}: wrote {len(edited)} images (sigmas {sigmas}; checkpoint step {step}) to "
        f"{out_dir}; before/after grid {grid}"
    )
    return EditResult(images, reference, edited, out_dir, names)


run = run_edit  # main.py's entry point of this mode
