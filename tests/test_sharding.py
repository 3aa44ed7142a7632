"""Mesh, FSDP rule, per-process batch rows and multi-host detection."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from consistency.io import sharding


def test_mesh_has_a_data_and_an_fsdp_axis():
    mesh = sharding.make_mesh(2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert sharding.make_mesh(1, jax.devices()[:1]).devices.size == 1
    with pytest.raises(ValueError, match="training.mesh_fsdp=3 must divide the device count 8"):
        sharding.make_mesh(3)


def test_fsdp_shards_the_largest_divisible_axis_of_large_leaves():
    assert sharding.fsdp_spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((3, 3, 64, 129), 4) == P(None, None, "fsdp", None)
    assert sharding.fsdp_spec((128,), 4) == P()  # small: replicated
    assert sharding.fsdp_spec((3, 3, 64, 128), 1) == P()
    assert sharding.fsdp_spec((), 4) == P()
    tree = {"w": np.zeros((64, 32)), "b": np.zeros((32,))}
    specs = jax.tree.map(lambda s: s.spec, sharding.tree_sharding(sharding.make_mesh(2), tree))
    assert specs == {"w": P("fsdp", None), "b": P()}


def test_one_process_feeds_every_row():
    assert sharding.process_rows(sharding.make_mesh(2), 16) == (0, 1)


def test_cluster_detection_reads_the_scheduler_environment():
    assert not sharding.cluster_detected({})
    assert not sharding.cluster_detected({"SLURM_NTASKS": "1"})
    assert sharding.cluster_detected({"SLURM_NTASKS": "4"})
    assert sharding.cluster_detected({"OMPI_COMM_WORLD_SIZE": "2"})
    assert sharding.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert not sharding.cluster_detected({"TPU_WORKER_HOSTNAMES": "a"})


def test_distributed_stays_off_without_flags_or_cluster(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not sharding.initialize_distributed("auto")
    assert not sharding.initialize_distributed("off", coordinator_address="localhost:1")
    with pytest.raises(ValueError, match="unknown distributed mode"):
        sharding.initialize_distributed("maybe")
