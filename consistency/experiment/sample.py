"""Sampling from checkpoints: images per sample id, ADM-format npz files and PNG grids."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from consistency.core import guidance, ode, samplers, schedules
from consistency.core.samplers import SamplerSpec
from consistency.core.schedules import NoiseGrid
from consistency.experiment import latent, methods, networks, sampling_spec
from consistency.io import checkpoints, image_io, sharding


def make_sampler(
    fns: methods.ModelFns,
    sampler: SamplerSpec,
    grid: NoiseGrid,
    shape,
    *,
    clip_output=True,
    null_class=None,
):
    """jitted fn(params, key, sample_ids, labels, guidance=None) -> images in [-1, 1] for one
    batch; guidance: w [B] (default sampler.guidance), for heun and ddim the CFG of D(y) + w
    (D(y) - D(null_class)).

    Sample k's noise is fold_in(key, k): the images do not depend on the batch split.
    clip_output=False leaves the result unclamped (latents, which are decoded afterwards).
    """
    clip = sampler.clip_denoised
    w_of = functools.partial(_guidance, default=sampler.guidance)
    if sampler.kind in ("heun", "progressive", "ddim"):
        n = sampler.steps
        if sampler.kind == "heun":
            sigmas = schedules.karras_sigmas(n, **grid.kwargs(), append_zero=True)
            solve = ode.heun_sampler
        elif sampler.kind == "ddim":  # a VP teacher's timesteps' levels from sigma(T-1) to 0
            sigmas = jnp.append(jnp.asarray(sampler.sigmas, jnp.float32), 0.0)
            solve = ode.ddim_sampler
        else:  # PD's Euler steps on its ramp, then D(x, sigma_min) (jcm's final Euler step to 0)
            ramp = schedules.progdist_sigmas(jnp.arange(n + 1), n, **grid.kwargs())[0]
            sigmas, solve = jnp.append(ramp, 0.0), ode.euler_sampler

        def diffusion(params, key, ids, labels, guidance=None):
            x_T = grid.sigma_max * samplers.per_sample_normal(key, ids, shape, 0)
            d_fn = _guided_denoiser(fns, params, labels, null_class, w_of(guidance, ids))
            x = solve(d_fn, x_T, sigmas, clip_denoised=clip)
            return jnp.clip(x, -1.0, 1.0) if clip_output else x

        if sampler.guidance is not None and null_class is None:
            raise ValueError("a guided heun sampler needs the null class")
        return jax.jit(diffusion)
    sigmas = np.asarray(sampler.sigmas, np.float32)
    samplers.validate_sigmas(sigmas, sigma_min=grid.sigma_min, sigma_max=grid.sigma_max)
    fn = make_consistency_sampler(
        fns, grid, shape, clip_denoised=clip, clip_output=clip_output, guidance=sampler.guidance
    )
    return functools.partial(fn, sigmas=sigmas)


def _guidance(given, ids, *, default: float | None):
    """w [B]: the per-sample input, else the sampler's default (None: the model takes none)."""
    if given is not None:
        return jnp.asarray(given, jnp.float32)
    return None if default is None else jnp.full(ids.shape, default, jnp.float32)


def _guided_denoiser(fns: methods.ModelFns, params, labels, null_class, w):
    """D(x, s, y), or with w the classifier-free-guided D(y) + w (D(y) - D(null_class))."""
    cond = lambda x, sig: fns.denoiser(params, x, sig, labels, None)
    if w is None:
        return cond
    null = jnp.full_like(labels, null_class)
    return lambda x, sig: guidance.guided_lcm(
        cond(x, sig), fns.denoiser(params, x, sig, null, None), w=w
    )


def make_consistency_sampler(
    fns: methods.ModelFns, grid: NoiseGrid, shape, *, clip_denoised, clip_output=True, guidance=None
):
    """jitted fn(params, key, ids, labels, sigmas, latents=None, noise=None, guidance=None) ->
    images in [-1, 1]: Algorithm 1 at the (traced) levels sigmas from x_T = sigma_max z. A
    guided model's w [B] is `guidance`, else the builder's `guidance` for every sample.

    z is latents [B, H, W, C], else per_sample_normal(key, id, 0); the re-noising draws are
    noise [B, K-1, H, W, C] (per sample, as rows are fed), else streams 1..K-1 of each id.
    One compilation serves every sigma list of the same length and batch shape.
    """

    w_of = functools.partial(_guidance, default=guidance)

    def consistency(params, key, ids, labels, sigmas, latents=None, noise=None, guidance=None):
        w = w_of(guidance, ids)
        kw = {} if w is None else {"guidance": w}
        f = lambda x, sig: fns.consistency(params, x, sig, labels, None, **kw)
        z = samplers.per_sample_normal(key, ids, shape, 0) if latents is None else latents
        num = sigmas.shape[0]
        if noise is not None:
            noise = jnp.moveaxis(noise, 1, 0)
        elif num > 1:
            draws = [samplers.per_sample_normal(key, ids, shape, j + 1) for j in range(num - 1)]
            noise = jnp.stack(draws)
        return samplers.multistep_sample(
            f,
            grid.sigma_max * z,
            sigmas,
            noise,
            sigma_min=grid.sigma_min,
            sigma_max=grid.sigma_max,
            clip_denoised=clip_denoised,
            clip_output=clip_output,
        )

    return jax.jit(consistency)


