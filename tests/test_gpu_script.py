"""benchmarks/gpu.sh at tiny sizes on CPU: every row of its matrix appears, with finite numbers."""

import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_matrix  # noqa: E402


def test_the_matrix_holds_every_workload_in_every_variant():
    rows = gpu_matrix.rows(8, 4, 16)
    train = {
        (r["workload"], r["dtype"], r["attention"], r["remat"])
        for r in rows
        if r["kind"] == "train"
    }
    assert train == {(w, *v) for w in gpu_matrix.WORKLOADS for v in gpu_matrix.VARIANTS}
    assert {(r["workload"], r["dtype"], r["attention"]) for r in rows if r["kind"] == "sample"} == {
        (f"adm_imagenet64 {k}-step", d, a)
        for d, a, m in gpu_matrix.VARIANTS
        if m == "none"
        for k in (1, 2)
    }
    assert len(gpu_matrix.rows(8, 4, 16, variants=1)) == len(gpu_matrix.WORKLOADS) + 2


def test_gpu_script_runs_end_to_end_at_tiny_sizes():
    # The first variant of every workload and both samplers (the whole matrix runs on the GPU;
    # on CPU the other variants are the same programs at other dtypes, and the suite's time counts).
    env = dict(os.environ, GPU_SH_TINY="1", GPU_SH_VARIANTS="1", PYTHON=sys.executable)
    run = subprocess.run(
        ["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    lines = run.stdout.splitlines()
    records = json.loads(lines[-1])
    expected = gpu_matrix.rows(2, 2, 2, variants=1)
    assert [{k: v for k, v in r.items() if k != "result"} for r in records] == expected
    for r in records:
        assert r["result"] is not None, r
        assert r["result"]["finite"], r
        for column in gpu_matrix.COLUMNS:
            if column != "device_peak_mib":  # the CPU keeps no allocator statistics
                assert math.isfinite(r["result"][column]) and r["result"][column] > 0, r
    table = [line for line in lines if line.startswith("| ") and "workload" not in line]
    assert len(table) == 2 * len(expected)  # printed as each row ends, then as one table
    assert not any(word in line for line in table for word in ("failed", "skipped", "nan"))
