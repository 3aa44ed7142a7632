"""--mode=eval: the digits classifier, digits FID, split-invariant sampling, resumable scoring."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import test as test_config
from consistency.experiment import evaluate, networks, sample, sampling_spec, search, spec, train
from consistency.io import sharding
from consistency.measure import digits

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache directory holding the trained digits classifier (trained once per module)."""
    directory = tmp_path_factory.mktemp("cache")
    digits.load_or_train(directory)
    return directory


def test_classifier_accuracy_on_the_test_split(cache, monkeypatch):
    monkeypatch.setattr(digits, "train", lambda *a, **k: pytest.fail("the cache was ignored"))
    params = digits.load_or_train(cache)
    assert digits.accuracy(params, "test") > 0.95
    other = dict(digits.HPARAMS, steps=301)
    assert digits.cache_path(cache, other) != digits.cache_path(cache)


def test_digits_fid_floor_and_noise(cache, tmp_path):
    """The 'test' split scored against the 'train' reference (the floor) is close; noise is far."""
    config, mesh = test_config.get_config(), sharding.make_mesh()
    extract = evaluate.make_extractor(config, cache)
    ref, name = evaluate.reference(config, tmp_path, extract, mesh, "digits")
    assert name == "digits:train" and ref["pool"].shape == (1437, digits.HPARAMS["features"])
    floor = evaluate.score(
        evaluate.split_features(config, "test", extract, mesh), ref, kind="digits"
    )
    noise_images = np.random.default_rng(0).integers(0, 256, (360, 8, 8, 1), dtype=np.uint8)
    noise_features = evaluate.features_of(noise_images, extract, mesh, config.eval.batch_size)
    noise = evaluate.score(noise_features, ref, kind="digits")
    assert 0 < floor["fid"] < 25 and noise["fid"] > 10 * floor["fid"]
    assert floor["precision"] > 0.8 and noise["precision"] < 0.2
    assert floor["is"] > 8 and noise["is"] < floor["is"]


def test_sample_ids_do_not_depend_on_how_the_ids_are_split():
    """Generating ids [0, n) in one call equals the concatenation of its two halves (8 devices)."""
    config = test_config.get_config()
    sampler = sampling_spec.sampler(config, "0,22,39")  # re-noises once
    mesh = sharding.make_mesh()
    network = networks.build_network(config)
    x, y = np.zeros((1, 8, 8, 1), np.float32), np.zeros((1,), np.int32)
    params = jax.device_get(jax.jit(network.init)(jax.random.key(0), x, y))
    # A fresh network's output layer is zero: perturb every weight so samples vary.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda v: v + 0.05 * rng.standard_normal(v.shape, np.float32), params)
    params = jax.device_put(params, sharding.replicated(mesh))
    sample_fn = sample.make_sample_fn(config, network, sampler)
    ids = np.arange(40)  # batches of 32: the whole is one full and one padded batch
    whole, labels = evaluate.sample_ids(config, sample_fn, params, ids, mesh)
    first, _ = evaluate.sample_ids(config, sample_fn, params, ids[:20], mesh)
    second, _ = evaluate.sample_ids(config, sample_fn, params, ids[20:], mesh)
    assert whole.shape == (40, 8, 8, 1) and whole.dtype == np.uint8 and whole.std() > 10
    np.testing.assert_array_equal(whole, np.concatenate([first, second]))
    # --mode=sample spreads its batches over every device too: the same images as on one device.
    config.sampling.batch_size = 8
    spread, _ = sample.generate(config, network, params, 40, sample_fn)
    single, _ = sample.generate(
        config, network, params, 40, sample_fn, mesh=sharding.make_mesh(1, jax.devices()[:1])
    )
    np.testing.assert_array_equal(spread, whole)
    np.testing.assert_array_equal(single, whole)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, cache):
    """A 2-step run of configs/test.py, then `main.py --mode=eval` (64 samples, two settings)."""
    workdir = tmp_path_factory.mktemp("run")
    config = test_config.get_config()
    config.training.num_steps = 2
    train.train_and_evaluate(config, str(workdir))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, str(REPO / "main.py"), "--config=configs/test.py"]
    # The shared cache holds the classifier, trained once: a retraining would show as a new file.
    command += [f"--workdir={workdir}", "--mode=eval", f"--config.eval.cache_dir={cache}"]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, config


def _metrics(workdir) -> dict:
    return json.loads((workdir / "eval" / "metrics_step2.json").read_text())


