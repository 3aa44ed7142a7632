"""LCM's ablations in miniature on the bundled digits: guided teacher, guided CD, skip k, solvers.

    python benchmarks/lcd_digits.py [--root=runs/lcd_digits] [--steps_scale=1.0]
        [--runs=teacher,lcd_k20,...] [--w=0,1,2,4] [--ablation_w=1]

Trains, with `main.py` exactly as a user would (commands printed and recorded):
- `teacher`: configs/lcd_digits.py:teacher, the class-conditional EDM with a null class (label
  dropout 0.1) for classifier-free guidance;
- `lcd_k20`: configs/lcd_digits.py, guided consistency distillation (LCM's recipe: w ~ U[0, 4]
  embedded in the student, pairs k = 20 points apart on a 360-point grid, one Heun step of the
  guided teacher), the reference student;
- `lcd_k1`, `lcd_k5`, `lcd_k10`: the same with skip k = 1, 5, 10 (LCM: k around 20 converges
  faster than k = 1) at equal steps;
- `lcd_euler`: the EDM teacher's step by Euler instead of Heun, k = 20;
- `vp_teacher`: LCM's kind of teacher, configs/lcd_digits.py:vp_teacher (a DDPM network, here
  v-prediction on Stable Diffusion's scaled-linear betas: VP_MODEL), sampled by DDIM at 50 steps;
  `vp_ddim` and `vp_dpm2`: configs/lcd_digits.py:vp_student from it with the teacher's step
  t -> t - 20 by DDIM (LCM's DDIMSolver) or by DPM-Solver-2 (second order).
Each is scored with `--mode=eval` (the digits FID: 5,000 samples' digits-classifier features
against the 1,437 training images; and the class accuracy, the classifier's agreement with the
requested label, where --mode=eval reports it): the teacher by Heun at 35 evaluations, students
at 1, 2 and 4 steps; the teacher and `lcd_k20` at every --w (LCM's convention: guidance scale
1 + w), the ablation students at --ablation_w. Prints a markdown table and a JSON line and writes
benchmarks/results/lcd_digits_DATE_COMMIT.md. Finished runs and evaluations are reused.
"""

import argparse
import json
import pathlib
import shlex
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ is not installed
sys.path.insert(0, str(REPO / "benchmarks"))
import quality_digits as qd  # noqa: E402

TEACHER_SETTINGS = {"teacher": ("18",), "vp_teacher": ("50",)}  # Heun 35 NFE; DDIM 50 NFE
STUDENT_SETTINGS = ("1", "0,11,17", "0,4,8,12,17")  # 1, 2, 4 steps on the 18-point grid
NFE = {"18": 35, "50": 50}
# LCM's schedule kind for the VP runs: an eps network's f moves by sigma F, and on DDPM's linear
# betas sigma(T-1) = 157 (lcd_digits:vp_student needs lr 2e-5 there); v-prediction bounds it.
VP_MODEL = {"model.parameterization": "vp_v", "model.vp.beta_schedule": "scaled_linear",
            "model.vp.beta_start": 0.00085, "model.vp.beta_end": 0.012}  # fmt: skip
# name: (config, training overrides, teacher run or None, steps)
RUNS = {
    "teacher": ("lcd_digits:teacher", {}, None, 2000),
    "lcd_k20": ("lcd_digits", {"skip_steps": 20}, "teacher", 1500),
    "lcd_k1": ("lcd_digits", {"skip_steps": 1}, "teacher", 1500),
    "lcd_k5": ("lcd_digits", {"skip_steps": 5}, "teacher", 1500),
    "lcd_k10": ("lcd_digits", {"skip_steps": 10}, "teacher", 1500),
    "lcd_euler": ("lcd_digits", {"skip_steps": 20, "solver": "euler"}, "teacher", 1500),
}
RUNS.update({
    "vp_teacher": ("lcd_digits:vp_teacher", VP_MODEL, None, 2000),
    "vp_ddim": ("lcd_digits:vp_student", {**VP_MODEL, "solver": "ddim"}, "vp_teacher", 1500),
    "vp_dpm2": ("lcd_digits:vp_student", {**VP_MODEL, "solver": "dpm_solver_2"}, "vp_teacher",
                1500),
})  # fmt: skip
SWEPT = ("teacher", "lcd_k20")  # evaluated at every --w


