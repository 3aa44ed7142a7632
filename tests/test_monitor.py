"""eval.every_steps: the FID while training, equal to --mode=eval's at the same checkpoint."""

import json

import numpy as np

from configs import test as test_config
from consistency.experiment import evaluate, spec, train


def test_fid_while_training_is_written_and_equals_mode_eval(tmp_path):
    config = test_config.get_config()
    config.eval.update(every_steps=2, num_samples=64, settings=("1", "0,22,39"))
    config.eval.cache_dir = str(tmp_path / "cache")
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    record = json.loads((workdir / "eval" / "during_training.json").read_text())
    assert sorted(record["steps"], key=int) == ["2", "4"]  # every 2 steps, the last included
    for setting in ("1", "0,22,39"):
        fids = [record["steps"][s][setting]["fid"] for s in ("2", "4")]
        assert all(np.isfinite(fids)) and min(fids) > 0
        best = record["best"][setting]
        assert best["fid"] == min(fids) and str(best["step"]) == ("2", "4")[int(np.argmin(fids))]
    events = b"".join(p.read_bytes() for p in (workdir / "tensorboard").glob("events.*"))
    assert b"eval/1/fid" in events and b"eval/0_22_39/fid" in events  # tensorboardX: , -> _
    # --mode=eval of the step-4 checkpoint: the same images, features and reference.
    config.eval.checkpoint_steps = (4,)
    scored = evaluate.run_eval(config, str(workdir))
    for setting in ("1", "0,22,39"):
        want = scored[4][setting]["fid"]
        assert abs(record["steps"]["4"][setting]["fid"] - want) <= 1e-6 * want, setting


def test_fid_while_training_validates_the_eval_settings():
    config = test_config.get_config()
    config.eval.update(every_steps=2, settings=("0,22",))
    found = spec.problems(config, mode="train")
    assert any("eval.settings" in p or "sampling.ts" in p for p in found), found
    config.eval.every_steps = -1
    assert any(p.startswith("eval.every_steps=-1") for p in spec.problems(config, mode="train"))
