"""Forward speed of the full ImageNet-64 ADM UNet (random init): compile time, latency, images/s."""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

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


def main() -> None:
    """Time init, compile and forward of the ImageNet-64 ADM; print a table and a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention_impl", default="plain")
    args = parser.parse_args()

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
