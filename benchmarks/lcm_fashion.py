"""LCM's offline demonstration on Fashion-MNIST: autoencoder, latent teacher, LCD, LCF, pixel LCD.

    python benchmarks/lcm_fashion.py [--root=runs/lcm_fashion] [--steps_scale=1.0]
        [--runs=vae,encode,teacher,student,lcf_before,lcf,pixel_teacher,pixel_student]
        [--w=0,1,3] [--teacher_w=1] [--lcf_w=1] [--num_samples=1000]

Runs, with `main.py` exactly as a user would (commands printed and recorded), in ROOT/NAME:
- `vae`: configs/vae_fashion.py, the 32x32 -> 8x8x4 KL autoencoder trained here;
- `encode`: configs/latent_fashion.py --mode=encode, every class's latents cached once
  (latent.vae = ROOT/vae, latent.cache = ROOT/encode/latents, read by every latent stage);
- `teacher`: configs/lcd_latent_fashion.py:teacher, the guided latent EDM on the clothes
  (SOURCE: T-shirt, trouser, pullover, dress, coat, shirt);
- `student`: :student, LCD (guided CD of the teacher, skip 20 of 360, w ~ U[0, 4] embedded);
- `lcf_before`: no training: the student's checkpoint copied into ROOT/lcf_before/checkpoints
  and scored by --mode=eval with :lcf's flags, so on the NEW classes (TARGET: sandal, sneaker,
  bag, ankle boot; samples of those labels, FID against their images). A separate workdir
  because --mode=eval's sample chunks (WORKDIR/eval/step_k/SETTING-HASH) are keyed by the
  checkpoint and sampler but not by data.classes: an eval of the student's own workdir with
  --config.data.classes overridden would reuse its chunks of the clothes. main.py trains at
  least one step, so "the lcf run at step 0" does not exist as a checkpoint;
- `lcf`: :lcf, consistency training without a teacher from the student's EMA on TARGET;
- `pixel_teacher`, `pixel_student`: configs/lcd_fashion.py, the same two stages on the 32x32
  pixels (the pixel UNet of configs/_fashion.py) on SOURCE: the control at equal compute, read
  as equal training FLOPs (XLA's count of each config's lowered train step, `equal_steps`): the
  pixel teacher gets the latent teacher's and the autoencoder's training (the autoencoder
  counted against the latent side, though LCM's is pre-trained), the pixel student the latent
  student's. A 32x32x1 pixel step through three UNet levels costs ~18x an 8x8x4 latent step
  through two, so the pixel runs train ~1/18 as many steps (the encoding, a forward pass over
  the data, is not counted). The table gives every run's steps and wall time.
Scores by --mode=eval (FID in the Fashion-MNIST classifier's features against the first 10,000
training images of the run's classes; class accuracy: the classifier's agreement with the
requested label): the teachers by Heun at 35 evaluations, the students and LCF at 1, 2 and 4
steps; the students at every --w (LCM's convention: guidance scale 1 + w), the teachers at
--teacher_w (35 evaluations per sample: the pixel teacher's sampling is the dearest evaluation),
LCF before and after at --lcf_w. Every sample set has --num_samples images (the configs' 5,000
would not fit the hour).

The whole benchmark takes ~37 min on a quiet 2-core machine (training 20, evaluations 17;
lcm_fashion_2026-12-05_3ba814f.md); --steps_scale stretches every run. Prints a markdown
table and a JSON line and writes benchmarks/results/lcm_fashion_DATE_COMMIT.md. Finished runs
and evaluations are reused (per --root; a changed step count trains on, resuming).
"""

import argparse
import importlib
import json
import pathlib
import shlex
import shutil
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ is not installed
sys.path.insert(0, str(REPO / "benchmarks"))
import quality_digits as qd  # noqa: E402

TEACHER_SETTINGS = ("18",)  # Heun, 35 evaluations
STUDENT_SETTINGS = ("1", "0,11,17", "0,4,8,12,17")  # 1, 2, 4 steps on the 18-point grid
LATENT = "configs/lcd_latent_fashion.py"
# name: (config, mode, training overrides, {flag: run whose workdir it names}, steps): steps None
# (no training), a count, or EQUAL + the latent runs whose training FLOPs the run gets.
EQUAL = "flops of"
RUNS = {
    "vae": ("configs/vae_fashion.py", "train", {}, {}, 600),
    "encode": ("configs/latent_fashion.py", "encode", {}, {}, None),
    "teacher": (f"{LATENT}:teacher", "train", {}, {}, 1000),
    "student": (f"{LATENT}:student", "train", {},
                {"training.teacher_checkpoint": "teacher/checkpoints"}, 300),
    "lcf_before": (f"{LATENT}:lcf", "eval", {},
                   {"training.init_checkpoint": "student/checkpoints"}, 200),
    "lcf": (f"{LATENT}:lcf", "train", {}, {"training.init_checkpoint": "student/checkpoints"}, 200),
    "pixel_teacher": ("configs/lcd_fashion.py:teacher", "train", {}, {},
                      (EQUAL, "vae", "teacher")),
    "pixel_student": ("configs/lcd_fashion.py:student", "train", {},
                      {"training.teacher_checkpoint": "pixel_teacher/checkpoints"},
                      (EQUAL, "student")),
}  # fmt: skip
NEEDS = {"encode": "vae", "teacher": "encode", "student": "teacher", "lcf_before": "student",
         "lcf": "student", "pixel_student": "pixel_teacher"}  # fmt: skip
