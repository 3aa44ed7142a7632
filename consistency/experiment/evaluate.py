"""--mode=eval: sample checkpoints in resumable shards, extract features, score vs a reference."""

import dataclasses
import hashlib
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from consistency.experiment import latent, networks, paths, sample, sampling_spec, search, spec
from consistency.io import checkpoints, data, image_io, sharding
from consistency.measure import digits, inception, metrics

ADM_REF_BATCHES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"


def feature_kind(config) -> str:
    kind = config.eval.features
    if kind not in spec.FEATURES:
        raise ValueError(f"unknown eval.features: {kind!r}; choose one of {spec.FEATURES}")
    return kind


def classifier_folder(config, kind: str) -> str:
    """Where a dataset classifier's training data are: data.folder when the run reads that
    dataset (fashion_mnist's idx files), else the dataset's default ('')."""
    return config.data.folder if kind != "digits" and config.data.name == kind else ""


def classifier_params(config, cache_dir: pathlib.Path, kind: str) -> dict:
    """The cached (else trained) params of the classifier of eval.features=kind (digits.py)."""
    hparams = digits.CLASSIFIERS[kind]
    return digits.load_or_train(cache_dir, hparams, folder=classifier_folder(config, kind))


def make_extractor(config, cache_dir: pathlib.Path):
    """uint8 NHWC images -> {"pool": [B, D] (FID, P/R, KID), "logits": [B, K] (IS)
    [, "spatial": sFID]}: the FID Inception or a dataset classifier (digits, fashion_mnist)."""
    e = config.eval
    kind = feature_kind(config)
    if kind in digits.CLASSIFIERS:
        params = classifier_params(config, cache_dir, kind)
        fn = digits.make_feature_fn(params, digits.CLASSIFIERS[kind])

        def digits_features(images):
            out = fn(images)
            return {"pool": out["features"], "logits": out["logits"]}

        return digits_features
    if not e.inception_path:
        raise ValueError(
            "eval.features='inception' needs eval.inception_path: pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth"
        )
    if not pathlib.Path(e.inception_path).is_file():
        raise FileNotFoundError(f"eval.inception_path: no such file {e.inception_path!r}")
    variables = inception.load_inception_variables(e.inception_path)
    fn = inception.make_inception_fn(variables, resize_protocol=e.resize)

    def extract(images):
        if images.shape[-1] == 1:  # grey images meet the RGB network as three equal channels
            images = jnp.repeat(images, 3, axis=-1)
        out = fn(images)
        # ADM's Inception Score uses pool3 @ W without the bias.
        return {"pool": out["pool3"], "spatial": out["spatial"], "logits": out["logits_nobias"]}

    return extract


def features_of(images: np.ndarray, extract, mesh, batch: int) -> dict[str, np.ndarray]:
    """Features of uint8 images, in global batches spread over the mesh (the last one padded)."""
    index, count = sharding.process_rows(mesh, batch)
    rows = slice(index * batch // count, (index + 1) * batch // count)
    out = []
    for start in range(0, len(images), batch):
        part = images[start : start + batch]
        padded = np.concatenate([part, np.repeat(part[-1:], batch - len(part), axis=0)])
        x = sharding.global_array(padded[rows], sharding.batch_sharding(mesh))
        out.append({k: sample.gather(v)[: len(part)] for k, v in extract(x).items()})
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def sample_ids(config, sample_fn, params, ids: np.ndarray, mesh) -> tuple[np.ndarray, np.ndarray]:
    """uint8 samples and labels of the given sample ids, eval.batch_size per call over the mesh
    (sample.sample_ids): any split of the ids gives the same images."""
    return sample.sample_ids(config, sample_fn, params, ids, mesh, config.eval.batch_size)


def _setting_dir(
    config, workdir, step: int, setting: str, sampler, kind: str, checkpoint: str
) -> pathlib.Path:
    """WORKDIR/eval/step_{k}/{setting}-{hash of everything the chunks depend on}: the
    checkpoint's digest, the sampler spec and the feature network's weights among them."""
    s, m, e = config.sampling, config.model, config.eval
    keyed = dict(
        setting=setting,
        checkpoint=checkpoint,
        seed=s.seed,
        ema=e.ema_index,
        features=kind,
        resize=e.resize if kind == "inception" else "",
        feature_network=feature_network_id(config, workdir, kind),
        class_label=s.class_label,
        sampler=dataclasses.asdict(sampler),
        grid=[m.sigma_min, m.sigma_max, m.rho],
    )
    if latent.enabled(config):  # the images are decoded latents: the decoder makes them too
        keyed["decoder"] = latent.vae_digest(config)
    if config.data.classes:  # the random labels come from these classes (sample.sample_labels)
        keyed["classes"] = [int(c) for c in config.data.classes]
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:8]
    name = setting.replace(",", "-").replace("=", "-") + "-" + digest
    return pathlib.Path(workdir) / "eval" / f"step_{step}" / name


