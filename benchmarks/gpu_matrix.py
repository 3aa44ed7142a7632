"""The matrix of benchmarks/gpu.sh: train steps and ADM sampling over dtype, attention and remat.

    python benchmarks/gpu_matrix.py --peak_tflops=989 [--budget_s=420] [--tiny]

Rows run in priority order in one process; once --budget_s has passed, the rest are listed as
skipped. A row that fails (out of memory, say) prints its error and the others go on. --tiny
runs the same rows at tiny sizes (batch 2, small networks, 16x16 images, LPIPS unresized) for
CPU; there 'cudnn' attention, which XLA:CPU lacks, runs as 'xla' and is marked so. MFU is against
--peak_tflops (the H200's dense bf16 peak, also for the float32 rows); 'planned MiB' is XLA's
memory plan of the row's program, 'device peak MiB' the allocator's peak so far in the process.
"""

import argparse
import gc
import importlib
import json
import math
import pathlib
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # train_step.py beside this
import adm_forward
import train_step as bench

# (name, config module, its argument, overrides) of each workload.
WORKLOADS = {
    "ct_cifar10 l2": ("ct_cifar10", None, {"training.distance": "l2"}),
    "cd_cifar10 lpips": ("cd_cifar10", "lpips", {}),
    "cd_imagenet64 lpips": ("cd_imagenet64", "lpips", {}),
}
TINY = {
    "data.image_size": 16,
    "training.lpips_resize": 0,
    "model.ncsnpp.nf": 8,
    "model.ncsnpp.ch_mult": (1,),
    "model.ncsnpp.num_res_blocks": 1,
    "model.ncsnpp.attn_resolutions": (16,),
    "model.adm.model_channels": 32,  # GroupNorm's 32 groups
    "model.adm.channel_mult": (1,),
    "model.adm.num_res_blocks": 1,
    "model.adm.attention_resolutions": (16,),
    "model.adm.num_head_channels": 32,
}
# (dtype, attention, remat) variants, most wanted first: one factor changed from the first.
VARIANTS = [
    ("bfloat16", "cudnn", "none"),
    ("bfloat16", "cudnn", "full"),
    ("bfloat16", "xla", "none"),
    ("float32", "xla", "none"),  # cuDNN's fused attention takes 16-bit inputs only
]


def rows(batch_cifar: int, batch_imagenet: int, batch_sample: int, variants: int = 0) -> list:
    """Every row in priority order: the bf16 cudnn row of each workload, sampling, the rest
    (only the first `variants` of VARIANTS when > 0)."""
    out = []
    for dtype, attention, remat in VARIANTS[: variants or len(VARIANTS)]:
        for name in WORKLOADS:
            batch = batch_imagenet if "imagenet" in name else batch_cifar
            out.append(
                dict(
                    kind="train",
                    workload=name,
                    dtype=dtype,
                    attention=attention,
                    remat=remat,
                    batch=batch,
                )
            )
        if remat == "none":
            for steps in (1, 2):
                out.append(
                    dict(
                        kind="sample",
                        workload=f"adm_imagenet64 {steps}-step",
                        dtype=dtype,
                        attention=attention,
                        remat="none",
                        batch=batch_sample,
                        steps=steps,
                    )
                )
    return out


def _config(module: str, arg, overrides: dict):
    mod = importlib.import_module(f"configs.{module}")
    config = mod.get_config(arg) if arg is not None else mod.get_config()
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        node = config
        for part in section.split("."):
            node = node[part]
        node[field] = value
    return config


