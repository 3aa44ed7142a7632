#!/usr/bin/env bash
# One command for a GPU machine (an H200): install what it lacks from carried wheels, then time
# the train steps of ct_cifar10 (l2), cd_cifar10 and cd_imagenet64 (LPIPS with random weights, a
# random teacher) and the ADM ImageNet-64 network's one- and two-step sampling, in bfloat16 and
# float32, cudnn and xla attention, remat none and full (benchmarks/gpu_matrix.py): images/s,
# compile time, memory and MFU against 989 TFLOP/s, as a table, within 8 minutes.
#
#   bash benchmarks/gpu.sh                  # on the GPU machine
#   GPU_SH_TINY=1 bash benchmarks/gpu.sh    # the same rows at tiny sizes on CPU (also without a GPU)
#
# GPU_SH_WHEELS: folder of wheels for modules the machine lacks (default: .whl, else wheels/),
#   installed with pip --no-index --find-links; GPU_SH_BUDGET_S: no new row after this (420);
#   GPU_SH_STEPS: timed calls per row (10; tiny 1); GPU_SH_BATCH_CIFAR (128), GPU_SH_BATCH_IMAGENET
#   (32), GPU_SH_BATCH_SAMPLE (256); GPU_SH_OUT: also write the output to this file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# Python modules the benchmarks import -> the distributions that provide them.
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"jax": "jax", "flax": "flax", "optax": "optax", "absl": "absl-py",
        "ml_collections": "ml-collections", "yaml": "PyYAML"}
print(" ".join(d for m, d in need.items() if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
  wheels=${GPU_SH_WHEELS:-$( [ -d .whl ] && echo .whl || echo wheels )}
  echo "installing from $wheels: $missing"
  site=$(mktemp -d /tmp/gpu_sh_site.XXXX)
  # shellcheck disable=SC2086  # one word per distribution
  "$PY" -m pip install -q --no-index --no-deps --find-links "$wheels" --target "$site" $missing
  export PYTHONPATH="$PYTHONPATH:$site"
fi

tiny=${GPU_SH_TINY:-0}
if [ "$tiny" != 1 ] && ! "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' \
    2>/dev/null; then
  echo "no GPU found: the tiny sizes on CPU"
  tiny=1
fi
args=(--peak_tflops=989 --budget_s="${GPU_SH_BUDGET_S:-420}" --variants="${GPU_SH_VARIANTS:-0}")
if [ "$tiny" = 1 ]; then
  # One process on CPU: fast compiles, and a cache (the cudnn rows run as xla there).
  export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_backend_optimization_level=0
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d /tmp/gpu_sh_cache.XXXX)}
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
  args+=(--tiny --steps="${GPU_SH_STEPS:-1}" --batch_cifar=2 --batch_imagenet=2 --batch_sample=2)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
  args+=(--steps="${GPU_SH_STEPS:-10}" --batch_cifar="${GPU_SH_BATCH_CIFAR:-128}")
  args+=(--batch_imagenet="${GPU_SH_BATCH_IMAGENET:-32}" --batch_sample="${GPU_SH_BATCH_SAMPLE:-256}")
fi
if [ -n "${GPU_SH_OUT:-}" ]; then
  "$PY" benchmarks/gpu_matrix.py "${args[@]}" 2>&1 | tee "$GPU_SH_OUT"
else
  "$PY" benchmarks/gpu_matrix.py "${args[@]}"
fi
