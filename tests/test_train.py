"""The trainer: resume equals an uninterrupted run, checkpoints, samples, and clear errors."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from consistency.experiment import networks, spec, train, train_state, update
from consistency.io import checkpoints, data, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(**training):
    config = test_config.get_config()
    config.training.update(**training)
    return config


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    return workdir, train.train_and_evaluate(_config(num_steps=4), str(workdir))


def test_resumed_run_equals_uninterrupted_run(uninterrupted, tmp_path):
    _, full = uninterrupted
    first = train.train_and_evaluate(_config(num_steps=2), str(tmp_path))
    assert int(first.step) == 2
    resumed = train.train_and_evaluate(_config(num_steps=4), str(tmp_path))
    assert int(resumed.step) == 4
    for name in ("params", "target_params", "ema_params", "opt_state"):
        a, b = _leaves(getattr(full, name)), _leaves(getattr(resumed, name))
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), name
    # The run really moved: params differ from the step-2 state.
    assert not all(
        np.array_equal(x, y)
        for x, y in zip(_leaves(first.params), _leaves(full.params), strict=True)
    )


def test_run_writes_checkpoints_grids_config_and_tensorboard(uninterrupted):
    workdir, _ = uninterrupted
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "4",
    ]
    assert (workdir / "samples" / "grid_0000004.png").exists()
    assert (workdir / "config.json").exists()
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoint_of_another_model_is_refused(uninterrupted):
    workdir, _ = uninterrupted
    config = _config(num_steps=6)
    config.model.unet.channels = 16
    with pytest.raises(ValueError, match="use a fresh --workdir"):
        train.train_and_evaluate(config, str(workdir))


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("data", "name", "mnist", "data.name='mnist': must be one of"),
        ("model", "name", "dit", "model.name='dit': must be one of"),
        ("training", "loss", "gan", "training.loss: unknown 'gan'"),
        ("training", "teacher_checkpoint", "/no/such/dir", "no such path '/no/such/dir'"),
        ("training", "log_every", 3, "multiple of training.n_jitted_steps"),
    ],
)
def test_bad_config_names_the_key(section, key, value, match, tmp_path):
    config = _config()
    config[section][key] = value
    if key == "log_every":
        config.training.n_jitted_steps = 2
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(config, str(tmp_path))


def test_batch_not_divisible_by_devices(tmp_path):
    with pytest.raises(ValueError, match="training.batch_size=12 must be divisible"):
        train.train_and_evaluate(_config(batch_size=12), str(tmp_path))


def test_cd_without_teacher_is_refused(tmp_path):
    with pytest.raises(ValueError, match="training.teacher_checkpoint: give the teacher's"):
        train.train_and_evaluate(_config(loss="cd"), str(tmp_path))


def test_command_line_trains_then_samples(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [sys.executable, str(REPO / "main.py"), "--config=configs/test.py"]
    base += [f"--workdir={tmp_path}", "--config.training.num_steps=2"]
    out = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2/2" in out.stdout and "steps/s" in out.stdout and "ETA" in out.stdout
    out = subprocess.run(
        [*base, "--mode=sample"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    samples = np.load(tmp_path / "samples" / "step_2" / "samples_6x8x8x1.npz")
    assert samples["arr_0"].dtype == np.uint8 and samples["arr_0"].shape == (6, 8, 8, 1)
    assert samples["arr_0"].std() > 0


# ---- scale: one step on 1 device = on 8 (data parallel, FSDP, micro-batches); bf16 dtypes ----


def _small(**training):
    """The test config with an even smaller UNet (one level): quick to compile."""
    config = _config(**training)
    config.model.unet.update(channels=4, channel_mult=(1,), attn_resolutions=())
    return config


def _digits_batch(size=16):
    source = data.make_source("digits")
    batches = data.make_batches(
        source,
        seed=0,
        local_batch=size,
        image_size=8,
        num_channels=1,
        random_flip=False,
        num_threads=1,
    )
    return {k: v[None] for k, v in next(batches).items()}  # [n_jitted_steps=1, B, ...]


def _one_step(config, devices):
    """(initial params, params after one step, metrics) on a mesh of `devices`."""
    mesh = sharding.make_mesh(config.training.mesh_fsdp, devices)
    network, tx = networks.build_network(config), train_state.optimizer(config)
    state = update.init_state(config, network, tx, mesh)
    initial = jax.device_get(state.params)  # the step donates the state
    step = update.train_step_for(config, network, tx, mesh)
    batch = sharding.global_array(_digits_batch(), sharding.stacked_batch_sharding(mesh))
    distance = jax.device_put(networks.distance_fn(config), sharding.replicated(mesh))
    state, metrics = step(
        state.replace(step=state.step + 5), batch, None, distance, jax.random.key(7)
    )
    return initial, state, jax.device_get(metrics)


def test_step_on_8_devices_equals_the_1_device_step(monkeypatch):
    """A 4 (data) x 2 (FSDP) mesh with 2 micro-batches against one device and the whole batch.

    One compile covers data parallelism, parameter sharding and gradient accumulation (the
    unrolled path); each alone is a special case of it.
    """
    monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 64)  # shard this tiny UNet's kernels too
    initial, want, want_metrics = _one_step(_small(), jax.devices()[:1])
    start, got, metrics = _one_step(_small(mesh_fsdp=2, micro_batches=2), jax.devices())
    assert len(jax.devices()) == 8 and bool(metrics["finite"])
    sharded = [x for x in jax.tree.leaves(got.params) if "fsdp" in str(x.sharding.spec)]
    assert len(sharded) > 5
    for key in ("loss", "grad_norm"):
        assert abs(metrics[key] - want_metrics[key]) <= 1e-5 * abs(want_metrics[key]), key
    for a, b in zip(_leaves(start), _leaves(initial), strict=True):
        np.testing.assert_array_equal(a, b)  # the same init on any mesh
    for name in ("params", "target_params", "ema_params"):
        got_leaves, want_leaves = _leaves(getattr(got, name)), _leaves(getattr(want, name))
        for a, b, x0 in zip(got_leaves, want_leaves, _leaves(initial), strict=True):
            # The update (the params barely move in one step) agrees to 1e-5 of its size.
            assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b - x0)) + 1e-12, name


def test_bfloat16_compute_keeps_params_ema_and_optimiser_state_in_float32():
    config = _small()
    config.model.dtype = "bfloat16"
    network, tx = networks.build_network(config), train_state.optimizer(config)
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    state = update.abstract_state(config, network, tx, mesh)
    step = update.train_step_for(config, network, tx, mesh)
    batch = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), _digits_batch())
    after, metrics = jax.eval_shape(
        step, state, batch, None, networks.distance_fn(config), jax.random.key(0)
    )
    for tree in (state, after):
        floats = [x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert len(floats) > 100 and set(floats) == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32
    # ... while the network's convolutions and matmuls run in bfloat16.
    x = jnp.zeros((2, 8, 8, 1))
    jaxpr = str(
        jax.make_jaxpr(network.apply)(state.params, x, jnp.zeros(2), jnp.zeros(2, int), None)
    )
    assert "conv_general_dilated" in jaxpr and "bf16[2,8,8,4]" in jaxpr


# ---- reliability: non-finite steps, corrupt checkpoints, clear config errors ----


def test_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = data.make_batches

    def poisoned(*args, start_step=0, **kwargs):
        for k, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step):
            # Batch k feeds step k + 1: step 5 sees NaN images.
            yield dict(batch, image=batch["image"] * np.nan) if k == 4 else batch

    monkeypatch.setattr(data, "make_batches", poisoned)
    config = _config(num_steps=6)
    config.sampling.grid_size = 0
    with pytest.raises(train.NonFiniteError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert "at step 5 (loss nan, grad_norm nan" in message
    assert "last good checkpoint: step 4 in" in message and "loss_q0" in message
    assert checkpoints.Checkpointer(tmp_path / "checkpoints").all_steps() == [2, 4]
    params = checkpoints.load_params(tmp_path / "checkpoints")[0]
    assert all(np.all(np.isfinite(x)) for x in _leaves(params))


def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(uninterrupted, tmp_path, capsys):
    workdir, full = uninterrupted
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():  # a partial write: every file cut in half
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    resumed = train.train_and_evaluate(_config(num_steps=4), str(tmp_path))
    out = capsys.readouterr().out
    assert "WARNING: checkpoint step 4" in out and "falling back to the previous" in out
    assert "resumed from step 2" in out
    for a, b in zip(_leaves(full), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_validation_names_every_bad_key_once():
    config = _config(micro_batches=0, mesh_fsdp=3, batch_size=None)
    config.optim.lr = -1.0
    config.model.dropout = 1.5
    config.model.remat = "some"
    with pytest.raises(spec.ConfigError) as error:
        spec.validate_config(config, num_devices=8)
    lines = str(error.value).splitlines()[1:]
    expected = [
        "training.micro_batches=0: must be a positive integer",
        "training.batch_size=None: must be a positive integer",
        "optim.lr=-1.0: must be a number > 0",
        "model.dropout=1.5: must be a number in",
        "model.remat='some': must be one of",
        "training.mesh_fsdp=3 must divide",
    ]
    assert len(lines) == len(expected)
    for text in expected:
        assert sum(text in line for line in lines) == 1, text
    with pytest.raises(spec.ConfigError, match=r"x training.micro_batches \(4\) = 32"):
        spec.validate_config(_config(micro_batches=4), num_devices=8)


def test_snapshot_grid_samples_the_ema_copy_that_sampling_reads(tmp_path):
    config = test_config.get_config()
    config.sampling.grid_size = 4
    config.sampling.ema_index = 1
    seen = []

    def sample_fn(params, key, ids, labels):
        seen.append(float(params))
        return jnp.zeros((len(ids), 8, 8, 1))

    class State:
        ema_params = (jnp.float32(0.0), jnp.float32(1.0))

    train._snapshot(config, tmp_path, 7, State(), sample_fn, None)
    assert seen == [1.0] and (tmp_path / "samples" / "grid_0000007.png").exists()