SWEPT = ("student", "pixel_student")  # evaluated at every --w
TEACHERS = ("teacher", "pixel_teacher")  # at --teacher_w
LCF = ("lcf_before", "lcf")  # evaluated at --lcf_w


def run_config(name: str):
    """Run `name`'s config as its module builds it (before the command's flags)."""
    path, _, arg = RUNS[name][0].partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return module.get_config(arg) if arg else module.get_config()


def step_gflops(name: str) -> float:
    """XLA's count of the floating-point operations of one train step of run `name`'s config
    (the lowered step, on synthetic inputs; nothing runs)."""
    import train_step as bench  # benchmarks/train_step.py: the configured step and its inputs

    s = bench.setup(run_config(name))
    return bench._flops(s.step.lower(s.state, s.batch, s.teacher, s.distance, s.key)) / 1e9


def equal_steps(name: str, scale: float, gflops: dict) -> int:
    """Run `name`'s steps at equal training FLOPs: the sum over its latent runs of steps x
    GFLOP per step, over its own GFLOP per step (each count kept in `gflops`)."""
    for run in (name, *RUNS[name][4][1:]):
        if run not in gflops:
            gflops[run] = step_gflops(run)
    budget = sum(run_steps(run, scale, gflops) * gflops[run] for run in RUNS[name][4][1:])
    return max(round(budget / gflops[name]), 1)


def warmup_flags(name: str, steps: int | None, scale: float, gflops: dict) -> dict:
    """An equal-compute run's lr warm-up: the same fraction of its run as its latent
    counterpart's (the last run it is measured against) of that run, not the config's count."""
    if not isinstance(RUNS[name][4], tuple):
        return {}
    warmup = run_config(name).optim.warmup_steps
    counterpart = run_steps(RUNS[name][4][-1], scale, gflops)
    return {"optim.warmup_steps": min(warmup, round(warmup * steps / counterpart))}


def run_steps(name: str, scale: float, gflops: dict) -> int | None:
    steps = RUNS[name][4]
    if isinstance(steps, tuple):
        return equal_steps(name, scale, gflops)
    return None if steps is None else max(int(steps * scale), 10)


def nfe(setting: str) -> int:
    return qd.consistency_nfe(setting, {"18": 35})


def flags(name: str, root: pathlib.Path, steps: int | None, extra: dict) -> list[str]:
    config, _, overrides, paths, _ = RUNS[name]
    values = dict(overrides, **extra, **{k: str(root / v) for k, v in paths.items()})
    if config.startswith(LATENT) or name == "encode":  # this benchmark's autoencoder and cache
        values.update(
            {"latent.vae": str(root / "vae"), "latent.cache": str(root / "encode" / "latents")}
        )
    if steps is not None:
        values["training.num_steps"] = steps
    out = [f"--config={config}", f"--workdir={root / name}"]
    out += [f"--config.{k}={v}" for k, v in values.items()]
    return out + (["--config.eval.every_steps=0"] if steps is not None else [])  # --mode=eval


def eval_flags(name: str, root: pathlib.Path, w: float, num_samples: int) -> list[str]:
    settings = TEACHER_SETTINGS if name.endswith("teacher") else STUDENT_SETTINGS
    return [
        "--mode=eval",
        f"--config.sampling.guidance={w}",
        f"--config.eval.settings={settings!r}".replace(" ", ""),
        f"--config.eval.cache_dir={root / 'classifier'}",  # one classifier for every run
        f"--config.eval.num_samples={num_samples}",
    ]