def feature_network_id(config, workdir, kind: str) -> str:
    """A digest of the feature network: the Inception weights file and eval.resize, or a
    dataset classifier's params (a function of its hyper-parameters and training data)."""
    if kind in digits.CLASSIFIERS:
        return digits.params_digest(classifier_params(config, cache_dir(config, workdir), kind))
    path = pathlib.Path(config.eval.inception_path).resolve()
    return f"{paths.file_digest(path)}:{config.eval.resize}"


def _save_npz(path: pathlib.Path, arrays: dict) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def sample_features(
    config, network, params, out_dir: pathlib.Path, extract, mesh, sampler=None, sample_fn=None
) -> dict:
    """Features (and labels) of sample ids [0, eval.num_samples), reusing finished chunks."""
    e = config.eval
    sample_fn = sample_fn or sample.make_sample_fn(config, network, sampler)
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    # A shard is named by its id range: a partial last chunk of a smaller run is not reused.
    ranges = [
        (a, min(a + e.chunk_size, e.num_samples)) for a in range(0, e.num_samples, e.chunk_size)
    ]
    paths = [out_dir / f"chunk_{a:07d}-{b:07d}.npz" for a, b in ranges]
    reused = 0
    for c, ((start, stop), path) in enumerate(zip(ranges, paths, strict=True)):
        # Every process must take the same branch: process 0's file system decides.
        if bool(multihost_utils.broadcast_one_to_all(np.asarray(path.exists()))):
            reused += 1
            continue
        ids = np.arange(start, stop)
        images, labels = sample_ids(config, sample_fn, params, ids, mesh)
        arrays = dict(features_of(images, extract, mesh, e.batch_size), labels=labels)
        if e.save_samples:
            arrays["images"] = images
        if jax.process_index() == 0:
            _save_npz(path, arrays)
            print(f"  {out_dir.name}: chunk {c + 1}/{len(paths)} ({len(ids)} samples)", flush=True)
    if reused and jax.process_index() == 0:
        print(f"  {out_dir.name}: reused {reused}/{len(paths)} chunks", flush=True)
    if jax.process_index() != 0:
        return {}
    parts = []
    for path in paths:
        with np.load(path) as stored:
            parts.append({k: stored[k] for k in stored.files if k != "images"})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def reference_statistics(features: dict) -> dict[str, np.ndarray]:
    """{"pool", "mu", "sigma"[, "mu_s", "sigma_s"]} of reference features."""
    out = {"pool": features["pool"]}
    out["mu"], out["sigma"] = metrics.feature_statistics(features["pool"])
    if "spatial" in features:
        out["mu_s"], out["sigma_s"] = metrics.feature_statistics(features["spatial"])
    return out


def split_features(config, split: str, extract, mesh, *, limit: int = 0) -> dict:
    """Features of the first `limit` (0: all) images of a dataset split (of data.classes), read
    as training reads them (data.Preprocess, no flips) and quantised back to the uint8 the
    samples meet."""
    d, e = config.data, config.eval
    source = data.make_source(
        d.name, split=split, data_dir=d.data_dir or None, folder=d.folder, classes=d.classes
    )
    n = len(source) if limit <= 0 else min(limit, len(source))
    # The images themselves, also for a latent model (its samples are decoded before features).
    prep = data.Preprocess(*latent.image_shape(config), random_flip=False)
    rng = np.random.default_rng(0)
    block = 16 * e.batch_size  # bounded memory for large splits
    parts = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        floats = np.stack([prep.random_map(source[i], rng)["image"] for i in range(start, stop)])
        parts.append(features_of(image_io.to_uint8(floats), extract, mesh, e.batch_size))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _cached(path: pathlib.Path, compute) -> dict:
    """Load the npz at path, or compute (on every process: collectives) and write it (process 0)."""
    if bool(multihost_utils.broadcast_one_to_all(np.asarray(path.exists()))):
        with np.load(path) as stored:
            return {k: stored[k] for k in stored.files}
    result = compute()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_npz(path, result)
    return result


