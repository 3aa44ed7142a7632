"""The convergence benchmark's bookkeeping: wall minutes across resumed log parts, the table."""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import convergence_digits as cd

LOG = """\
step 100/400  loss 0.1  grad_norm 0.7  N 4  2.58 steps/s  ETA 2.0 min  elapsed 0.6 min
step 200/400  loss 0.1  grad_norm 0.2  N 5  3.88 steps/s  ETA 1.0 min  elapsed 1.1 min
eval step 200: [1] fid 135.79 (best 135.79 @ 200)  [0,22,40] fid 83.65 (best 83.65 @ 200)  (30.0 s)
preempted: saved checkpoint step 250 in x; run the same command to resume
step 300/400  loss 0.1  grad_norm 0.2  N 5  3.88 steps/s  ETA 1.0 min  elapsed 0.4 min
step 400/400  loss 0.1  grad_norm 0.2  N 5  3.88 steps/s  ETA 0.0 min  elapsed 0.9 min
eval step 400: [1] fid 35.00 (best 35.00 @ 400)  [0,22,40] fid 20.00 (best 20.00 @ 400)  (6.0 s)
"""


def _metrics(fid):
    return {"fid": fid, "precision": 0.5}


def test_elapsed_minutes_add_resumed_parts_and_eval_seconds(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(LOG)
    minutes = cd.elapsed_minutes(log)
    assert minutes[100] == 0.6
    assert abs(minutes[200] - (1.1 + 0.5)) < 1e-9  # the evaluation's 30 s counted
    assert abs(minutes[300] - (1.1 + 0.4)) < 1e-9  # the second part starts after the first
    assert abs(minutes[400] - (1.1 + 0.9 + 0.1)) < 1e-9


def test_curve_table_orders_settings_and_names_the_best(tmp_path):
    (tmp_path / "eval").mkdir()
    record = {
        "steps": {
            "400": {"0,22,40": _metrics(20.0), "1": _metrics(35.0)},
            "200": {"0,22,40": _metrics(83.65), "1": _metrics(135.79)},
        }
    }
    (tmp_path / "eval" / "during_training.json").write_text(json.dumps(record))
    log = tmp_path / "train.log"
    log.write_text(LOG)
    rows = cd.curve(tmp_path, log)
    assert [r["step"] for r in rows] == [200, 400]
    lines = cd.table("ct", rows)
    assert lines[0].startswith("| step | wall min | FID 1 | FID 0,22,40 |")
    assert lines[2] == "| 200 | 1.6 | 135.79 | 83.65 | 0.500 |"
    assert "- ct best [1]: FID 35.00 at step 400" in lines
