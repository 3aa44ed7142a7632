"""ConsistencyPipeline: a consistency model sampled from Python, as diffusers' pipeline is."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from consistency.convert import diffusers
from consistency.core import samplers
from consistency.core.schedules import NoiseGrid
from consistency.experiment import latent, methods, networks, resume, sample, sampling_spec, spec
from consistency.io import image_io, sharding

OUTPUT_TYPES = ("pil", "np", "uint8", "jax")
SCHEDULER = "CMStochasticIterativeScheduler"


class ConsistencyPipeline:
    """Images of a consistency model, called as diffusers' ConsistencyModelPipeline.

    Build it with `from_workdir` (a training run) or `from_diffusers` (a ConsistencyModelPipeline
    folder). Each call spreads its batch over every device in calls of at most
    `batch_per_call` images; image k's noise is fold_in(key, k), so the images do not depend on
    the batch split or the device count. The sampler is compiled once per batch shape and step
    count (the noise levels are traced) and reused by later calls.
    """

    def __init__(
        self,
        *,
        network: networks.Network,
        params,
        fns: methods.ModelFns,
        grid: NoiseGrid,
        num_train_timesteps: int,
        image_shape: tuple[int, int, int],
        num_classes: int,
        clip_denoised: bool = True,
        default_sigmas: tuple[float, ...] | None = None,
        batch_per_call: int = 64,
        seed: int = 0,
        guidance: float | None = None,
        decode=None,
        classes: tuple[int, ...] = (),
    ):
        """image_shape is the network's sample shape (a latent model's latent); `decode`
        (latent.decoder) maps a latent model's samples to images, None for pixel models;
        `classes` (a run's data.classes) are the labels random ones are drawn from (() = all)."""
        self.network, self.params, self.grid = network, params, grid
        self.decode = decode
        self.guidance = guidance  # a guided model's default w (LCM's; guidance_scale = 1 + w)
        self.num_train_timesteps, self.image_shape = num_train_timesteps, tuple(image_shape)
        self.num_classes, self.batch_per_call, self.seed = num_classes, batch_per_call, seed
        self.classes = tuple(classes)
        self.default_sigmas = tuple(default_sigmas or (grid.sigma_max,))
        self._sample = sample.make_consistency_sampler(
            fns,
            grid,
            self.image_shape,
            clip_denoised=clip_denoised,
            clip_output=decode is None,  # latents are clipped after decoding
            guidance=guidance,
        )
        self._placed = {}  # device count -> (mesh, params replicated over it)

    @classmethod
    def from_workdir(cls, workdir, *, config=None, step: int | None = None, ema_index=None):
        """The pipeline of a training run: its recorded config (WORKDIR/runs.jsonl or
        config.json; or `config`), the checkpoint sampling.checkpoint_step (or `step`) and the
        EMA copy sampling.ema_index (or `ema_index`), as --mode=sample loads them. Without
        steps, timesteps or sigmas a call samples as the config's sampling.* says."""
        workdir = pathlib.Path(workdir)
        config = _recorded_config(workdir) if config is None else config
        spec.validate(config, mode="sample")
        t, s, d = config.training, config.sampling, config.data
        if methods.row(t.loss).samples_as != "consistency":
            raise ValueError(
                f"{workdir}: training.loss={t.loss!r} is not a consistency model; sample it "
                "with python main.py --mode=sample"
            )
        network = networks.build_network(config)
        step = (None if s.checkpoint_step < 0 else s.checkpoint_step) if step is None else step
        ema = s.ema_index if ema_index is None else ema_index
        params, _, _ = sample.load_checked(
            config, workdir / "checkpoints", network, ema_index=ema, step=step
        )
        return cls(
            network=network,
            params=params,
            fns=networks.model_fns(network, config),
            grid=methods.noise_grid(config),
            num_train_timesteps=s.steps,
            image_shape=(d.image_size, d.image_size, d.num_channels),
            num_classes=d.num_classes if d.class_conditional else 0,
            clip_denoised=s.clip_denoised,
            default_sigmas=sampling_spec.sampler(config).sigmas,
            batch_per_call=s.batch_size,
            seed=s.seed,
            guidance=sampling_spec.sampling_guidance(config),
            decode=latent.decoder(config),
            classes=tuple(d.classes) if d.class_conditional else (),
        )

    @classmethod
    def from_diffusers(cls, folder, *, batch_per_call: int = 64, seed: int = 0):
        """The pipeline of a diffusers ConsistencyModelPipeline folder (save_pretrained's, or
        python -m consistency.convert --to=diffusers): unet/ (UNet2DModel) and scheduler/
        (CMStochasticIterativeScheduler: its sigma_min, sigma_max, rho, sigma_data, N)."""
        folder = pathlib.Path(folder)
        sched = _scheduler_config(folder)
        module, params = diffusers.load_diffusers_unet(folder / "unet")
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
        channels = int(unet_config.get("in_channels", 3))
        if module.out_channels != channels:
            raise ValueError(
                f"{folder / 'unet'}: out_channels={module.out_channels} != in_channels="
                f"{channels}; ConsistencyModelPipeline samples models that predict the image"
            )
        params = jax.tree.map(lambda v: np.asarray(v, np.float32), params["params"])
        network = networks.Network(module, "adm", takes_labels=module.num_classes is not None)
        model = dict(sigma_data=sched["sigma_data"], sigma_min=sched["sigma_min"])
        model_config = ml_collections.ConfigDict({"model": {**model, "parameterization": "edm"}})
        size = int(unet_config["sample_size"])
        return cls(
            network=network,
            params=params,
            fns=networks.model_fns(network, model_config),
            grid=NoiseGrid(sched["sigma_min"], sched["sigma_max"], sched["rho"]),
            num_train_timesteps=sched["num_train_timesteps"],
            image_shape=(size, size, channels),
            num_classes=module.num_classes or 0,
            clip_denoised=sched["clip_denoised"],
            batch_per_call=batch_per_call,
            seed=seed,
        )

    def sigmas(self, *, num_inference_steps=None, timesteps=None, sigmas=None) -> np.ndarray:
        """The noise levels a call evaluates at (float32): diffusers' `num_inference_steps` or
        `timesteps` (descending indices of the N = num_train_timesteps Karras grid: [22, 0] is
        (sigma_0, sigma_22)), explicit `sigmas`, or the pipeline's default."""
        options = {"num_inference_steps": num_inference_steps, "timesteps": timesteps}
        given = [n for n, v in {**options, "sigmas": sigmas}.items() if v is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are given: give one of them")
        grid, n = self.grid, self.num_train_timesteps
        if sigmas is not None:
            out = np.asarray(sigmas, np.float32).reshape(-1)
            try:
                samplers.validate_sigmas(out, sigma_min=grid.sigma_min, sigma_max=grid.sigma_max)
            except ValueError as e:
                raise ValueError(f"sigmas: {e}") from None
            return out
        if not given:
            return np.asarray(self.default_sigmas, np.float32)
        name = given[0]
        value = num_inference_steps if name == "num_inference_steps" else list(timesteps)
        if not _integers([value] if name == "num_inference_steps" else value):
            raise ValueError(f"{name}={value!r}: give integers (timesteps e.g. [22, 0])")
        try:
            return samplers.diffusers_sigmas(n, **{name: value}, **grid.kwargs())
        except ValueError as e:
            raise ValueError(
                f"{name}={value!r}: {e} (indices of the num_train_timesteps={n} grid, "
                "diffusers' order: timesteps=[22, 0] or num_inference_steps=1)"
            ) from None

    def __call__(
        self,
        *,
        batch_size: int | None = None,
        class_labels=None,
        num_inference_steps: int | None = None,
        timesteps=None,
        sigmas=None,
        latents=None,
        noise=None,
        key=None,
        seed: int | None = None,
        output_type: str = "pil",
        guidance_scale: float | None = None,
    ):
        """batch_size images: a list of PIL images ('pil'), float32 NHWC in [0, 1] ('np'; a
        jax.Array: 'jax') or uint8 NHWC ('uint8').

        class_labels: an int, one per image, or None (random, from the key; unconditional
        models take None). latents: the initial noise z [B, H, W, C], unscaled as diffusers'
        (x_T = sigma_max z). noise: Algorithm 1's re-noising draws [K-1, B, H, W, C] for K
        noise levels (diffusers also draws a K-th, scaled by ~7e-7: leave it out). Without
        them, image k's z and draws come from fold_in(key, k); key: a jax key, or seed (an int;
        default the pipeline's seed). guidance_scale: a guided_cd student's w input as diffusers'
        LatentConsistencyModelPipeline takes it, w = guidance_scale - 1 (default: the config's
        sampling.guidance).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: choose one of {OUTPUT_TYPES}")
        levels = self.sigmas(
            num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas
        )
        rows = {}
        if latents is not None:
            rows["latents"] = self._latents(latents)
            batch_size = len(rows["latents"]) if batch_size is None else batch_size
        batch_size = 1 if batch_size is None else batch_size
        if not _integers([batch_size]) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a positive integer")
        if latents is not None and len(rows["latents"]) != batch_size:
            raise ValueError(
                f"latents hold {len(rows['latents'])} images but batch_size={batch_size}: "
                "give one latent per image (or leave batch_size out)"
            )
        if noise is not None:
            rows["noise"] = self._noise(noise, len(levels), batch_size)
        key = _key(key, seed, self.seed)
        ids = np.arange(batch_size, dtype=np.int32)
        rows.update(ids=ids, labels=self._labels(class_labels, key, ids))
        if guidance_scale is not None:
            rows["guidance"] = self._guidance(guidance_scale, batch_size)
        chunk = min(batch_size, self.batch_per_call)
        mesh, params = self._on_mesh(chunk)
        fn = latent.decoded(functools.partial(self._sample, sigmas=levels), self.decode)
        images = sample.sample_rows(fn, params, key, rows, mesh, chunk)
        return _output(images, output_type)

    def _on_mesh(self, batch: int):
        """(mesh, params replicated over it) of the devices that split `batch` (cached)."""
        mesh = sample.sampling_mesh(batch)
        count = mesh.devices.size
        if count not in self._placed:
            self._placed[count] = (mesh, jax.device_put(self.params, sharding.replicated(mesh)))
        return self._placed[count]

    def _guidance(self, guidance_scale, batch_size: int) -> np.ndarray:
        """w = guidance_scale - 1 per image, as diffusers' LCM pipeline embeds it."""
        if self.guidance is None:
            raise ValueError(
                "guidance_scale: this model has no guidance input (a guided_cd student has "
                "model.guidance_embed_dim > 0); leave guidance_scale out"
            )
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float):
            raise ValueError(f"guidance_scale={guidance_scale!r}: give a number (1 + LCM's w)")
        return np.full(batch_size, guidance_scale - 1.0, np.float32)

    def _latents(self, latents) -> np.ndarray:
        z = np.asarray(latents, np.float32)
        if z.ndim != 4 or z.shape[1:] != self.image_shape:
            raise ValueError(
                f"latents of shape {z.shape}: give [batch, {', '.join(map(str, self.image_shape))}]"
                " (NHWC; diffusers' NCHW latents: np.moveaxis(latents, 1, -1))"
            )
        return z

    def _noise(self, noise, num_levels: int, batch_size: int) -> np.ndarray:
        """Re-noising draws [K-1, B, H, W, C] -> per-image rows [B, K-1, H, W, C]."""
        z = np.asarray(noise, np.float32)
        want = (num_levels - 1, batch_size, *self.image_shape)
        if z.shape != want:
            raise ValueError(
                f"noise of shape {z.shape}: give {want}, one draw per noise level after the "
                f"first ({num_levels} levels) and image, NHWC"
            )
        return np.moveaxis(z, 0, 1)

    def _labels(self, class_labels, key, ids: np.ndarray) -> np.ndarray:
        """Labels per image: the given int or list, else random ones of `classes` as
        --mode=sample draws them (unconditional: zeros)."""
        if not self.num_classes:
            if class_labels is not None:
                raise ValueError(
                    "class_labels: this model is unconditional; leave class_labels out (None)"
                )
            return np.zeros(len(ids), np.int32)
        if class_labels is None and self.classes:
            classes = np.asarray(self.classes, np.int32)
            return classes[sample.random_labels(key, ids, len(classes))]
        if class_labels is None:
            return sample.random_labels(key, ids, self.num_classes)
        values = [class_labels] * len(ids) if np.ndim(class_labels) == 0 else list(class_labels)
        if len(values) != len(ids) or not _integers(values):
            raise ValueError(
                f"class_labels={class_labels!r}: give an int or {len(ids)} ints (one per image)"
            )
        if any(not 0 <= v < self.num_classes for v in values):
            raise ValueError(
                f"class_labels={class_labels!r}: give classes in [0, {self.num_classes})"
            )
        return np.asarray(values, np.int32)


def _integers(values) -> bool:
    return all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values)