def make_sample_fn(
    config, network: networks.Network, sampler: SamplerSpec | None = None, *, decode=None
):
    """The configured sampler (or `sampler`) of the configured network: see make_sampler.

    decode (latent.decoder): the network's samples are latents, returned decoded to images.
    """
    d = config.data
    sampler = sampling_spec.sampler(config) if sampler is None else sampler
    shape = (d.image_size, d.image_size, d.num_channels)
    fn = make_sampler(
        networks.model_fns(network, config),
        sampler,
        methods.noise_grid(config),
        shape,
        clip_output=decode is None,
        null_class=d.num_classes if config.model.null_label else None,
    )
    return latent.decoded(fn, decode)


def consistency_sampler(config, network: networks.Network):
    """make_consistency_sampler of the configured consistency model: fn(params, key, ids,
    labels, sigmas, latents=None, noise=None, guidance=None), compiled once per batch shape and
    step count."""
    d = config.data
    return make_consistency_sampler(
        networks.model_fns(network, config),
        methods.noise_grid(config),
        (d.image_size, d.image_size, d.num_channels),
        clip_denoised=config.sampling.clip_denoised,
        clip_output=not latent.enabled(config),  # latents are decoded, then clipped
        guidance=sampling_spec.sampling_guidance(config),
    )


def sample_labels(config, ids: np.ndarray) -> np.ndarray:
    """Class labels per sample id: the configured class, or uniform draws from fold_in(seed, id)
    over data.classes where set (the classes trained on and in the FID reference), else over
    every class."""
    d, s = config.data, config.sampling
    if not d.class_conditional:
        return np.zeros(len(ids), np.int32)
    if s.class_label >= 0:
        if s.class_label >= d.num_classes:
            raise ValueError(f"sampling.class_label {s.class_label} >= data.num_classes")
        return np.full(len(ids), s.class_label, np.int32)
    if d.classes:
        classes = np.asarray(d.classes, np.int32)
        return classes[random_labels(jax.random.key(s.seed), ids, len(classes))]
    return random_labels(jax.random.key(s.seed), ids, d.num_classes)


def random_labels(key, ids: np.ndarray, num_classes: int) -> np.ndarray:
    """Uniform class labels per sample id k, drawn from fold_in(fold_in(key, 2^20), k)."""
    key = jax.random.fold_in(key, 1 << 20)
    draw = lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, num_classes)
    return np.asarray(jax.vmap(draw)(jnp.asarray(ids, jnp.uint32)), np.int32)


