"""Test setup: CPU with 8 fake devices, float32 matmuls at full precision, fast compiles."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Backend optimisation level 0 halves XLA:CPU compile times; tests run few steps, and the
# results agree with the optimised build to float32 round-off.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
# One compilation cache for the whole session, shared with the CLI subprocesses the tests start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax-cache-"))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax

jax.config.update("jax_default_matmul_precision", "highest")