def reference(config, workdir, extract, mesh, kind: str) -> tuple[dict, str]:
    """({"mu", "sigma"[, "mu_s", "sigma_s"][, "pool"]}, description) of the reference set.

    eval.reference: an ADM reference batch (stored mu/sigma are used for FID and sFID, as ADM
    does; its images, arr_0, give the features for precision/recall and KID) or a mu/sigma npz.
    '' computes them from the eval.reference_split images, cached in `cache_dir`.
    """
    e, d = config.eval, config.data
    network_tag = feature_network_id(config, workdir, kind)
    if e.reference:
        path = pathlib.Path(e.reference)
        if not path.is_file():
            raise FileNotFoundError(
                f"eval.reference: no such file {e.reference!r} (ADM reference batches: "
                f"{ADM_REF_BATCHES}imagenet/64/VIRTUAL_imagenet64_labeled.npz, ...)"
            )
        stored = metrics.load_reference_batch(path)
        ref = {k: stored[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in stored}
        if "arr_0" in stored:
            st = path.stat()
            tag = [str(path.resolve()), st.st_size, st.st_mtime_ns, kind, network_tag]
            cache = path_for(cache_dir(config, workdir), "reference", tag)
            images = stored["arr_0"]
            ref = {**_cached(cache, lambda: reference_statistics(features_of(
                images, extract, mesh, e.batch_size))), **ref}  # fmt: skip
        if "mu" not in ref:
            raise ValueError(f"eval.reference {path} holds neither mu/sigma nor images (arr_0)")
        return ref, str(path)
    tag = [d.name, d.data_dir, d.folder, e.reference_split, *latent.image_shape(config),
           e.reference_limit, kind, network_tag]  # fmt: skip
    if d.classes:  # a class subset (data.classes) is its own reference; () keeps the old tag
        tag.append([int(c) for c in d.classes])
    cache = path_for(cache_dir(config, workdir), "reference", tag)
    compute = lambda: reference_statistics(
        split_features(config, e.reference_split, extract, mesh, limit=e.reference_limit)
    )
    limit = f", first {e.reference_limit}" if e.reference_limit > 0 else ""
    classes = f", classes {tuple(d.classes)}" if d.classes else ""
    return _cached(cache, compute), f"{d.name}:{e.reference_split}{limit}{classes}"


def cache_dir(config, workdir) -> pathlib.Path:
    """Where the dataset classifiers and reference statistics are cached: eval.cache_dir, or
    WORKDIR/eval/cache. Entries are named by a hash of what made them, so runs can share one."""
    return pathlib.Path(config.eval.cache_dir or pathlib.Path(workdir) / "eval" / "cache")


def path_for(directory, stem: str, tag) -> pathlib.Path:
    digest = hashlib.sha256(json.dumps(tag, sort_keys=True).encode()).hexdigest()[:12]
    return pathlib.Path(directory) / f"{stem}-{digest}.npz"


def class_labels(config, kind: str, labels: np.ndarray):
    """The labels class-conditional samples were asked for, when a dataset classifier scores
    them (score's class accuracy); None otherwise (Inception's classes are not the data's)."""
    return labels if config.data.class_conditional and kind in digits.CLASSIFIERS else None


def score(samples: dict, ref: dict, *, kind: str, labels=None) -> dict[str, float]:
    """FID, and sFID, IS, precision/recall (k = 3) and KID where the features and reference allow;
    with `labels` (class_labels), class_accuracy: argmax of the classifier's logits == label.

    Frechet distances use scipy's sqrtm for Inception features (the numbers pytorch-fid and the
    ADM evaluator report) and the eigenvalue form for the classifier features and whenever there
    are no more samples than dimensions (the same quantity, well defined at low rank).
    """

    def frechet(features, mu, sigma):
        low_rank = kind in digits.CLASSIFIERS or len(features) <= features.shape[1]
        stats = metrics.feature_statistics(features)
        return metrics.frechet_distance(*stats, mu, sigma, method="eig" if low_rank else "sqrtm")

    out = {"fid": frechet(samples["pool"], ref["mu"], ref["sigma"])}
    if "spatial" in samples and "mu_s" in ref:
        out["sfid"] = frechet(samples["spatial"], ref["mu_s"], ref["sigma_s"])
    out["is"] = metrics.inception_score(logits=samples["logits"], split_size=5000)
    if "pool" in ref:
        out["precision"], out["recall"] = metrics.precision_recall(ref["pool"], samples["pool"])
        out["kid"], out["kid_std"] = metrics.kernel_inception_distance(samples["pool"], ref["pool"])
    if labels is not None:
        out["class_accuracy"] = metrics.class_accuracy(samples["logits"], labels)
    return out


def _load_params(config, workdir, network, step: int | None):
    """(EMA params (eval.ema_index), step, the checkpoint's digest) of a checkpoint, its
    integrity verified and checked against the config's network and method."""
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    params, meta, step = sample.load_checked(
        config, ckpt_dir, network, ema_index=config.eval.ema_index, step=step
    )
    # Cached shards are keyed by what produced them: a replaced checkpoint has another digest.
    ident = meta.get("digest") or [step, (ckpt_dir / str(step)).stat().st_mtime_ns]
    return params, step, hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def validate(config, mesh) -> dict:
    """{setting: its SamplerSpec, or (lo, hi) of a search}, after one clear error per bad key."""
    spec.validate(config, mode="eval", num_devices=mesh.devices.size)
    spec.check_paths(config, mode="eval")
    settings = config.eval.settings
    return {
        s: sampling_spec.search_range(config, s) or sampling_spec.sampler(config, s)
        for s in settings
    }


class _Scorer:
    """Scores one sampler setting of one checkpoint: shards, metrics, the printed line and
    TensorBoard (process 0: metrics; other processes sample and get None)."""

    def __init__(self, config, workdir, network, extract, ref, kind, mesh, writer, decode=None):
        self.config, self.workdir, self.network, self.extract = config, workdir, network, extract
        self.ref, self.kind, self.mesh, self.writer = ref, kind, mesh, writer
        self.decode = decode  # latent.decoder: a latent model's samples become images

    def __call__(self, params, step, checkpoint, setting, sampler, sample_fn=None):
        start = time.time()
        out_dir = _setting_dir(
            self.config, self.workdir, step, setting, sampler, self.kind, checkpoint
        )
        sample_fn = sample_fn or sample.make_sample_fn(
            self.config, self.network, sampler, decode=self.decode
        )
        samples = sample_features(
            self.config, self.network, params, out_dir, self.extract, self.mesh, sampler, sample_fn
        )
        if jax.process_index() != 0:
            return None
        labels = class_labels(self.config, self.kind, samples["labels"])
        result = score(samples, self.ref, kind=self.kind, labels=labels)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in result.items())
        print(f"step {step} setting {setting}: {shown}  ({time.time() - start:.1f} s)")
        for name, value in result.items():
            self.writer.add_scalar(f"eval/{setting}/{name}", value, step)
        return result


