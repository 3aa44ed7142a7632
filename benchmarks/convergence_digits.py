"""Where the paper's CT recipe (and iCT) converge on the bundled digits: the FID curve of one run.

    python benchmarks/convergence_digits.py [--runs=ct,ict] [--steps=20000] [--every=1000]
        [--root=runs/convergence_digits]

Trains configs/ct_digits.py (CT: adaptive N(k) 2 -> 40, mu0 = 0.9, l2) and configs/ict_digits.py
(iCT) with their curricula stretched over --steps (training.total_steps = num_steps), exactly as

    python main.py --config=configs/ct_digits.py --workdir=ROOT/ct \
        --config.training.num_steps=STEPS --config.training.total_steps=STEPS \
        --config.eval.every_steps=EVERY

which scores the EMA params every EVERY steps in the run itself (eval.every_steps: the digits
classifier's features, eval.num_samples = 5,000 samples against the 1,437 training digits; the
one-step and the config's two-step setting). The run's output goes to ROOT/NAME/train.log (appended,
so a killed run resumes and the log keeps both parts). This script then reads the run's
eval/during_training.json (the FIDs) and the log (elapsed minutes at each evaluation) and writes the
curve as a markdown table to benchmarks/results/convergence_digits_DATE_COMMIT.md, with the last
sample grid of each run copied beside it. `--report_only` writes the table from existing runs.
"""

import argparse
import datetime
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {"ct": "ct_digits", "ict": "ict_digits"}
STEP_LINE = re.compile(r"^step (\d+)/\d+ .* elapsed ([\d.]+) min")
EVAL_LINE = re.compile(r"^eval step (\d+): .*\(([\d.]+) s\)$")


def flags(name: str, root: pathlib.Path, steps: int, every: int) -> list[str]:
    return [
        f"--config=configs/{CONFIGS[name]}.py",
        f"--workdir={root / name}",
        f"--config.training.num_steps={steps}",
        f"--config.training.total_steps={steps}",
        f"--config.eval.every_steps={every}",
    ]


def elapsed_minutes(log: pathlib.Path) -> dict[int, float]:
    """Step -> wall minutes since the start of training (across resumed parts of the log).

    A resumed part restarts its 'elapsed' clock, so each part's minutes are added to the sum of
    the parts before it; an evaluation's own seconds are counted where it ran."""
    out, offset, last = {}, 0.0, 0.0
    for line in log.read_text().splitlines():
        if m := STEP_LINE.match(line):
            step, minutes = int(m[1]), float(m[2])
            if minutes + 1e-9 < last:  # a new part (the run was resumed)
                offset += last
            last = minutes
            out[step] = offset + minutes
        elif (m := EVAL_LINE.match(line)) and int(m[1]) in out:
            out[int(m[1])] += float(m[2]) / 60
    return out


def curve(workdir: pathlib.Path, log: pathlib.Path) -> list[dict]:
    """One row per evaluated step: the step, wall minutes and each setting's metrics."""
    record = json.loads((workdir / "eval" / "during_training.json").read_text())
    minutes = elapsed_minutes(log) if log.exists() else {}
    rows = []
    for step in sorted(record["steps"], key=int):
        rows.append({"step": int(step), "minutes": minutes.get(int(step)), **record["steps"][step]})
    return rows


def run_commits(workdir: pathlib.Path) -> list[str]:
    """The commit each part of the run (start and every resume) was trained at (runs.jsonl)."""
    found = []
    for line in (workdir / "runs.jsonl").read_text().splitlines():
        commit = (json.loads(line).get("commit") or "unknown")[:7]
        if commit not in found:
            found.append(commit)
    return found


def table(name: str, rows: list[dict]) -> list[str]:
    # One step first, then by the number of steps (during_training.json sorts its keys).
    settings = sorted(
        (k for k in rows[0] if k not in ("step", "minutes")),
        key=lambda s: (len(s.removeprefix("sigma=").split(",")), s),
    )
    head = " | ".join(f"FID {s}" for s in settings)
    lines = [
        f"| step | wall min | {head} | precision {settings[0]} |",
        "|---" * (3 + len(settings)) + "|",
    ]
    for r in rows:
        minutes = "-" if r["minutes"] is None else f"{r['minutes']:.1f}"
        fids = " | ".join(f"{r[s]['fid']:.2f}" for s in settings)
        lines.append(f"| {r['step']} | {minutes} | {fids} | {r[settings[0]]['precision']:.3f} |")
    best = {s: min(rows, key=lambda r: r[s]["fid"]) for s in settings}
    lines.append("")
    lines += [
        f"- {name} best [{s}]: FID {b[s]['fid']:.2f} at step {b['step']}" for s, b in best.items()
    ]
    return lines


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
    return out.stdout.decode().strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="ct,ict", help=f"comma-separated from {tuple(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=20000, help="steps (and curriculum length)")
    parser.add_argument("--every", type=int, default=1000, help="eval.every_steps")
    parser.add_argument("--root", default="runs/convergence_digits", help="workdirs of the runs")
    parser.add_argument("--report_only", action="store_true", help="only write the table")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    names = [n for n in args.runs.split(",") if n]
    for name in names:
        if name not in CONFIGS:
            raise SystemExit(f"--runs: unknown {name!r}; choose from {tuple(CONFIGS)}")
    root = pathlib.Path(args.root).absolute()
    commit = _commit()
    stamp = f"{datetime.date.today().isoformat()}_{commit}"
    out = pathlib.Path(args.out)
    lines = [f"# CT and iCT convergence on the digits ({stamp})", ""]
    for name in names:
        command = [sys.executable, "main.py", *flags(name, root, args.steps, args.every)]
        log = root / name / "train.log"
        if not args.report_only:
            log.parent.mkdir(parents=True, exist_ok=True)
            print("$ " + shlex.join(["python", *command[1:]]), flush=True)
            with open(log, "a") as f:
                done = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
            if done.returncode:
                raise SystemExit(f"{name} failed ({done.returncode}); see {log}")
        rows = curve(root / name, log)
        lines += [f"## {name}: `{shlex.join(['python', *command[1:]])}`", ""]
        trained = run_commits(root / name)
        lines += [f"Trained at commit(s) {', '.join(trained)}.", ""]
        lines += table(name, rows) + [""]
        grids = sorted((root / name / "samples").glob("grid_*.png"))
        if grids:
            png = out / f"convergence_{name}_digits_{grids[-1].stem}_{trained[-1]}.png"
            shutil.copyfile(grids[-1], png)
            lines += [
                f"Last training grid (EMA copy, the config's sampling.* sampler): `{png.name}`",
                "",
            ]
    path = out / f"convergence_digits_{stamp}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"written": str(path)}))


if __name__ == "__main__":
    main()
