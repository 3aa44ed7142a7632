"""Sampling from checkpoints: images per sample id, ADM-format npz files and PNG grids."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from consistency.core import ode, samplers, schedules
from consistency.experiment import networks
from consistency.io import checkpoints, image_io


def sample_sigmas(config) -> np.ndarray:
    """Evaluation sigmas of the configured consistency sampler: explicit sigmas, one step, or ts."""
    s, m = config.sampling, config.model
    if s.sigmas:
        return np.asarray(s.sigmas, np.float32)
    if not s.ts:
        return np.asarray([m.sigma_max], np.float32)
    return samplers.index_sigmas(
        tuple(s.ts), s.steps, sigma_min=m.sigma_min, sigma_max=m.sigma_max, rho=m.rho
    )


def make_sample_fn(config, network: networks.Network):
    """jitted fn(params, key, sample_ids, labels) -> images in [-1, 1] for one batch.

    Consistency models use the configured one-step/multistep sampler; EDM models (training.loss
    'edm') the Heun teacher sampler with sampling.teacher_steps grid points.
    """
    d, m, s = config.data, config.model, config.sampling
    shape = (d.image_size, d.image_size, d.num_channels)
    if config.training.loss == "edm":
        denoise = networks.model_fn(network, config, "edm")
        grid = schedules.karras_sigmas(
            s.teacher_steps, sigma_min=m.sigma_min, sigma_max=m.sigma_max, rho=m.rho,
            append_zero=True,
        )  # fmt: skip

        def fn(params, key, ids, labels):
            x_T = m.sigma_max * samplers.per_sample_normal(key, ids, shape, 0)
            d_fn = lambda x, sig: denoise(params, x, sig, labels, None)  # noqa: E731
            x = ode.heun_sampler(d_fn, x_T, grid, clip_denoised=s.clip_denoised)
            return jnp.clip(x, -1.0, 1.0)

        return jax.jit(fn)
    consistency = networks.model_fn(network, config, "consistency")
    sigmas = sample_sigmas(config)

    def fn(params, key, ids, labels):
        f = lambda x, sig: consistency(params, x, sig, labels, None)  # noqa: E731
        return samplers.sample(
            f, key, ids, shape, sigmas, sigma_min=m.sigma_min, sigma_max=m.sigma_max,
            clip_denoised=s.clip_denoised,
        )  # fmt: skip

    return jax.jit(fn)


def sample_labels(config, ids: np.ndarray) -> np.ndarray:
    """Class labels per sample id: the configured class, or uniform draws from fold_in(seed, id)."""
    d, s = config.data, config.sampling
    if not d.class_conditional:
        return np.zeros(len(ids), np.int32)
    if s.class_label >= 0:
        if s.class_label >= d.num_classes:
            raise ValueError(f"sampling.class_label {s.class_label} >= data.num_classes")
        return np.full(len(ids), s.class_label, np.int32)
    key = jax.random.fold_in(jax.random.key(s.seed), 1 << 20)
    draw = lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, d.num_classes)  # noqa: E731
    return np.asarray(jax.vmap(draw)(jnp.asarray(ids, jnp.uint32)), np.int32)


def generate(config, network, params, num: int, sample_fn=None):
    """num images (uint8 NHWC) and their labels; sample k depends only on (seed, k)."""
    sample_fn = sample_fn or make_sample_fn(config, network)
    batch = config.sampling.batch_size
    key = jax.random.key(config.sampling.seed)
    images, labels = [], []
    for start in range(0, num, batch):
        ids = np.arange(start, start + batch)  # the last batch is padded, then cut
        y = sample_labels(config, ids)
        images.append(image_io.to_uint8(sample_fn(params, key, ids, jnp.asarray(y))))
        labels.append(y)
    return np.concatenate(images)[:num], np.concatenate(labels)[:num]


def write_samples(out_dir, images: np.ndarray, labels: np.ndarray | None) -> pathlib.Path:
    """samples_{N}x{H}x{W}x{C}.npz in the ADM format (arr_0 uint8 NHWC, arr_1 labels) + a grid."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("samples_" + "x".join(str(v) for v in images.shape) + ".npz")
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    image_io.save_png(path.with_suffix(".png"), image_io.image_grid(images[:256]))
    return path


def run_sample(config, workdir) -> pathlib.Path:
    """--mode=sample: EMA params of a checkpoint of workdir -> samples npz and PNG grid."""
    s = config.sampling
    step = None if s.checkpoint_step < 0 else s.checkpoint_step
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    params, meta, step = checkpoints.load_params(ckpt_dir, ema_index=s.ema_index, step=step)
    network = networks.build_network(config)
    expected = checkpoints.param_fingerprint(abstract_params(config, network))
    found = {"model": meta.get("model"), "params": meta.get("params")}
    checkpoints.check_same_model(
        found, {"model": config.model.name, "params": expected}, str(ckpt_dir)
    )
    images, labels = generate(config, network, params, s.num_samples)
    out = write_samples(
        pathlib.Path(workdir) / "samples" / f"step_{step}",
        images, labels if config.data.class_conditional else None,
    )  # fmt: skip
    print(f"wrote {out} ({len(images)} images from checkpoint step {step})")
    return out


def abstract_params(config, network: networks.Network):
    """Parameter shapes of the configured network, without allocating them."""
    d = config.data
    x = jnp.zeros((1, d.image_size, d.image_size, d.num_channels), jnp.float32)
    y = jnp.zeros((1,), jnp.int32)
    return jax.eval_shape(lambda: network.init(jax.random.key(0), x, y))