def run_eval(config, workdir) -> dict[int, dict]:
    """--mode=eval: {checkpoint step: {setting: metrics}}, also written as JSON and TensorBoard.

    For each checkpoint (eval.checkpoint_steps) and sampler setting (eval.settings), sample ids
    [0, eval.num_samples) are generated in chunks of eval.chunk_size: every global batch is
    spread over the device mesh (each process computes its rows; sample k's noise is
    fold_in(seed, k)), quantised to uint8 once and passed through the feature network (the FID
    Inception, or a dataset classifier). Process 0 writes each finished chunk (features, labels
    and optionally the images) to WORKDIR/eval/step_{k}/{setting}-{hash}/; a rerun reuses the
    chunks it finds, so an interrupted evaluation resumes. The metrics go to
    WORKDIR/eval/metrics_step{k}.json and to TensorBoard (eval/{setting}/{metric}).
    """
    e = config.eval
    workdir = pathlib.Path(workdir)
    mesh = sharding.make_mesh()
    samplers = validate(config, mesh)
    kind = feature_kind(config)
    extract = make_extractor(config, cache_dir(config, workdir))
    ref, ref_name = reference(config, workdir, extract, mesh, kind)
    network = networks.build_network(config)
    writer = None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter  # TensorBoard event files without TensorFlow

        writer = SummaryWriter(str(workdir / "tensorboard"))
    decode = latent.decoder(config)
    scorer = _Scorer(config, workdir, network, extract, ref, kind, mesh, writer, decode)
    results = {}
    for wanted in list(e.checkpoint_steps) or [None]:
        params, step, checkpoint = _load_params(config, workdir, network, wanted)
        params = jax.device_put(params, sharding.replicated(mesh))
        results[step], searches = {}, {}
        for setting, sampler in samplers.items():
            if isinstance(sampler, tuple):  # a search: its evaluated settings, then its summary
                found = search.search_two_step(
                    config, scorer, network=network, params=params, step=step,
                    checkpoint=checkpoint, setting=setting, bounds=sampler,
                )  # fmt: skip
                searches[setting] = found.pop(setting, None)
                results[step].update(found)
            elif (result := scorer(params, step, checkpoint, setting, sampler)) is not None:
                results[step][setting] = result
        if jax.process_index() == 0:
            record = {
                "step": step, "num_samples": e.num_samples, "features": kind, "reference": ref_name,
                "ema_index": e.ema_index, "seed": config.sampling.seed, "settings": results[step],
            }  # fmt: skip
            if searches:
                record["search"] = searches
            checkpoints.write_json(workdir / "eval" / f"metrics_step{step}.json", record)
    if writer is not None:
        writer.close()
    return results


run = run_eval  # main.py's entry point of this mode