def gather(x) -> np.ndarray:
    """Every process's rows of a global array, on the host."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _padded(name: str, rows: np.ndarray, batch: int) -> np.ndarray:
    """rows filled up to `batch`: ids count on past the last one, other inputs repeat it."""
    extra = batch - len(rows)
    if name == "ids":
        return np.concatenate([rows, rows[-1] + 1 + np.arange(extra)]).astype(np.int32)
    return np.concatenate([rows, np.repeat(rows[-1:], extra, axis=0)])


def sample_rows(sample_fn, params, key, rows: dict, mesh, batch: int, convert=np.asarray):
    """convert(images) of every row: rows['ids'], rows['labels'] and any other per-sample input
    of sample_fn(params, key, **inputs), `batch` per call spread over the mesh (every device and
    host; each process feeds its rows). Image k depends only on (key, k) and its own inputs:
    any split of the rows, any batch and any mesh give the same images."""
    index, count = sharding.process_rows(mesh, batch)
    local = slice(index * batch // count, (index + 1) * batch // count)
    out = []
    for start in range(0, len(rows["ids"]), batch):
        part = {k: np.asarray(v[start : start + batch]) for k, v in rows.items()}
        inputs = {k: _padded(k, v, batch)[local] for k, v in part.items()}
        g = sharding.global_array(inputs, sharding.batch_sharding(mesh))
        out.append(convert(gather(sample_fn(params, key, **g)))[: len(part["ids"])])
    return np.concatenate(out)


def sample_ids(config, sample_fn, params, ids: np.ndarray, mesh, batch: int):
    """(uint8 samples, labels) of the given sample ids, `batch` per call spread over the mesh
    (sample_rows). Image k depends only on (sampling.seed, k): any split of the ids, any batch
    and any mesh give the same images."""
    labels = sample_labels(config, ids)
    key = jax.random.key(config.sampling.seed)
    rows = {"ids": np.asarray(ids, np.int32), "labels": labels}
    return sample_rows(sample_fn, params, key, rows, mesh, batch, image_io.to_uint8), labels


def sampling_mesh(batch: int):
    """Every device when they divide the batch; on one host, else the most that do."""
    devices = jax.devices()
    if batch % len(devices) and jax.process_count() > 1:
        raise ValueError(
            f"sampling.batch_size={batch} must be divisible by the device count ({len(devices)})"
        )
    count = max(k for k in range(1, len(devices) + 1) if batch % k == 0)
    return sharding.make_mesh(1, devices[:count])


def generate(config, network, params, num: int, sample_fn=None, mesh=None):
    """num images (uint8 NHWC) and their labels over every device (sampling.batch_size per
    call); sample k depends only on (seed, k)."""
    sample_fn = sample_fn or make_sample_fn(config, network)
    mesh = sampling_mesh(config.sampling.batch_size) if mesh is None else mesh
    params = jax.device_put(params, sharding.replicated(mesh))
    ids = np.arange(num)
    return sample_ids(config, sample_fn, params, ids, mesh, config.sampling.batch_size)


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
    network = networks.build_network(config)
    params, _, step = load_checked(config, ckpt_dir, network, ema_index=s.ema_index, step=step)
    sample_fn = make_sample_fn(config, network, decode=latent.decoder(config))
    images, labels = generate(config, network, params, s.num_samples, sample_fn)
    if jax.process_index() != 0:
        return None
    out = write_samples(
        pathlib.Path(workdir) / "samples" / f"step_{step}",
        images,
        labels if config.data.class_conditional else None,
    )
    print(f"wrote {out} ({len(images)} images from checkpoint step {step})")
    return out


def load_checked(config, ckpt_dir, network, *, ema_index: int, step: int | None):
    """(EMA params, meta, step) of a checkpoint dir, its digest verified (step None: the newest
    sound one), checked to hold the configured network and a model of the config's kind."""
    params, meta, step = checkpoints.load_params(ckpt_dir, ema_index=ema_index, step=step)
    expected = checkpoints.param_fingerprint(abstract_params(config, network))
    found = {"model": meta.get("model"), "params": meta.get("params")}
    checkpoints.check_same_model(
        found, {"model": config.model.name, "params": expected}, f"{ckpt_dir} step {step}"
    )
    check_kind(meta, config, f"{ckpt_dir} step {step}")
    return params, meta, step


def check_kind(meta: dict, config, where: str) -> None:
    """The checkpoint's model is sampled as the config's method samples (consistency model,
    diffusion model, PD student) with the same parameterization; older checkpoints, which do
    not record it, are taken on the config's word with a warning."""
    t, m = config.training, config.model
    want = methods.row(t.loss).samples_as
    if "method" not in meta:
        if jax.process_index() == 0:
            print(
                f"WARNING: the checkpoint at {where} does not record its method (an older "
                f"checkpoint); sampling it as a training.loss={t.loss!r} model",
                flush=True,
            )
        return
    found, p = meta.get("samples_as"), meta.get("parameterization")
    if found != want or p != m.parameterization:
        raise checkpoints.ModelMismatchError(
            f"the checkpoint at {where} holds a training.loss={meta['method']!r} model (samples "
            f"as {found!r}, model.parameterization={p!r}), but this config's training.loss="
            f"{t.loss!r} samples as {want!r} with model.parameterization={m.parameterization!r}; "
            "use the config the checkpoint was trained with"
        )


def abstract_params(config, network: networks.Network):
    """Parameter shapes of the configured network, without allocating them."""
    d = config.data
    x = jnp.zeros((1, d.image_size, d.image_size, d.num_channels), jnp.float32)
    y = jnp.zeros((1,), jnp.int32)
    return jax.eval_shape(lambda: network.init(jax.random.key(0), x, y))


run = run_sample  # main.py's entry point of this mode
