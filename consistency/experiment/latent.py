"""Latent models (latent.*): the autoencoder, its shapes, the latent cache and one decode function.

When latent.vae is set the network's data are the autoencoder's scaled latents: data.image_size
and data.num_channels describe the latent, latent.image_size the images. Everything image-shaped
(grids, --mode=sample files, FID features) meets decode(latents), built here once from the config
and passed on as a callable; nothing jitted reads the config.
"""

import functools
import hashlib
import json
import pathlib
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from consistency.convert import diffusers_vae
from consistency.experiment import methods, paths
from consistency.io import data, latents

SAMPLES = ("mean", "sample")  # latent.sample: the posterior mean or a sample of it per image
VAE_DIR = "vae"  # a run of training.loss='vae' exports its autoencoder to WORKDIR/vae
# Tasks of --mode=edit that make sense on a latent model: they need no image inputs (the others
# project images onto pixels or masks, which latents do not have).
LATENT_EDIT_TASKS = ("interpolate",)

# decode(latents [B, h, w, c]) -> images [B, H, W, C] in [-1, 1]
DecodeFn = Callable[[jax.Array], jax.Array]


def enabled(config) -> bool:
    return bool(config.latent.vae)


def _is_int(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def problems(config, mode: str) -> list[str]:
    """The latent.* keys and what a latent model or an autoencoder run excludes, for `mode`
    (pure: no file is read; shape_problems reads latent.vae's config.json)."""
    lat, t, m = config.latent, config.training, config.model
    out = [f"latent.{k}={lat[k]!r}: must be an integer >= {low}" for k, low in
           (("image_size", 0), ("seed", 0), ("batch_size", 1), ("shard_size", 1))
           if not _is_int(lat[k], low)]  # fmt: skip
    if lat.sample not in SAMPLES:
        out.append(f"latent.sample={lat.sample!r}: must be one of {SAMPLES}")
    row = methods.METHODS.get(t.loss)
    if row is not None and row.samples_as == "autoencoder":
        if mode != "train":
            out.append(
                f"training.loss={t.loss!r} trains an autoencoder: --mode={mode} does not apply "
                "to it; give its workdir to a latent model as --config.latent.vae"
            )
        if lat.vae:
            out.append(f"latent.vae={lat.vae!r}: training.loss={t.loss!r} trains on images")
        if config.eval.every_steps:
            out.append(f"eval.every_steps={config.eval.every_steps}: an autoencoder has no FID")
        return out
    if m.name == "autoencoder_kl":
        out.append("model.name='autoencoder_kl' is trained by training.loss='vae' only")
    if mode == "encode" and not lat.vae:
        out.append("--mode=encode needs latent.vae: a diffusers vae/ folder or a 'vae' run")
    if not lat.vae:
        return out
    if config.sampling.clip_denoised:
        out.append(
            "sampling.clip_denoised=True clamps latents to [-1, 1]: set "
            "--config.sampling.clip_denoised=False for a latent model (its decoded images are "
            "clipped)"
        )
    if t.distance == "lpips":
        out.append("training.distance='lpips' compares images, not the latents of latent.vae")
    if mode == "edit" and config.edit.task not in LATENT_EDIT_TASKS:
        out.append(
            f"edit.task={config.edit.task!r}: on a latent model (latent.vae) --mode=edit runs "
            f"only {LATENT_EDIT_TASKS} (the other tasks edit the pixels, masks or patches of "
            "input images, which the latents do not have)"
        )
    return out


def vae_folder(path: str) -> pathlib.Path:
    """latent.vae: a folder holding vae/ (a 'vae' run's workdir, a diffusers pipeline), else a
    diffusers vae/ folder itself (config.json + weights)."""
    folder = pathlib.Path(path)
    return folder / VAE_DIR if (folder / VAE_DIR / "config.json").exists() else folder


@functools.lru_cache(maxsize=8)
def _read_config(folder: str, mtime_ns: int) -> dict:
    return json.loads((pathlib.Path(folder) / "config.json").read_text())


def _vae_json(config) -> dict:
    """latent.vae's config.json (only that file is read)."""
    folder = vae_folder(config.latent.vae)
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"latent.vae={config.latent.vae!r}: no config.json there or in its {VAE_DIR}/ (give "
            "a diffusers vae/ folder, or the workdir of a training.loss='vae' run)"
        )
    return _read_config(str(folder), path.stat().st_mtime_ns)


