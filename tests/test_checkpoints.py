"""Checkpoints: digests independent of sharding, corrupt steps skipped, poisoned states refused."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from consistency.io import checkpoints, sharding

META = {"model": "toy", "params": [["w", [64, 32]]]}


def _state(scale):
    return {"w": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) * scale,
            "b": jnp.full((32,), scale, jnp.bfloat16), "step": jnp.int32(scale)}  # fmt: skip


def test_digest_is_the_same_for_any_sharding_and_catches_changes():
    state = _state(1.0)
    digest, finite = checkpoints.integrity(state)
    assert finite
    mesh = sharding.make_mesh(2)
    sharded = jax.device_put(state, sharding.tree_sharding(mesh, state))
    assert sharded["w"].sharding.spec == P("fsdp", None)
    assert checkpoints.integrity(sharded) == (digest, True)
    on_data = jax.device_put(state["w"], NamedSharding(mesh, P("data", "fsdp")))
    assert checkpoints.integrity(dict(state, w=on_data))[0] == digest
    assert checkpoints.integrity(jax.tree.map(np.asarray, state))[0] == digest
    swapped = state["w"].at[0, 1].set(state["w"][1, 0]).at[1, 0].set(state["w"][0, 1])
    assert checkpoints.integrity(dict(state, w=swapped))[0] != digest
    assert not checkpoints.integrity(dict(state, w=state["w"].at[3, 3].set(jnp.inf)))[1]


def _flip_data_bytes(step_dir):
    """Silent corruption: flip bytes inside the array data files (orbax reads them happily)."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and "ocdbt.process" in str(f) and f.stat().st_size > 1000:
            data = bytearray(f.read_bytes())
            for i in range(len(data) // 3, len(data) // 3 + 16):
                data[i] ^= 0xFF
            f.write_bytes(bytes(data))


def _truncate(step_dir):
    """A partial write: every file of the state cut in half."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize(
    "corrupt, error",
    [
        (_flip_data_bytes, "CorruptCheckpointError"),  # caught by the digest alone
        (_truncate, "Error"),
        (lambda d: shutil.rmtree(d / "state"), "Error"),
    ],
)
def test_corrupt_newest_checkpoint_is_reported_and_the_previous_used(
    corrupt, error, tmp_path, capsys
):
    ckpt = checkpoints.Checkpointer(tmp_path, max_to_keep=3)
    for step in (1, 2):
        ckpt.save(step, _state(float(step)), META)
    ckpt.close()
    corrupt(tmp_path / "2")
    ckpt = checkpoints.Checkpointer(tmp_path)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(1.0))
    state, _, step = ckpt.restore_latest(template, META)
    assert step == 1 and np.array_equal(state["w"], _state(1.0)["w"])
    out = capsys.readouterr().out
    assert "WARNING: checkpoint step 2" in out and "falling back to the previous" in out
    assert f"{error}: " in out
    assert ckpt.all_steps() == [1] and len(list((tmp_path / "corrupt").iterdir())) == 1
    ckpt.close()


def test_a_non_finite_state_is_never_written(tmp_path):
    ckpt = checkpoints.Checkpointer(tmp_path)
    ckpt.save(1, _state(1.0), META)
    bad = dict(_state(2.0), w=_state(2.0)["w"].at[0, 0].set(jnp.nan))
    with pytest.raises(checkpoints.NonFiniteStateError, match="step 2"):
        ckpt.save(2, bad, META)
    ckpt.close()
    assert checkpoints.Checkpointer(tmp_path).all_steps() == [1]


def test_checkpoint_of_another_model_is_an_error_not_corruption(tmp_path):
    ckpt = checkpoints.Checkpointer(tmp_path)
    ckpt.save(1, _state(1.0), META)
    ckpt.wait()
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(1.0))
    with pytest.raises(checkpoints.ModelMismatchError, match="use a fresh --workdir"):
        ckpt.restore_latest(template, dict(META, model="other"))
    assert ckpt.all_steps() == [1]
    ckpt.close()
