"""Device mesh and shardings: a data axis and an optional FSDP axis, for 1..N devices and hosts."""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# The batch is split over every device: data-parallel groups times the FSDP shards within them.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Leaves smaller than this stay replicated under FSDP: gathering them costs more than they save.
MIN_SHARDED_SIZE = 1024


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices of every process).

    Devices are ordered by (process, id), so each process holds a contiguous block of the batch
    and FSDP groups are neighbours (on one host when fsdp divides its device count).
    """
    devices = sorted(
        jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id)
    )
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"training.mesh_fsdp={fsdp} must divide the device count {len(devices)}")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[n_jitted_steps, batch, ...]: the batch axis (second) split over every device."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same value on every device."""
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape, fsdp: int, min_size: int | None = None) -> PartitionSpec:
    """Shard the largest axis that fsdp divides; replicate small (< min_size, default
    MIN_SHARDED_SIZE elements) or indivisible leaves."""
    min_size = MIN_SHARDED_SIZE if min_size is None else min_size
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            return PartitionSpec(*[FSDP_AXIS if a == axis else None for a in range(len(shape))])
    return PartitionSpec()


def tree_sharding(mesh: Mesh, tree):
    """NamedShardings for a (possibly abstract) tree: params, EMA copies and optimiser moments.

    The rule depends on the shape alone, so a parameter, its EMA copies and its Adam moments are
    sharded alike; with mesh fsdp size 1 everything is replicated.
    """
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp)), tree)


def process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """(index, count): this process feeds rows [index*b, (index+1)*b) of the batch, b = B/count.

    Read from the batch sharding, so the data a process loads is exactly what its devices hold.
    """
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values()
    rows = sorted({idx[0].indices(global_batch)[:2] for idx in indices})
    lo, hi = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != hi - lo:
        raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}")
    if global_batch % (hi - lo) or lo % (hi - lo):
        raise ValueError(f"process {jax.process_index()} holds rows {lo}:{hi} of {global_batch}")
    return lo // (hi - lo), global_batch // (hi - lo)


def global_array(local, sharding: NamedSharding):
    """Assemble the global array from this process's rows (leaf by leaf)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def cluster_detected(environ=os.environ) -> bool:
    """Whether the environment is a multi-process job that jax.distributed detects by itself.

    SLURM with more than one task, Open MPI with more than one rank, or a multi-host TPU slice.
    """
    counts = (environ.get("SLURM_NTASKS"), environ.get("OMPI_COMM_WORLD_SIZE"))
    if any(c is not None and c.isdigit() and int(c) > 1 for c in counts):
        return True
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize_distributed(
    mode: str = "auto",
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """jax.distributed.initialize from flags, JAX_COORDINATOR_ADDRESS, or cluster auto-detection.

    mode 'auto' initialises when any of the three is given, the variable is set, or a
    multi-process cluster is detected; 'on' always (JAX detects what is not given); 'off' never.
    Returns whether it initialised. On CPU the collectives run over gloo.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"unknown distributed mode: {mode!r}; choose auto, on or off")
    given = (coordinator_address or None, num_processes, process_id)
    wanted = mode == "on" or (
        mode == "auto"
        and (
            any(v is not None for v in given)
            or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
            or cluster_detected()
        )
    )
    if not wanted:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(*given)
    return True
