"""The paper's claims in miniature on the bundled 8x8 digits: digits FID per network evaluation.

    python benchmarks/quality_digits.py [--root=runs/quality_digits] [--steps_scale=1.0]
        [--runs=all|NAME,...] [--steps=NAME=STEPS,...]

Trains the EDM teacher, then CD (l2 and pseudo-Huber, Heun N=18, from the teacher), CT
(adaptive N(k), mu(k), from scratch), iCT (from scratch) and ECT (from the teacher), each with
`main.py` exactly as a user would (the commands are printed and recorded), evaluates each with
`--mode=eval` (the digits FID: the project's digits classifier's features, 5,000 samples
against the 1,437 training images) for 1-step and 2-step sampling, the teacher with Heun at 35
network evaluations, and the floor: the 360 held-out test digits against the training images.
Prints a markdown table and one JSON line, and writes the table to
benchmarks/results/quality_digits_DATE_COMMIT.md. Runs that finished are reused (their
workdirs resume; finished ones are skipped, their recorded wall times reported), so an
interrupted benchmark continues where it stopped.
"""

import argparse
import datetime
import json
import pathlib
import shlex
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ is not installed
from configs import _digits, _successors  # noqa: E402
from consistency.experiment import evaluate  # noqa: E402
from consistency.io import sharding  # noqa: E402

ICT_TWO_STEP = "sigma=80,0.821"  # iCT's CIFAR-10 intermediate sigma, also used by ECT
# name: (config, training (or dotted) overrides, eval settings, teacher run or None, steps)
RUNS = {
    "edm": ("edm_digits", {}, ("18",), None, 1500),
    "cd_l2": ("cd_digits", {"distance": "l2"}, ("1", "0,11,17"), "edm", 600),
    "cd_pseudo_huber": ("cd_digits", {"distance": "pseudo_huber"}, ("1", "0,11,17"), "edm", 600),
    "ct": ("ct_digits", {}, ("1", "0,22,40"), None, 1000),
    "ict": ("ict_digits", {}, ("1", ICT_TWO_STEP), None, 1000),
    # Progressive distillation: N = 32 -> 1 over 5 halvings (150 steps each, the last two 300).
    "pd": ("pd_digits", {}, ("1", "2", "4"), "edm", 1200),
    "ect": ("ect_digits", {}, ("1", ICT_TWO_STEP), "edm", 2000),  # 8 stages of 250
}
DEFAULT_RUNS = tuple(RUNS)
# More successors, run on request (--runs=all or a list): continuous-time CD/CT, sCT and sCD
# (which start from a TrigFlow diffusion teacher of their own).
SCM_TWO_STEP = f"sigma=80,{_successors.SCM_MID_SIGMA:.4f}"
RUNS.update({
    "cd_continuous": ("continuous_digits:cd-l2", {}, ("1", ICT_TWO_STEP), "edm", 1500),
    # jcm's lr 5e-6 is for 800k steps: over a few hundred it leaves the teacher unchanged.
    "ct_continuous": ("continuous_digits:ct-l2", {"optim.lr": 1e-4}, ("1", ICT_TWO_STEP), "edm",
                      1000),
    "trigflow": ("scm_digits:teacher", {}, ("18",), None, 1500),
    "sct": ("scm_digits:sct", {"scm_warmup_steps": 100}, ("1", SCM_TWO_STEP), "trigflow", 500),
    "scd": ("scm_digits:scd", {"scm_warmup_steps": 100}, ("1", SCM_TWO_STEP), "trigflow", 500),
})  # fmt: skip
NFE = {"18": 35, "1": 1}  # Heun on an 18-point grid: 2 x 18 - 1 evaluations


def _flags(name: str, root: pathlib.Path, steps: int, num_samples: int) -> list[str]:
    config, training, settings, teacher, _ = RUNS[name]
    training = dict(training, num_steps=steps, total_steps=steps)
    if teacher is not None:
        training["teacher_checkpoint"] = str(root / teacher / "checkpoints")
    module, _, arg = config.partition(":")
    flags = [
        f"--config=configs/{module}.py" + (f":{arg}" if arg else ""),
        f"--workdir={root / name}",
    ]
    # A dotted key (optim.lr) is a full config path; the others are training.* keys.
    flags += [f"--config.{k if '.' in k else 'training.' + k}={v}" for k, v in training.items()]
    flags += [f"--config.eval.settings={settings!r}".replace(" ", "")]
    flags += [f"--config.eval.num_samples={num_samples}"]
    return flags


