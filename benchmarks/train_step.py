"""Speed and memory of a config's jitted train step on synthetic data, on CPU, GPU or TPU.

    python benchmarks/train_step.py --config=configs/ct_cifar10.py \\
        --config.training.distance=l2 --config.training.batch_size=8 --peak_tflops=989

prints compile time, steady optimiser steps/s and images/s, model FLOPs per step (XLA's cost
analysis of the compiled step, every device), achieved FLOP/s, MFU against --peak_tflops per
device, and memory (XLA's memory analysis; the allocator's peak where the device reports one),
as a table and then one JSON line. CD configs get a randomly initialised teacher;
--random_lpips gives LPIPS random VGG16 and head weights (a speed measurement needs no weights
files). `setup` and `measure` are reused by step_overhead.py and gpu_matrix.py.
"""

import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ is not installed
from consistency.experiment import methods, networks, train_state, update
from consistency.io import sharding
from consistency.measure import lpips

FLAGS = flags.FLAGS


def _define_flags():  # only when run as a script: the other benchmarks import this module
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_integer("steps", 10, "Timed calls of the step, after 2 warm-up calls.")
    flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device, for the MFU (0: no MFU).")
    flags.DEFINE_bool("random_lpips", False, "LPIPS with random weights (no weights files).")
    flags.mark_flags_as_required(["config"])


def _batch(config, mesh):
    t, d = config.training, config.data
    rng = np.random.default_rng(0)
    shape = (t.n_jitted_steps, t.batch_size, d.image_size, d.image_size, d.num_channels)
    local = {
        "image": rng.uniform(-1.0, 1.0, shape).astype(np.float32),
        "label": rng.integers(0, max(d.num_classes, 1), shape[:2]).astype(np.int32),
    }
    return jax.device_put(local, sharding.stacked_batch_sharding(mesh))


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", float("nan")))


def _memory(compiled) -> dict:
    """Bytes per device: XLA's plan for the step, and the allocator's peak if the device has one."""
    out = {}
    mem = compiled.memory_analysis()
    if mem is not None:
        out["arguments"] = mem.argument_size_in_bytes
        out["outputs"] = mem.output_size_in_bytes
        out["aliased"] = mem.alias_size_in_bytes
        out["temp"] = mem.temp_size_in_bytes
        out["planned_peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak"] = stats["peak_bytes_in_use"]
    return out


def random_lpips_params(seed: int = 0) -> dict:
    """LPIPS params of the right shapes with random VGG16 weights and non-negative heads."""
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)  # the shapes do not depend on the image size
    params = jax.jit(lpips.LPIPS(resize=False).init)(jax.random.key(seed), x, x)["params"]
    return {k: jax.tree.map(jnp.abs, v) if k.startswith("lin") else v for k, v in params.items()}


@dataclasses.dataclass
class Setup:
    """A config's train step and everything it is called with, on all devices."""

    mesh: Any
    network: networks.Network
    tx: Any
    shardings: Any
    state: train_state.TrainState
    teacher: Any  # a CD teacher: the random initial params; else None
    distance: Any
    step: Any  # the jitted train step (update.train_step_for)
    batch: Any  # [n_jitted_steps, B, ...] of synthetic images and labels
    key: jax.Array


def setup(config, *, random_lpips: bool = False) -> Setup:
    """The configured state, teacher, distance, synthetic batch and jitted train step."""
    t = config.training
    mesh = sharding.make_mesh(t.mesh_fsdp)
    network, tx = networks.build_network(config), train_state.optimizer(config)
    shardings = update.state_sharding(config, network, tx, mesh)
    state = update.init_state(config, network, tx, mesh, shardings=shardings)
    teacher = None
    if methods.row(t.loss).needs_teacher:
        # A copy: the step donates the state's buffers, and device_put would alias them.
        teacher = jax.tree.map(jnp.copy, state.params)
        teacher = jax.device_put(teacher, sharding.tree_sharding(mesh, teacher))
    weights = random_lpips_params() if random_lpips and t.distance == "lpips" else None
    distance = networks.distance_fn(config, lpips_params=weights)
    distance = jax.device_put(distance, sharding.replicated(mesh))
    step = update.train_step_for(config, network, tx, mesh, state_shardings=shardings)
    batch, key = _batch(config, mesh), jax.random.key(0)
    return Setup(mesh, network, tx, shardings, state, teacher, distance, step, batch, key)


def measure(
    config, steps: int, peak_tflops: float, *, random_lpips: bool = False, warmup: int = 2
) -> dict:
    """Compile the configured step on all devices and time `steps` calls of it after `warmup`."""
    t = config.training
    s = setup(config, random_lpips=random_lpips)
    mesh, state, teacher, distance, step = s.mesh, s.state, s.teacher, s.distance, s.step
    batch, key = s.batch, s.key

    start = time.perf_counter()
    compiled = step.lower(state, batch, teacher, distance, key).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        state, metrics = compiled(state, batch, teacher, distance, key)
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, teacher, distance, key)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start

    devices = mesh.devices.size
    steps_per_s = steps * t.n_jitted_steps / seconds
    # Cost analysis is per device and counts a lax.scan body once: scale by the trip counts.
    scanned = update.scan_loops()
    trips = (t.n_jitted_steps if scanned and t.n_jitted_steps > 1 else 1) * (
        t.micro_batches if scanned and t.micro_batches > 1 else 1
    )
    flops = _flops(compiled) * devices * trips / t.n_jitted_steps
    result = {
        "config": config.model.name, "loss": t.loss, "distance": t.distance,
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
        "devices": devices, "mesh": dict(mesh.shape), "batch": t.batch_size,
        "micro_batches": t.micro_batches, "dtype": config.model.dtype, "remat": config.model.remat,
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "compile_s": compile_s, "steps_per_s": steps_per_s,
        "images_per_s": steps_per_s * t.batch_size, "flops_per_step": flops,
        "achieved_tflops": flops * steps_per_s / 1e12, "loss_value": float(metrics["loss"]),
        "memory_bytes": _memory(compiled),
    }  # fmt: skip
    if peak_tflops > 0:
        result["mfu"] = result["achieved_tflops"] / (peak_tflops * devices)
    return result


def _table(result: dict) -> str:
    rows = [(k, v) for k, v in result.items() if k != "memory_bytes"]
    rows += [(f"memory {k} (MiB)", v / 2**20) for k, v in result["memory_bytes"].items()]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = measure(FLAGS.config, FLAGS.steps, FLAGS.peak_tflops, random_lpips=FLAGS.random_lpips)
    print(_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