def run_row(row: dict, *, tiny: bool, steps: int, peak_tflops: float) -> dict:
    """The row's measurements (compile_s, images_per_s, ms, tflops, mfu, memory)."""
    attention = row["attention"]
    if attention == "cudnn" and jax.default_backend() == "cpu":
        attention = "xla"
    module, arg, overrides = (
        WORKLOADS[row["workload"]] if row["kind"] == "train" else ("cd_imagenet64", "lpips", {})
    )
    overrides = dict(overrides, **(TINY if tiny else {}))
    overrides.update({"model.dtype": row["dtype"], "model.attention_impl": attention})
    overrides.update({"model.remat": row["remat"], "training.batch_size": row["batch"]})
    config = _config(module, arg, overrides)
    if row["kind"] == "train":
        r = bench.measure(config, steps, peak_tflops, random_lpips=True, warmup=1 if tiny else 2)
        ms, flops_s = 1e3 / r["steps_per_s"], r["achieved_tflops"]
        finite = math.isfinite(r["loss_value"])
    else:
        r = adm_forward.sample_throughput(
            config, batch=row["batch"], num_steps=row["steps"], reps=steps, peak_tflops=peak_tflops
        )
        ms, flops_s, finite = 1e3 * r["seconds_per_batch"], r["achieved_tflops"], r["finite"]
    mem = r["memory_bytes"]
    return dict(
        ran_attention=attention,
        params_m=r["params"] / 1e6,
        compile_s=r["compile_s"],
        images_per_s=r["images_per_s"],
        ms=ms,
        tflops=flops_s,
        mfu_pct=100 * r.get("mfu", float("nan")),
        planned_mib=mem.get("planned_peak", float("nan")) / 2**20,
        device_peak_mib=mem.get("device_peak", float("nan")) / 2**20,
        finite=finite,
    )


COLUMNS = (
    "params_m",
    "compile_s",
    "images_per_s",
    "ms",
    "tflops",
    "mfu_pct",
    "planned_mib",
    "device_peak_mib",
)


def _line(row: dict, result: dict | None, note: str = "") -> str:
    att = row["attention"]
    if result and result["ran_attention"] != att:
        att = f"{att} (ran {result['ran_attention']})"
    head = f"| {row['workload']} | {row['dtype']} | {att} | {row['remat']} | {row['batch']} |"
    if result is None:
        return head + " - |" * len(COLUMNS) + f" {note} |"
    fmt = lambda v: "-" if math.isnan(v) else f"{v:.4g}"  # no allocator statistics (CPU)
    cells = " ".join(f"{fmt(result[c])} |" for c in COLUMNS)
    status = ("ok" if result["finite"] else "NON-FINITE") + (f" ({note})" if note else "")
    return f"{head} {cells} {status} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes for CPU")
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    parser.add_argument("--budget_s", type=float, default=420.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_cifar", type=int, default=128)
    parser.add_argument("--batch_imagenet", type=int, default=32)
    parser.add_argument("--batch_sample", type=int, default=256)
    parser.add_argument("--variants", type=int, default=0, help="the first K variants (0: all)")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"backend {jax.default_backend()}, device {jax.devices()[0].device_kind}", flush=True)
    header = "| workload | dtype | attention | remat | batch | " + " | ".join(COLUMNS) + " | |"
    lines, records = [header, "|---" * (len(COLUMNS) + 6) + "|"], []
    done = {}  # on CPU a row whose program an earlier row ran (cudnn -> xla) reuses its result
    for row in rows(args.batch_cifar, args.batch_imagenet, args.batch_sample, args.variants):
        if time.perf_counter() - start > args.budget_s:
            lines.append(_line(row, None, f"skipped: past --budget_s={args.budget_s:g}"))
            continue
        key = (row["workload"], row["dtype"], row["remat"], row["batch"])
        try:
            note = ""
            if jax.default_backend() == "cpu" and key in done:  # 'cudnn' ran as 'xla' before
                result, note = done[key], "the cudnn row's program on cpu"
            else:
                result = run_row(
                    row, tiny=args.tiny, steps=args.steps, peak_tflops=args.peak_tflops
                )
            done.setdefault(key, result)
            lines.append(_line(row, result, note))
        except Exception as e:  # one row failing (out of memory, say) must not end the run
            result = None
            lines.append(_line(row, None, f"failed: {type(e).__name__}: {str(e)[:120]}"))
        records.append(dict(row, result=result))
        print(lines[-1], flush=True)
        jax.clear_caches()
        gc.collect()
    print(
        f"\n{len(records)} rows in {time.perf_counter() - start:.0f} s "
        f"(MFU against {args.peak_tflops:g} TFLOP/s)"
    )
    print("\n".join(lines))
    print(json.dumps(records))


if __name__ == "__main__":
    main()