def nfe(setting: str) -> int:
    return qd.consistency_nfe(setting, NFE)


def flags(name: str, root: pathlib.Path, steps: int) -> list[str]:
    config, training, teacher, _ = RUNS[name]
    training = dict(training, num_steps=steps)
    if teacher is not None:
        training["teacher_checkpoint"] = str(root / teacher / "checkpoints")
    module, _, arg = config.partition(":")
    out = [f"--config=configs/{module}.py" + (f":{arg}" if arg else ""), f"--workdir={root / name}"]
    # A dotted key (model.vp.beta_schedule) is a full config path; the others are training.*.
    out += [f"--config.{k if '.' in k else 'training.' + k}={v}" for k, v in training.items()]
    return out + ["--config.eval.every_steps=0"]  # scored by --mode=eval below


def eval_flags(name: str, root: pathlib.Path, w: float, num_samples: int) -> list[str]:
    settings = TEACHER_SETTINGS.get(name, STUDENT_SETTINGS)
    return [
        "--mode=eval",
        f"--config.sampling.guidance={w}",
        f"--config.eval.settings={settings!r}".replace(" ", ""),
        f"--config.eval.cache_dir={root / 'classifier'}",  # one classifier for every run
        f"--config.eval.num_samples={num_samples}",
    ]


def table(rows: list[dict], floor_fid: float) -> list[str]:
    lines = [
        "| run | sampler | NFE | w | digits FID | class accuracy | train min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        acc = f"{m['class_accuracy']:.3f}" if "class_accuracy" in m else "-"
        lines.append(
            f"| {r['run']} | {r['setting']} | {r['nfe']} | {r['w']:g} | {m['fid']:.2f} | {acc} | "
            f"{r['train_s'] / 60:.1f} |"
        )
    lines.append(f"| test split vs train (floor) | data | - | - | {floor_fid:.2f} | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="runs/lcd_digits", help="workdirs of the runs")
    parser.add_argument(
        "--runs", default=",".join(RUNS), help=f"comma-separated from {tuple(RUNS)}"
    )
    parser.add_argument("--steps_scale", type=float, default=1.0, help="x each run's steps")
    parser.add_argument("--w", default="0,1,2,4", help="w of the teacher and lcd_k20 (1 + w CFG)")
    parser.add_argument("--ablation_w", type=float, default=1.0, help="w of the other students")
    parser.add_argument("--num_samples", type=int, default=5000, help="samples per setting")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    root = pathlib.Path(args.root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    names = qd.run_names(args.runs, RUNS, root, {n: r[2] for n, r in RUNS.items()}, "checkpoints")
    sweep = qd.floats(args.w)
    start, rows, commands = time.time(), [], {}
    for name in names:
        steps = max(int(RUNS[name][3] * args.steps_scale), 10)
        train = flags(name, root, steps)
        main_py = [sys.executable, "main.py"]
        timing_path = root / name / "timing.json"
        timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
        if timing.get("flags") != train:  # a new or changed run: train (resuming) and time it
            timing = {"flags": train, "train_s": qd._run(main_py + train, root / f"{name}.log")}
            timing_path.write_text(json.dumps(timing))
        commands[name] = shlex.join(["python", "main.py", *train])
        for w in sweep if name in SWEPT else [args.ablation_w]:
            done = root / name / f"eval_w{w:g}_n{args.num_samples}.json"
            command = main_py + train + eval_flags(name, root, w, args.num_samples)
            for setting, metrics in qd.scored_once(command, root / name, done).items():
                rows.append(
                    dict(run=name, setting=setting, nfe=nfe(setting), w=w, metrics=metrics,
                         steps=steps, train_s=timing["train_s"])
                )  # fmt: skip
    base = qd.floor(root)
    total = time.time() - start
    title = "Guided consistency distillation on the digits"
    qd.write_report("lcd_digits", title, table(rows, base["fid"]), rows, commands, total, args.out)


if __name__ == "__main__":
    main()