def _run(command: list[str], log: pathlib.Path) -> float:
    """Run a main.py command (output to log); its wall time in seconds."""
    print("$ " + shlex.join(["python", *command[1:]]), flush=True)
    start = time.time()
    with open(log, "a") as out:
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}); see {log}")
    return time.time() - start


def run_names(arg, runs: dict, root: pathlib.Path, needs: dict, finished: str) -> list[str]:
    """The runs of --runs (comma-separated, or a list), each known, each one's prerequisite
    (needs[name], a run or None) either among them or finished (root/need/finished exists)."""
    names = [n for n in arg.split(",") if n] if isinstance(arg, str) else list(arg)
    for name in names:
        if name not in runs:
            raise SystemExit(f"--runs: unknown {name!r}; choose from {tuple(runs)}")
        need = needs.get(name)
        if need and need not in names and not (root / need / finished).exists():
            raise SystemExit(f"--runs: {name} needs the {need} run (add it to --runs)")
    return names


def floats(arg: str) -> list[float]:
    """A comma-separated list of numbers (--w=0,1,2)."""
    return [float(v) for v in arg.split(",") if v]


def scored_once(command: list[str], workdir: pathlib.Path, done: pathlib.Path) -> dict:
    """{setting: metrics} of a --mode=eval command, run (output to workdir's log beside it) and
    kept in `done` the first time, read from it afterwards."""
    if not done.exists():
        _run(command, workdir.parent / f"{workdir.name}.log")
        done.write_text(json.dumps(latest_metrics(workdir)))
    return json.loads(done.read_text())


def latest_metrics(workdir: pathlib.Path) -> dict:
    """{setting: metrics} of the newest --mode=eval record in workdir (by step number)."""
    found = (workdir / "eval").glob("metrics_step*.json")
    latest = max(found, key=lambda p: int(p.stem.removeprefix("metrics_step")))
    return json.loads(latest.read_text())["settings"]


def consistency_nfe(setting: str, fixed: dict[str, int]) -> int:
    """Network evaluations of an eval setting: `fixed` for teachers' 'N', else the steps of
    '1' / 'i0,...,N-1' (the last index ends the chain)."""
    return fixed.get(setting, max(len(setting.split(",")) - 1, 1))


def write_report(
    stem: str, title: str, body: list[str], rows: list[dict], commands: dict, total: float, out: str
) -> None:
    """Print and write benchmarks/results/{stem}_DATE_COMMIT.md (title, the command line,
    body, wall time, the runs' commands), then one JSON line."""
    today, commit = datetime.date.today().isoformat(), _commit()
    report = [
        f"# {title} ({today}, commit {commit})", "",
        f"`{shlex.join(['python', f'benchmarks/{stem}.py', *sys.argv[1:]])}`", "",
        *body, "",
        f"Total wall time {total / 60:.1f} min (runs reused from earlier invocations count 0); "
        "'train min' includes compilation.", "",
        "Runs:", *[f"- `{c}`" for c in commands.values()],
    ]  # fmt: skip
    print("\n".join(report))
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{stem}_{today}_{commit}.md").write_text("\n".join(report) + "\n")
    print(json.dumps({"date": today, "commit": commit, "total_s": total, "rows": rows}))


def floor(root: pathlib.Path) -> dict:
    """The digits FID of the 360 held-out test images against the 1,437 training images."""
    config, mesh = _digits.digits(), sharding.make_mesh()
    extract = evaluate.make_extractor(config, root / "classifier")
    reference = evaluate.reference_statistics(
        evaluate.split_features(config, "train", extract, mesh)
    )
    return evaluate.score(
        evaluate.split_features(config, "test", extract, mesh), reference, kind="digits"
    )


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
    return out.stdout.decode().strip() or "unknown"


def _table(rows: list[dict], floor_fid: float) -> list[str]:
    lines = [
        "| run | sampler | NFE | digits FID | IS | precision | recall | train min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        lines.append(
            f"| {r['run']} | {r['setting']} | {r['nfe']} | {m['fid']:.2f} | {m['is']:.2f} | "
            f"{m['precision']:.3f} | {m['recall']:.3f} | {r['train_s'] / 60:.1f} |"
        )
    lines.append(f"| test split vs train (floor) | data | - | {floor_fid:.2f} | | | | |")
    return lines


