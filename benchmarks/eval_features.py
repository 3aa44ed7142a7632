"""Speed of the evaluation networks: FID Inception features (32 px -> 299) and LPIPS (64 -> 224)."""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from consistency.measure.inception import FIDInceptionV3
from consistency.measure.lpips import LPIPS, make_lpips_distance


def measure(fn, args: tuple, *, repeats: int) -> tuple[float, float]:
    """(compile seconds, steady-state seconds per call) of jax.jit(fn) on args."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))  # warm-up: first-run allocations
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(compiled(*args))
    return compile_s, (time.perf_counter() - start) / repeats


def bench_inception(batch: int, size: int, repeats: int) -> dict:
    model = FIDInceptionV3()
    images = jax.random.uniform(jax.random.key(1), (batch, size, size, 3))
    variables = jax.jit(model.init)(jax.random.key(0), images)
    compile_s, step_s = measure(model.apply, (variables, images), repeats=repeats)
    name = f"inception pool3+spatial+logits {size}->299"
    return {"name": name, "batch": batch, "compile_s": compile_s, "items_per_s": batch / step_s}


def bench_lpips(batch: int, size: int, repeats: int, *, grad: bool, dtype) -> dict:
    x = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1, maxval=1)
    y = jax.random.uniform(jax.random.key(2), (batch, size, size, 3), minval=-1, maxval=1)
    params = jax.jit(LPIPS().init)(jax.random.key(0), x, y)["params"]
    distance = make_lpips_distance(params, dtype=dtype)
    if grad:
        fn = lambda d, x, y: jax.grad(lambda x: d(x, y).sum())(x)
    else:
        fn = lambda d, x, y: d(x, y)
    compile_s, step_s = measure(fn, (distance, x, y), repeats=repeats)
    kind = "fwd+grad" if grad else "fwd"
    name = f"lpips vgg {kind} {size}->224 {jnp.dtype(dtype).name}"
    return {"name": name, "batch": batch, "compile_s": compile_s, "items_per_s": batch / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [
        bench_inception(args.batch, 32, args.repeats),
        bench_lpips(args.batch, 64, args.repeats, grad=False, dtype=jnp.float32),
        bench_lpips(args.batch, 64, args.repeats, grad=True, dtype=jnp.float32),
        bench_lpips(args.batch, 64, args.repeats, grad=False, dtype=jnp.bfloat16),
    ]
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), random weights, batch {args.batch}")
    header = ("network (items: images; LPIPS: pairs)", "batch", "compile s", "items/s")
    print(f"{header[0]:<44} {header[1]:>5} {header[2]:>10} {header[3]:>10}")
    for row in rows:
        name, batch, compile_s, rate = (
            row[k] for k in ("name", "batch", "compile_s", "items_per_s")
        )
        print(f"{name:<44} {batch:>5} {compile_s:>10.2f} {rate:>10.2f}")
    print(json.dumps({"device": device.device_kind, "results": rows}))


if __name__ == "__main__":
    main()