def test_eval_writes_metrics_for_each_setting(evaluated):
    workdir, _ = evaluated
    record = _metrics(workdir)
    assert record["step"] == 2 and record["num_samples"] == 64 and record["features"] == "digits"
    assert set(record["settings"]) == {"1", "0,22,39"}
    for values in record["settings"].values():
        assert {"fid", "is", "precision", "recall", "kid"} <= set(values)
        assert all(np.isfinite(v) for v in values.values()) and values["fid"] > 0
    chunks = sorted((workdir / "eval" / "step_2").rglob("chunk_*.npz"))
    assert len(chunks) == 4  # 2 settings x 64 samples / 32 per chunk
    with np.load(chunks[0]) as chunk:
        assert chunk["images"].shape == (32, 8, 8, 1) and chunk["pool"].shape == (32, 64)
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) >= 2


def test_eval_cache_dir_is_shared(evaluated, cache):
    # --config.eval.cache_dir: the classifier came from the shared cache (one file, no retrain)
    # and the reference statistics were written there, not under WORKDIR/eval/cache.
    workdir, _ = evaluated
    assert len(list(cache.glob("digits_classifier-*.npz"))) == 1
    assert len(list(cache.glob("reference-*.npz"))) == 1
    assert not (workdir / "eval" / "cache").exists()


def test_eval_resumes_from_its_shards(evaluated, monkeypatch):
    workdir, config = evaluated
    first = _metrics(workdir)["settings"]
    (workdir / "eval" / "metrics_step2.json").unlink()
    chunks = sorted((workdir / "eval" / "step_2").rglob("chunk_*.npz"))
    mtimes = [p.stat().st_mtime_ns for p in chunks]
    calls = []
    original = evaluate.sample_ids
    monkeypatch.setattr(evaluate, "sample_ids", lambda *a: calls.append(a[3]) or original(*a))
    evaluate.run_eval(config, str(workdir))
    assert calls == [] and [p.stat().st_mtime_ns for p in chunks] == mtimes
    assert _metrics(workdir)["settings"] == first
    # A lost shard is regenerated alone, with the same samples: the same numbers.
    chunks[1].unlink()
    evaluate.run_eval(config, str(workdir))
    assert len(calls) == 1 and list(calls[0]) == list(range(32, 64))
    assert _metrics(workdir)["settings"] == first


def test_ternary_search_finds_the_minimum_of_a_unimodal_function():
    for best in (1, 2, 7, 19, 37, 38):
        calls = []
        fn = lambda i, best=best, calls=calls: calls.append(i) or (i - best) ** 2 + 3.0
        found, values = search.ternary_search(fn, 1, 38)
        assert found == best and values[best] == 3.0
        assert len(calls) == len(set(calls)) == len(values) <= 16  # memoised, ~2 log_1.5(38)
    found, values = search.ternary_search(lambda i: -i, 4, 5)  # a range of two: both
    assert found == 5 and list(values) == [4, 5]


def test_eval_searches_the_two_step_index_and_records_each_fid(evaluated):
    """--mode=eval with eval.settings=('search=10,20',): the ternary search's indices, each
    with its FID in the metrics json, the best one, and TensorBoard curves."""
    workdir, config = evaluated
    config = config.copy_and_resolve_references()
    config.eval.settings = ("search=10,20",)
    results = evaluate.run_eval(config, str(workdir))[2]
    record = json.loads((workdir / "eval" / "metrics_step2.json").read_text())
    found = record["search"]["search=10,20"]
    fids = {int(i): v for i, v in found["fid"].items()}
    # The same search, replayed on the recorded FIDs, asks for the same indices in order.
    best, replay = search.ternary_search(lambda i: fids[i], 10, 20)
    assert found["evaluated"] == list(replay) and found["best_index"] == best
    assert 4 <= len(fids) <= 9 and set(fids) <= set(range(10, 21))
    assert found["best_setting"] == f"0,{best},39" and found["best_fid"] == min(fids.values())
    for i, fid in fids.items():
        assert record["settings"][f"0,{i},39"]["fid"] == fid == results[f"0,{i},39"]["fid"]
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert any(b"step_2/fid_by_index" in p.read_bytes() for p in events)  # tags are cleaned


def test_search_settings_are_validated():
    config = test_config.get_config()
    for setting, match in [
        ("search=0,20", r"'search=0,20': give 'search' or 'search=lo,hi' with 1 <= lo < hi <= 38"),
        ("search=20,10", "1 <= lo < hi"),
        ("searching", "give 'search' or"),
    ]:
        config.eval.settings = ("1", setting)
        (problem,) = spec.problems(config, mode="eval")
        assert re.search(match, problem), problem
    config.eval.update(settings=("search",), every_steps=2)
    (problem,) = spec.problems(config, mode="train")
    assert "runs in --mode=eval only" in problem and "eval.every_steps=0" in problem
    assert sampling_spec.search_range(config, "search") == (1, 38)