def _targets(fid: dict) -> list[str]:
    """The issue's goals, measured: CD 1-step <= 1.3x teacher, 2-step <= 1.1x; CT 2 < 1."""
    out, teacher = [], fid.get(("edm", "18"))
    for run in ("cd_l2", "cd_pseudo_huber"):
        for setting, factor in (("1", 1.3), ("0,11,17", 1.1)):
            got = fid.get((run, setting))
            if teacher and got:
                ok = "met" if got <= factor * teacher else "not met"
                out.append(
                    f"{run} {setting}-step FID {got:.2f} <= {factor} x teacher {teacher:.2f}: {ok}"
                )
    one, two = fid.get(("ct", "1")), fid.get(("ct", "0,22,40"))
    if one and two:
        ok = "met" if two < one else "not met"
        out.append(f"CT 2-step {two:.2f} < CT 1-step {one:.2f}: {ok}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="runs/quality_digits", help="workdirs of the runs")
    parser.add_argument(
        "--runs",
        default=",".join(DEFAULT_RUNS),
        help=f"comma-separated, or 'all'; from {tuple(RUNS)}",
    )
    parser.add_argument("--steps_scale", type=float, default=1.0, help="x each run's steps")
    parser.add_argument(
        "--steps",
        default="",
        help="per-run step counts, e.g. ect=2000,ict=500 (overrides --steps_scale for those runs)",
    )
    parser.add_argument("--num_samples", type=int, default=5000, help="samples per setting")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    root = pathlib.Path(args.root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    runs = list(RUNS) if args.runs == "all" else args.runs
    names = run_names(runs, RUNS, root, {n: r[3] for n, r in RUNS.items()}, "checkpoints")
    fixed = {}
    for item in filter(None, args.steps.split(",")):
        name, _, count = item.partition("=")
        if name not in RUNS or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--steps: expected RUN=STEPS with RUN in {tuple(RUNS)}, got {item!r}")
        fixed[name] = int(count)
    start = time.time()
    rows, fid, commands = [], {}, {}
    for name in names:
        steps = fixed.get(name, max(int(RUNS[name][4] * args.steps_scale), 10))
        flags = _flags(name, root, steps, args.num_samples)
        main_py = [sys.executable, "main.py"]
        timing = root / name / "timing.json"
        done = json.loads(timing.read_text()) if timing.exists() else {}
        if done.get("flags") == flags:  # finished with the same flags: reuse results and times
            train_s, eval_s = done["seconds"]
        else:
            train_s = _run(main_py + flags, root / f"{name}.log")
            # One classifier and reference cache for every run (the floor's too): trained once.
            cache = f"--config.eval.cache_dir={root / 'classifier'}"
            eval_s = _run(main_py + flags + ["--mode=eval", cache], root / f"{name}.log")
            timing.write_text(json.dumps({"flags": flags, "seconds": [train_s, eval_s]}))
        commands[name] = shlex.join(["python", "main.py", *flags])
        found = (root / name / "eval").glob("metrics_step*.json")  # the latest step's, by number
        latest = max(found, key=lambda p: int(p.stem.removeprefix("metrics_step")))
        record = json.loads(latest.read_text())
        for setting, metrics in record["settings"].items():
            nfe = NFE.get(setting, len(setting.removeprefix("sigma=").split(",")))
            if name == "pd":  # N Euler steps, then the denoiser at sigma_min (jcm)
                nfe = int(setting) + 1
            rows.append(
                dict(
                    run=name,
                    setting=setting,
                    nfe=nfe,
                    metrics=metrics,
                    steps=steps,
                    train_s=train_s,
                    eval_s=eval_s,
                )
            )
            fid[(name, setting)] = metrics["fid"]
    base = floor(root)
    lines = _table(rows, base["fid"])
    goals = _targets(fid)
    total = time.time() - start
    today, commit = datetime.date.today().isoformat(), _commit()
    report = [
        f"# Digits quality benchmark ({today}, commit {commit})", "",
        f"`{shlex.join(['python', 'benchmarks/quality_digits.py', *sys.argv[1:]])}`", "",
        *lines, "",
        f"Total wall time {total / 60:.1f} min on {len(sharding.make_mesh().devices.flat)} "
        "device(s); 'train min' includes compilation and snapshots.", "",
        "Targets (goals, not assertions):", *[f"- {g}" for g in goals], "",
        "Runs:", *[f"- `{c}`" for c in commands.values()],
    ]  # fmt: skip
    print("\n".join(report))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_digits_{today}_{commit}.md").write_text("\n".join(report) + "\n")
    print(
        json.dumps(
            {
                "date": today,
                "commit": commit,
                "total_s": total,
                "floor": base,
                "rows": rows,
                "commands": commands,
                "targets": goals,
            }
        )
    )


if __name__ == "__main__":
    main()