def _key(key, seed, default: int):
    """The call's jax key: `key`, or jax.random.key(seed or the pipeline's seed)."""
    if key is not None and seed is not None:
        raise ValueError("key and seed are both given: give one (seed=int, or key=a jax key)")
    if key is None:
        seed = default if seed is None else seed
        if not _integers([seed]) or seed < 0:
            raise ValueError(f"seed={seed!r}: give an integer >= 0 (or key=jax.random.key(...))")
        return jax.random.key(seed)
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
    if not (typed and key.shape == ()) and not raw:
        raise ValueError(f"key={key!r}: give one jax key (jax.random.key(0)), or seed=int")
    return key


def _output(images: np.ndarray, output_type: str):
    """Images in [-1, 1] as output_type: clamp(x/2 + 0.5, 0, 1) as diffusers does, or uint8."""
    if output_type in ("uint8", "pil"):
        out = image_io.to_uint8(images)
        if output_type == "uint8":
            return out
        from PIL import Image

        return [Image.fromarray(u[..., 0] if u.shape[-1] == 1 else u) for u in out]
    out = np.clip(images / 2 + 0.5, 0.0, 1.0).astype(np.float32)
    return jnp.asarray(out) if output_type == "jax" else out


def _scheduler_config(folder: pathlib.Path) -> dict:
    """The folder's CMStochasticIterativeScheduler settings, checked."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not (folder / "unet" / "config.json").is_file() or not path.is_file():
        raise FileNotFoundError(
            f"{folder}: not a ConsistencyModelPipeline folder (needs unet/config.json and "
            "scheduler/scheduler_config.json, as save_pretrained or python -m consistency.convert"
            " --to=diffusers write)"
        )
    sched = json.loads(path.read_text())
    if sched.get("_class_name", SCHEDULER) != SCHEDULER:
        raise ValueError(f"{path}: a {sched['_class_name']}, not a {SCHEDULER}")
    if sched.get("s_noise", 1.0) != 1.0:
        raise ValueError(f"{path}: s_noise={sched['s_noise']}; Algorithm 1 re-noises with 1.0")
    defaults = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5, clip_denoised=True)
    return {**defaults, "num_train_timesteps": 40, **sched}


def _tuples(value):
    """JSON lists back to the tuples configs hold."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _recorded_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    """The config a run recorded (its last start), with keys newer than the run defaulted."""
    recorded, _ = resume.recorded_config(workdir)
    if recorded is None:
        raise FileNotFoundError(
            f"{workdir}: no runs.jsonl or config.json (not a training run's --workdir); pass "
            "config= (the ConfigDict it was made with, e.g. a converted checkpoint's)"
        )
    config = ml_collections.ConfigDict(_tuples(recorded))
    if "timesteps" not in config.sampling:
        config.sampling.timesteps = ()
    return config