def vae_config(config) -> dict:
    """The AutoencoderKL fields of latent.vae's config.json."""
    return diffusers_vae.autoencoder_kwargs(_vae_json(config))


def image_size(config) -> int:
    """The images' side: latent.image_size, else the autoencoder's sample_size."""
    if config.latent.image_size > 0:
        return config.latent.image_size
    return int(_vae_json(config).get("sample_size") or 0)


def image_shape(config) -> tuple[int, int]:
    """(side, channels) of the images: the decoded ones of a latent model, else the data's."""
    d = config.data
    if not enabled(config):
        return d.image_size, d.num_channels
    return image_size(config), int(vae_config(config)["out_channels"])


def latent_shape(config) -> tuple[int, int]:
    """(side, channels) of the autoencoder's latents at the configured image size."""
    kw = vae_config(config)
    factor = 2 ** (len(kw["block_out_channels"]) - 1)
    return image_size(config) // factor, int(kw["latent_channels"])


def shape_problems(config) -> list[str]:
    """data.image_size / num_channels must be the latent shape of latent.vae (reads config.json)."""
    try:
        kw = vae_config(config)
        side = image_size(config)
    except (OSError, ValueError, KeyError) as e:
        return [str(e)]
    factor = 2 ** (len(kw["block_out_channels"]) - 1)
    want = (side // factor, int(kw["latent_channels"]))
    d = config.data
    out = []
    if side <= 0:
        out.append("latent.image_size: give the images' side (latent.vae has no sample_size)")
    elif side % factor:
        out.append(f"latent.image_size={side} must be a multiple of latent.vae's {factor}")
    elif (d.image_size, d.num_channels) != want:
        out.append(
            f"data.image_size={d.image_size}, data.num_channels={d.num_channels} describe the "
            f"network's data, the latents of latent.vae={config.latent.vae!r}: at latent."
            f"image_size={side} they are {want[0]}x{want[0]}x{want[1]}; set "
            f"--config.data.image_size={want[0]} --config.data.num_channels={want[1]}"
        )
    return out


def cache_dir(config, workdir) -> pathlib.Path:
    """latent.cache, else WORKDIR/latents."""
    return pathlib.Path(config.latent.cache or pathlib.Path(workdir) / "latents")


def encode_command(config, workdir) -> str:
    where = f"--config.latent.cache={config.latent.cache} " if config.latent.cache else ""
    return f"python main.py --mode=encode --config=CONFIG {where}--workdir={workdir}"


def vae_digest(config) -> str:
    """A digest of latent.vae's config.json and weights (what the latents are made by)."""
    folder = vae_folder(config.latent.vae)
    files = [folder / "config.json"] + [folder / w for w in diffusers_vae.WEIGHTS]
    parts = [paths.file_digest(p) for p in files if p.exists()]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]


def identity(config) -> dict:
    """What the cached latents depend on: the autoencoder, the images and the encoding."""
    lat, d = config.latent, config.data
    side, channels = image_shape(config)
    return {
        "vae": vae_digest(config),
        "mode": lat.sample,
        "seed": lat.seed if lat.sample == "sample" else 0,
        "data": [d.name, d.split, d.data_dir, d.folder],
        "image_size": side,
        "num_channels": channels,
    }


def cache_problems(config, workdir) -> list[str]:
    """The latent cache training reads: finished, and made by this config's encoding."""
    folder = cache_dir(config, workdir)
    if not (folder / latents.LATENTS).exists():
        return [
            f"latent.cache: no finished latents in {folder}; encode the dataset once with "
            f"{encode_command(config, workdir)}"
        ]
    stored = json.loads((folder / latents.META).read_text())
    want = json.loads(json.dumps(identity(config)))
    diff = sorted(k for k in want if stored.get(k) != want[k])
    if diff:
        shown = ", ".join(f"{k}: {stored.get(k)!r} there, {want[k]!r} now" for k in diff)
        return [
            f"latent.cache: {folder} holds latents of another encoding ({shown}); give another "
            "latent.cache or remove it and encode again"
        ]
    return []


