"""Does `netdoctor probe` of a big model end within its time budget?

    python benchmarks/probe_budget.py              # ResNet-50, default budget (60 s)
    python benchmarks/probe_budget.py --budget 30 --runs 3

Runs, in fresh processes as a user would (Python start, torch import, model build, static
checks, data rules, step timing, the probe's own run, the extra checks and the verified fix all
count), `netdoctor probe fixtures/healthy/resnet50.py:ResNet50 --data synthetic` with no
`--steps`:

* as written (the input shape is inferred from the first conv: 3x32x32), and
* at ImageNet size, `--input-shape 3,224,224` (about 4 GFLOPs per image forward: a training
  step of batch 64 takes well over a minute on a 2-core CPU).

Printed per command: the wall time against the budget (and their ratio), how many steps the
probe ran at which batch size, the time one step took, and the budget's notes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = "fixtures/healthy/resnet50.py:ResNet50"
CASES = [
    ("ResNet-50, shape inferred (3x32x32)", []),
    ("ResNet-50 at 3x224x224", ["--input-shape", "3,224,224"]),
]


def run_once(extra: list[str], budget: float | None) -> tuple[float, dict | None, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    argv = [
        sys.executable,
        "-m",
        "netdoctor",
        "probe",
        TARGET,
        "--data",
        "synthetic",
        "--format",
        "json",
        *extra,
    ]
    if budget is not None:
        argv += ["--time-budget", str(budget)]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    return wall, report, proc.stderr.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="--time-budget to pass (default: the probe's own default, 60 s)",
    )
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--only", choices=["inferred", "224"], help="run one of the two cases")
    args = ap.parse_args()
    budget = args.budget or 60.0
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the start")
    for label, extra in CASES:
        if args.only == "inferred" and extra or args.only == "224" and not extra:
            continue
        for _ in range(args.runs):
            wall, report, err = run_once(extra, args.budget)
            if report is None:
                print(f"{label}: no report ({err.splitlines()[-1] if err else 'no output'})")
                continue
            probe = report.get("measurements", {}).get("probe", {})
            timings = probe.get("timings_s", {})
            steps = probe.get("steps")
            step_s = timings.get("train_s", 0.0) / max(1, steps or 1)
            loud = sorted(
                {f["rule"] for f in report["findings"] if f["severity"] in ("warning", "error")}
            )
            print(
                f"{label}: {wall:.1f} s wall for a {budget:g} s budget "
                f"(ratio {wall / budget:.2f}); {steps} steps of "
                f"batch {probe.get('batch_size')}, {step_s:.2f} s per step; "
                f"warnings/errors: {', '.join(loud) or 'none'}"
            )
            phases = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in timings.items() if v)
            print(f"    phases (s): {phases}")
            for note in report.get("notes", []):
                if note.startswith("time budget") or note.startswith("probe:"):
                    print(f"    {note}")


if __name__ == "__main__":
    main()
