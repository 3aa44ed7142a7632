"""Device mesh and shardings: one data axis, the same code for 1..N devices and hosts."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices (of every process) along the data axis."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[n_jitted_steps, batch, ...]: the batch axis (second) split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same value on every device."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(global_batch: int, mesh: Mesh, name: str = "training.batch_size"):
    """Raise a clear error unless the global batch splits evenly over devices and processes."""
    devices, processes = mesh.devices.size, jax.process_count()
    if global_batch % devices or global_batch % processes:
        raise ValueError(
            f"{name}={global_batch} must be divisible by the device count ({devices}) and the "
            f"process count ({processes}); set it to a multiple of {devices}"
        )


def global_array(local, sharding: NamedSharding):
    """Assemble the global array from this process's rows (leaf by leaf)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