def prepare(name: str, root: pathlib.Path, steps: int | None, extra: dict) -> dict:
    """Train (resuming) or encode `name` unless done with these flags: {flags, train_s}."""
    main_py, mode = [sys.executable, "main.py"], RUNS[name][1]
    command = flags(name, root, steps, extra)
    timing_path = root / name / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    source = ""  # lcf_before: the student's run it copied (a retrained student is copied again)
    if mode == "eval":
        source = (root / "student" / "timing.json").read_text()
    if timing.get("flags") == command and timing.get("source", "") == source:
        return timing
    (root / name).mkdir(parents=True, exist_ok=True)
    if mode == "eval":  # lcf_before: the student's checkpoint as it is before fine-tuning
        shutil.rmtree(root / name / "checkpoints", ignore_errors=True)
        shutil.copytree(root / "student" / "checkpoints", root / name / "checkpoints")
        print(f"$ cp -r {root / 'student/checkpoints'} {root / name / 'checkpoints'}", flush=True)
        train_s = 0.0
    else:
        extra = ["--mode=encode"] if mode == "encode" else []
        train_s = qd._run(main_py + command + extra, root / f"{name}.log")
    timing = {"flags": command, "train_s": train_s, "steps": steps, "source": source}
    timing_path.write_text(json.dumps(timing))
    return timing


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| run | classes | sampler | NFE | w | FID | class accuracy | steps | train min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        acc = f"{m['class_accuracy']:.3f}" if "class_accuracy" in m else "-"
        lines.append(
            f"| {r['run']} | {r['classes']} | {r['setting']} | {r['nfe']} | {r['w']:g} | "
            f"{m['fid']:.2f} | {acc} | {r['steps']} | {r['train_s'] / 60:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="runs/lcm_fashion", help="workdirs of the runs")
    parser.add_argument(
        "--runs", default=",".join(RUNS), help=f"comma-separated from {tuple(RUNS)}"
    )
    parser.add_argument("--steps_scale", type=float, default=1.0, help="x each run's steps")
    parser.add_argument("--w", default="0,1,3", help="w of the students (1 + w CFG)")
    parser.add_argument("--teacher_w", default="1", help="w of the teachers")
    parser.add_argument("--lcf_w", default="1", help="w of LCF before and after fine-tuning")
    parser.add_argument("--num_samples", type=int, default=1000, help="samples per setting")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    root = pathlib.Path(args.root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    names = qd.run_names(args.runs, RUNS, root, NEEDS, "timing.json")
    from configs import lcd_latent_fashion  # the class split every stage's config uses

    source, target = lcd_latent_fashion.SOURCE, lcd_latent_fashion.TARGET
    sweep, lcf_sweep, teacher_sweep = (qd.floats(a) for a in (args.w, args.lcf_w, args.teacher_w))
    start, rows, commands, gflops = time.time(), [], {}, {}
    for name in names:
        steps = run_steps(name, args.steps_scale, gflops)
        extra = warmup_flags(name, steps, args.steps_scale, gflops)
        timing = prepare(name, root, steps, extra)
        mode = RUNS[name][1]
        shown = ["python", "main.py", *timing["flags"]] + ([f"--mode={mode}"] * (mode != "train"))
        commands[name] = shlex.join(shown)
        if name in ("vae", "encode"):  # no FID of an autoencoder or a cache: the latent runs'
            continue
        for w in sweep if name in SWEPT else teacher_sweep if name in TEACHERS else lcf_sweep:
            done = root / name / f"eval_w{w:g}_n{args.num_samples}.json"
            command = [sys.executable, "main.py", *timing["flags"]]
            scored = qd.scored_once(
                command + eval_flags(name, root, w, args.num_samples), root / name, done
            )
            classes = "new" if name in LCF else "clothes"
            train_s = timing["train_s"] if name != "lcf_before" else 0.0
            for setting, metrics in scored.items():
                rows.append(
                    dict(run=name, classes=classes, setting=setting, nfe=nfe(setting), w=w,
                         metrics=metrics, steps=steps if name != "lcf_before" else 0,
                         train_s=train_s)
                )  # fmt: skip
    total = time.time() - start
    encode_s = json.loads((root / "encode" / "timing.json").read_text())["train_s"] if (
        root / "encode" / "timing.json").exists() else float("nan")  # fmt: skip
    vae_s = json.loads((root / "vae" / "timing.json").read_text())["train_s"] if (
        root / "vae" / "timing.json").exists() else float("nan")  # fmt: skip
    body = [
        f"Clothes = classes {source} (teachers, students); new = {target} (LCF: lcf_before is "
        "the LCD student on them before fine-tuning, lcf after). FID: the Fashion-MNIST "
        f"classifier's features, {args.num_samples} samples against the first 10,000 training "
        "images of those classes. The latent runs also need the autoencoder "
        f"({vae_s / 60:.1f} min) and the encoding ({encode_s / 60:.1f} min).", "",
        *table(rows),
    ]  # fmt: skip
    if gflops:
        body += ["", "Equal compute (XLA's count of one train step, batch 128; the autoencoder's "
                 "at its batch): " + ", ".join(f"{k} {v:.1f} GFLOP" for k, v in gflops.items())
                 + "; the pixel runs' steps: " + ", ".join(
                     f"{n} {run_steps(n, args.steps_scale, gflops)} (the FLOPs of "
                     + " + ".join(f"{r} x {run_steps(r, args.steps_scale, gflops)}"
                                  for r in RUNS[n][4][1:]) + ")"
                     for n in RUNS if isinstance(RUNS[n][4], tuple))]  # fmt: skip
    title = "Latent consistency models on Fashion-MNIST, offline"
    qd.write_report("lcm_fashion", title, body, rows, commands, total, args.out)


if __name__ == "__main__":
    main()
