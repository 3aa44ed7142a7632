"""Latent datasets: images encoded once by an autoencoder, cached as one array, built resumably."""

import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# encode(images uint8 [B, H, W, C], example ids [B]) -> latents [B, h, w, c]
EncodeFn = Callable[[np.ndarray, np.ndarray], Any]
LATENTS, LABELS, META = "latents.npy", "labels.npy", "meta.json"


def latent_encoder(model: Any, params: Any, *, sample: bool, seed: int = 0) -> EncodeFn:
    """encode(images, ids) -> scaled latents of uint8 images mapped to [-1, 1].

    `model` is an autoencoder with encode(x) -> posterior (mean, sample(noise)) and
    scale_latents(z). With `sample`, example k's noise is normal(fold_in(key(seed), k)): the
    latents do not depend on the batch size or the order of encoding.
    """
    key = jax.random.key(seed)

    def run(mod, x, ids):
        posterior = mod.encode(x)
        z = posterior.mode()
        if sample:
            draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), z.shape[1:], z.dtype)
            z = posterior.sample(jax.vmap(draw)(ids))
        return mod.scale_latents(z)

    @jax.jit
    def encode(params, images, ids):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        return model.apply(params, x, ids, method=run)

    return lambda images, ids: encode(params, images, ids)


def _check_meta(path: pathlib.Path, meta: Mapping[str, Any]) -> None:
    """Write meta.json, or check that an existing one describes the same encoding."""
    meta = json.loads(json.dumps(dict(meta)))  # tuples -> lists, as stored
    if not path.exists():
        path.write_text(json.dumps(meta, indent=1, sort_keys=True))
        return
    stored = json.loads(path.read_text())
    diff = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
    if diff:
        shown = ", ".join(f"{k}: {stored.get(k)!r} there, {meta.get(k)!r} now" for k in diff)
        raise ValueError(f"{path.parent} holds latents of another encoding ({shown})")


def _save_npz(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _encode_range(source, encode: EncodeFn, start: int, stop: int, batch_size: int) -> dict:
    """Latents and labels of examples [start, stop); every call of encode sees batch_size rows."""
    latents, labels = [], []
    for a in range(start, stop, batch_size):
        ids = np.arange(a, min(a + batch_size, stop))
        records = [source[int(i)] for i in ids]
        images = np.stack([np.asarray(r["image"]) for r in records])
        pad = batch_size - len(ids)  # the last batch repeats its last row: one compiled shape
        padded_ids = np.concatenate([ids, np.full(pad, ids[-1])])
        padded = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        latents.append(np.asarray(encode(padded, padded_ids), np.float32)[: len(ids)])
        labels.append(np.asarray([r.get("label", -1) for r in records], np.int32))
    return {"latents": np.concatenate(latents), "labels": np.concatenate(labels)}


def _assemble(out_dir: pathlib.Path, paths: list[pathlib.Path], n: int) -> None:
    """Shards -> latents.npy (written through a memmap, renamed when complete) and labels.npy."""
    with np.load(paths[0]) as first:
        shape, dtype = first["latents"].shape[1:], first["latents"].dtype
    tmp = out_dir / f"{LATENTS}.tmp"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, *shape))
    labels, offset = np.empty(n, np.int32), 0
    for path in paths:
        with np.load(path) as shard:
            k = len(shard["labels"])
            array[offset : offset + k], labels[offset : offset + k] = (
                shard["latents"],
                shard["labels"],
            )
            offset += k
    array.flush()
    del array
    np.save(out_dir / LABELS, labels)
    tmp.replace(out_dir / LATENTS)


def encode_dataset(
    source,
    encode: EncodeFn,
    out_dir: str | pathlib.Path,
    *,
    identity: Mapping[str, Any],
    shard_size: int = 4096,
    batch_size: int = 256,
    log: Callable[[str], None] = print,
) -> pathlib.Path:
    """Encode every record's 'image' of a random-access `source` once into out_dir/latents.npy.

    Work is done in shards of `shard_size` examples saved as they finish, so an interrupted run
    repeated with the same arguments skips the finished shards. `identity` says what makes the
    latents (autoencoder weights digest, mean or sample, seed, scaling): a folder made by another
    identity is refused. Labels (-1 where a record has none) go to labels.npy.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(source)
    _check_meta(out_dir / META, {**identity, "num_examples": n, "shard_size": shard_size})
    if (out_dir / LATENTS).exists():
        log(f"{out_dir}: latents cached")
        return out_dir
    ranges = [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]
    paths = [out_dir / f"shard_{a:08d}-{b:08d}.npz" for a, b in ranges]
    for c, ((start, stop), path) in enumerate(zip(ranges, paths, strict=True)):
        if path.exists():
            log(f"{out_dir.name}: shard {c + 1}/{len(paths)} done before")
            continue
        _save_npz(path, _encode_range(source, encode, start, stop, batch_size))
        log(f"{out_dir.name}: shard {c + 1}/{len(paths)} ({stop - start} examples)")
    _assemble(out_dir, paths, n)
    for path in paths:
        path.unlink()
    return out_dir


class LatentSource:
    """A finished latent folder as a random-access source of {'latent', 'label'} records."""

    def __init__(self, folder: str | pathlib.Path):
        folder = pathlib.Path(folder)
        if not (folder / LATENTS).exists():
            raise FileNotFoundError(f"{folder}: no {LATENTS}; run the encoding first")
        self.meta = json.loads((folder / META).read_text())
        self.latents = np.load(folder / LATENTS, mmap_mode="r")
        self.labels = np.load(folder / LABELS)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict:
        return {"latent": np.asarray(self.latents[index]), "label": self.labels[index]}