def load_vae(config):
    """(AutoencoderKL, {'params': ...}) of latent.vae."""
    model, params, _ = diffusers_vae.load_diffusers_vae(vae_folder(config.latent.vae))
    return model, jax.tree.map(jnp.asarray, params)


def make_decode(model, params) -> DecodeFn:
    """decode(latents) -> images clipped to [-1, 1]; the params enter the jitted function as an
    argument (device buffers, not constants baked into the program)."""

    @jax.jit
    def run(params, z):
        return jnp.clip(model.apply(params, z, method=model.decode_latents), -1.0, 1.0)

    return lambda z: run(params, z)


def decoder(config) -> DecodeFn | None:
    """The configured decode function, or None for a pixel-space model."""
    return make_decode(*load_vae(config)) if enabled(config) else None


def decoded(sample_fn, decode: DecodeFn | None):
    """sample_fn with its latents decoded to images (the same function without a decoder)."""
    if decode is None:
        return sample_fn
    return lambda *args, **kw: decode(sample_fn(*args, **kw))


def training_source(config, workdir):
    """The random-access source training reads: the latent cache (every class encoded once), or
    the configured images; either one only of data.classes when given."""
    d = config.data
    if enabled(config):
        problems = cache_problems(config, workdir)
        if problems:
            raise FileNotFoundError(problems[0])
        return data.filter_classes(latents.LatentSource(cache_dir(config, workdir)), d.classes)
    return data.make_source(
        d.name, split=d.split, data_dir=d.data_dir or None, folder=d.folder, classes=d.classes
    )


def _images(source, d, ids) -> np.ndarray:
    """Records `ids` of a pixel source as training reads them: float32 in [-1, 1], no flips."""
    prep = data.Preprocess(d.image_size, d.num_channels, random_flip=False)
    rng = np.random.default_rng(0)
    return np.stack([prep.random_map(source[int(i)], rng)["image"] for i in ids])


def reconstruction_fn(network, source, d):
    """fn(params, key, ids, labels) -> the images of the first half of `ids` followed by their
    reconstructions D(mean of q(z|x)): the grids of an autoencoder's training run."""
    run = jax.jit(lambda p, x: jnp.clip(network.module.apply({"params": p}, x), -1.0, 1.0))

    def fn(params, key, ids, labels):
        x = _images(source, d, np.asarray(ids)[: max(len(ids) // 2, 1)])
        return jnp.concatenate([x, run(params, x)])

    return fn


def export_autoencoder(config, workdir, network, params, *, num_examples: int = 1024):
    """WORKDIR/vae: a trained autoencoder as a diffusers folder, its scaling_factor 1/std of the
    latent means of the first num_examples training images (LDM's unit-variance latents)."""
    d = config.data
    source = training_source(config, workdir)
    x = _images(source, d, range(min(num_examples, len(source))))
    params = jax.device_get(params)
    mean_of = lambda module, x: module.encode(x).mean
    means = jax.jit(lambda p, x: network.module.apply({"params": p}, x, method=mean_of))(params, x)
    model = network.module.clone(scaling_factor=1.0 / float(np.std(np.asarray(means))))
    out = pathlib.Path(workdir) / VAE_DIR
    tmp = out.with_name(VAE_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    diffusers_vae.export_diffusers_vae(params, model, tmp, sample_size=d.image_size)
    shutil.rmtree(out, ignore_errors=True)  # a rerun (resumed, longer) replaces the export
    tmp.rename(out)
    return out


class FittedImages:
    """A source's images centre-cropped to `size` with `channels` channels, as uint8 records."""

    def __init__(self, source, size: int, channels: int):
        self.source, self.size, self.channels = source, size, channels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        image = np.asarray(record["image"])
        image = data.center_crop(image[..., None] if image.ndim == 2 else image, self.size)
        if image.shape[-1] == 1 and self.channels == 3:
            image = np.repeat(image, 3, axis=-1)
        elif image.shape[-1] == 3 and self.channels == 1 and (image[..., :1] == image).all():
            image = image[..., :1]  # grey images stored as RGB
        if image.shape[-1] != self.channels:
            raise ValueError(
                f"images have {image.shape[-1]} channels but latent.vae takes {self.channels}"
            )
        return {"image": image, "label": record.get("label", -1)}
