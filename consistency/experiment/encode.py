"""--mode=encode: the dataset encoded once by latent.vae into the latent cache, resumably."""

import pathlib

import jax
import numpy as np

from consistency.experiment import latent, spec
from consistency.io import data, latents


def run_encode(config, workdir) -> pathlib.Path:
    """Encode data.* (its images at latent.image_size) with latent.vae into latent.cache (default
    WORKDIR/latents): the posterior means, or samples (latent.sample), scaled by the
    autoencoder's scaling_factor. Finished shards are kept, so an interrupted run repeated with
    the same command resumes; a cache of another encoding is refused. Process 0 encodes."""
    spec.validate(config, mode="encode")
    spec.check_paths(config, mode="encode", workdir=workdir)
    lat, d = config.latent, config.data
    out = latent.cache_dir(config, workdir)
    if jax.process_index() != 0:
        return out
    model, params = latent.load_vae(config)
    source = data.make_source(d.name, split=d.split, data_dir=d.data_dir or None, folder=d.folder)
    images = latent.FittedImages(source, *latent.image_shape(config))
    encode = latents.latent_encoder(model, params, sample=lat.sample == "sample", seed=lat.seed)
    folder = latents.encode_dataset(
        images,
        encode,
        out,
        identity=latent.identity(config),
        shard_size=lat.shard_size,
        batch_size=lat.batch_size,
    )
    z = latents.LatentSource(folder).latents
    print(
        f"{folder}: {len(z)} latents of shape {z.shape[1:]} ({lat.sample}), mean "
        f"{float(np.mean(z)):.3f}, std {float(np.std(z)):.3f}",
        flush=True,
    )
    return folder


run = run_encode  # main.py's entry point of this mode
