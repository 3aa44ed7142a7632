"""Forward speed of the full ImageNet-64 ADM UNet (random init): compile time, latency, images/s.

    python benchmarks/adm_forward.py [--batch=8 --dtype=bfloat16 --attention_impl=cudnn]
    python benchmarks/adm_forward.py --sample_steps=2 --batch=256 --peak_tflops=989

--sample_steps=1 or 2 times consistency sampling (Algorithm 1) of configs/cd_imagenet64.py's
network instead: compile time, images/s, FLOPs, MFU and memory (sample_throughput, which
benchmarks/gpu_matrix.py also calls).
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # train_step.py beside this
import train_step as bench

from consistency.core import samplers
from consistency.experiment import methods, networks
from consistency.models.adm import adm_from_create_model_args

# scripts/launch.sh ImageNet-64 network (create_model arguments).
IMAGENET64 = dict(
    image_size=64,
    num_channels=192,
    num_res_blocks=3,
    attention_resolutions="32,16,8",
    channel_mult="",
    class_cond=True,
    num_heads=4,
    num_head_channels=64,
    use_scale_shift_norm=True,
    resblock_updown=True,
    dropout=0.0,
)


def sample_throughput(
    config, *, batch: int, num_steps: int, reps: int = 5, peak_tflops: float = 0.0
) -> dict:
    """Images/s of num_steps-step consistency sampling (x_T = sigma_max z; Algorithm 1 at
    sigma_max, then 1.526 for two steps) with the configured network at random init."""
    network, d = networks.build_network(config), config.data
    fns, grid = networks.model_fns(network, config), methods.noise_grid(config)
    shape = (d.image_size, d.image_size, d.num_channels)
    x1 = jnp.zeros((1, *shape), jnp.float32)
    params = jax.jit(network.init)(jax.random.key(0), x1, jnp.zeros((1,), jnp.int32))
    sigmas = jnp.asarray((grid.sigma_max, 1.526)[:num_steps], jnp.float32)

    # As sample.make_consistency_sampler; that module imports the data pipeline (grain), which
    # the GPU machine lacks.
    def sample(params, key, ids, labels):
        f = lambda x, sig: fns.consistency(params, x, sig, labels, None)
        z = samplers.per_sample_normal(key, ids, shape, 0)
        draws = [samplers.per_sample_normal(key, ids, shape, j) for j in range(1, num_steps)]
        noise = jnp.stack(draws) if draws else None
        return samplers.multistep_sample(
            f, grid.sigma_max * z, sigmas, noise, sigma_min=grid.sigma_min, sigma_max=grid.sigma_max
        )

    ids = jnp.arange(batch, dtype=jnp.uint32)
    labels = ids.astype(jnp.int32) % max(d.num_classes, 1)
    args = (params, jax.random.key(1), ids, labels)
    start = time.perf_counter()
    compiled = jax.jit(sample).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(reps):
        out = compiled(*args)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / reps
    flops = bench._flops(compiled)
    result = dict(
        sample_steps=num_steps, batch=batch, dtype=config.model.dtype,
        params=int(sum(p.size for p in jax.tree.leaves(params))), compile_s=compile_s,
        seconds_per_batch=seconds, images_per_s=batch / seconds, flops_per_batch=flops,
        achieved_tflops=flops / seconds / 1e12, memory_bytes=bench._memory(compiled),
        finite=bool(jnp.all(jnp.isfinite(out))),
    )  # fmt: skip
    if peak_tflops > 0:
        result["mfu"] = result["achieved_tflops"] / peak_tflops
    return result


def main() -> None:
    """Time init, compile and forward of the ImageNet-64 ADM; print a table and a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention_impl", default="plain")
    parser.add_argument("--sample_steps", type=int, default=0, choices=[0, 1, 2])
    parser.add_argument("--peak_tflops", type=float, default=0.0)
    args = parser.parse_args()
    if args.sample_steps:
        from configs import cd_imagenet64

        config = cd_imagenet64.get_config()
        config.model.update(dtype=args.dtype, attention_impl=args.attention_impl)
        result = sample_throughput(
            config,
            batch=args.batch,
            num_steps=args.sample_steps,
            reps=args.reps,
            peak_tflops=args.peak_tflops,
        )
        print(bench._table(result))
        print(json.dumps(result))
        return

    model = adm_from_create_model_args(
        IMAGENET64, dtype=jnp.dtype(args.dtype), attention_impl=args.attention_impl
    )
    size = IMAGENET64["image_size"]
    x = jax.random.normal(jax.random.key(1), (args.batch, size, size, 3), jnp.float32)
    t = 250.0 * jnp.log(jnp.geomspace(0.002, 80.0, args.batch, dtype=jnp.float32))
    y = jnp.arange(args.batch, dtype=jnp.int32) % 1000

    t0 = time.perf_counter()
    params = jax.jit(model.init)(jax.random.key(0), x, t, y)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    n_params = sum(p.size for p in jax.tree.leaves(params))

    apply = jax.jit(model.apply)
    t0 = time.perf_counter()
    compiled = apply.lower(params, x, t, y).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, x, t, y))  # warm-up
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x, t, y))
        times.append(time.perf_counter() - t0)
    fwd_s = float(np.median(times))

    result = dict(
        model="adm_imagenet64",
        device=str(jax.devices()[0].platform),
        dtype=args.dtype,
        batch=args.batch,
        params=int(n_params),
        init_s=round(init_s, 2),
        compile_s=round(compile_s, 2),
        forward_s=round(fwd_s, 3),
        images_per_s=round(args.batch / fwd_s, 3),
    )
    width = max(len(k) for k in result)
    print(f"{'quantity':<{width}}  value")
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
