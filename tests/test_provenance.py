"""What a checkpoint is and whether it is sound: teachers, sample/edit/eval loaders, eval caches."""

import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from consistency.experiment import edit, evaluate, networks, resume, sample, train
from consistency.io import checkpoints

# The test config with a one-level UNet and no PNG grids: quick to compile.
SMALL = dict(channels=4, channel_mult=(1,), attn_resolutions=())


def _config(**training):
    config = test_config.get_config()
    config.model.unet.update(**SMALL)
    config.sampling.grid_size = 0
    config.training.update(**training)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step CT run: checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("ct")
    train.train_and_evaluate(_config(num_steps=4), str(workdir))
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _change_values(ckpt_dir, step):
    """Values changed after saving (its saved digest kept): orbax reads it happily."""
    ckpt = checkpoints.Checkpointer(ckpt_dir)
    state, meta = ckpt.restore_raw(step)
    state["params"] = jax.tree.map(lambda x: x + 1.0, state["params"])
    shutil.rmtree(ckpt_dir / str(step))
    ckpt._manager.reload()
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    ckpt._manager.save(step, args=args, force=True)
    ckpt.close()


def test_checkpoints_record_what_they_are(trained):
    meta = checkpoints.Checkpointer(trained / "checkpoints").read_meta(4)
    assert meta["method"] == "ct" and meta["samples_as"] == "consistency"
    assert meta["parameterization"] == "edm" and meta["model"] == "unet" and meta["params"]


def test_a_consistency_checkpoint_is_refused_as_a_teacher(trained, tmp_path):
    config = _config(loss="cd", teacher_checkpoint=str(trained / "checkpoints"))
    with pytest.raises(checkpoints.ModelMismatchError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    assert "holds a training.loss='ct' model (samples as 'consistency'" in str(error.value)
    assert "must be a diffusion model: a training.loss='edm' run" in str(error.value)
    assert not (tmp_path / "runs.jsonl").exists() and not (tmp_path / "config.json").exists()


def test_a_teacher_of_another_parameterization_is_refused():
    config = _config(loss="scd")
    config.model.parameterization = "trigflow"
    meta = {"method": "edm", "samples_as": "diffusion", "parameterization": "edm"}
    with pytest.raises(checkpoints.ModelMismatchError, match="parameterization='trigflow'"):
        resume.check_teacher(meta, config, "DIR")
    resume.check_teacher(dict(meta, parameterization="trigflow"), config, "DIR")


def test_an_older_checkpoint_without_a_record_is_accepted_with_a_warning(capsys):
    resume.check_teacher({"model": "unet"}, _config(loss="cd"), "DIR")
    sample.check_kind({"model": "unet"}, _config(), "DIR")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("does not record its method" in line for line in out)


def test_a_diffusion_checkpoint_is_not_sampled_as_a_consistency_model():
    meta = {"method": "edm", "samples_as": "diffusion", "parameterization": "edm"}
    with pytest.raises(checkpoints.ModelMismatchError, match="holds a training.loss='edm'"):
        sample.check_kind(meta, _config(), "DIR")


def test_loaders_fall_back_from_a_value_corrupted_checkpoint_or_refuse_it(workdir, capsys):
    _change_values(workdir / "checkpoints", 4)
    config = _config()
    network = networks.build_network(config)
    # Sample: the newest is corrupt, the previous one is used, with one warning line.
    out = sample.run_sample(config, str(workdir))
    assert out.parent.name == "step_2"
    lines = capsys.readouterr().out.splitlines()
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1 and "checkpoint step 4" in warnings[0], lines
    assert "CorruptCheckpointError" in warnings[0] and "using the previous one" in warnings[0]
    assert checkpoints.Checkpointer(workdir / "checkpoints").all_steps() == [2, 4]  # not moved
    # Edit and eval with an explicit step: a clear error, not silently corrupt weights.
    with pytest.raises(checkpoints.CorruptCheckpointError, match="step 4 .* is corrupt"):
        edit.load_checked_params(config, str(workdir), network, ema_index=0, step=4)
    with pytest.raises(checkpoints.CorruptCheckpointError, match="choose another step"):
        evaluate._load_params(config, str(workdir), network, 4)
    assert evaluate._load_params(config, str(workdir), network, None)[1] == 2


def test_eval_does_not_reuse_the_shards_of_a_replaced_checkpoint(workdir, monkeypatch, capsys):
    config = _config()
    config.eval.update(num_samples=32, settings=("1",), reference_limit=64)
    calls = []
    original = evaluate.sample_ids
    monkeypatch.setattr(evaluate, "sample_ids", lambda *a: calls.append(a[3]) or original(*a))
    evaluate.run_eval(config, str(workdir))
    assert len(calls) == 1
    evaluate.run_eval(config, str(workdir))  # the same checkpoint: its shard is reused
    assert len(calls) == 1 and "reused 1/1 chunks" in capsys.readouterr().out
    # Step 4 replaced by another model (a retrained run): sampled again, in its own shard dir.
    ckpt = checkpoints.Checkpointer(workdir / "checkpoints")
    state, meta = ckpt.restore_raw(4)
    emas = state["ema_params"]
    first_copy = "0" if isinstance(emas, dict) else 0
    emas[first_copy] = jax.tree.map(lambda x: x * 0.5, emas[first_copy])
    shutil.rmtree(workdir / "checkpoints" / "4")
    ckpt._manager.reload()
    ckpt.save(4, state, {k: v for k, v in meta.items() if k != "digest"})
    ckpt.close()
    evaluate.run_eval(config, str(workdir))
    assert len(calls) == 2 and "reused" not in capsys.readouterr().out
    assert len(list((workdir / "eval" / "step_4").iterdir())) == 2


def test_the_digits_classifier_cache_is_keyed_by_its_training_data(tmp_path, monkeypatch):
    from consistency.measure import digits

    path = digits.cache_path(tmp_path)
    monkeypatch.setattr(digits, "data_digest", lambda *a, **k: "other data")
    assert digits.cache_path(tmp_path) != path
    params = {"Dense_0": {"kernel": np.ones((2, 2), np.float32)}}
    other = {"Dense_0": {"kernel": np.full((2, 2), 2.0, np.float32)}}
    assert digits.params_digest(params) != digits.params_digest(other)
