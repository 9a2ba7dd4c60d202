"""How long `netdoctor check` takes as a pre-commit hook or CI gate: whole fresh processes, as a
user runs them (Python start, torch import, model build, trace, rules, report).

    python benchmarks/check_speed.py                  # both parts, default settings
    python benchmarks/check_speed.py --pairs 15       # more pairs for the ratio
    python benchmarks/check_speed.py --threads 1      # OMP_NUM_THREADS=1 for every process
    python benchmarks/check_speed.py --only ratio     # just the ratio to the floor

1. The ratio to the floor: `check fixtures/healthy/resnet50.py:ResNet50 --input-shape 3,224,224`
   against the floor of any check of that model, a process that only imports torch, builds the
   model and traces it with torch.fx. The two run in turn (A B A B ...) and the ratio is taken
   pair by pair, so a change in the machine's speed during the run moves both; the median of the
   pairs' ratios is printed, with the medians of wall and CPU seconds.
2. A table of commands: median and min..max wall seconds and peak resident memory. The first
   command (`netdoctor rules`) does not import torch; `python -c "import torch"` shows how much
   of a check is the torch import alone; the folder row checks every healthy model in one
   process (torch is imported once, not per model).

netdoctor runs byte-compiled, as pip installs it (pip compiles every module at install; a source
checkout run with PYTHONDONTWRITEBYTECODE set would compile netdoctor's modules in every process,
which no installed copy does): the script compiles src/netdoctor first. The floor's torch is
byte-compiled too.

On a machine shared with other work, pass --threads 1: an oversubscribed OpenMP pool spins and
inflates the check's forward pass (the floor has none). On an idle machine more threads only
make the check's forward pass faster, so the one-thread ratio is the conservative figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
HEALTHY = REPO / "fixtures" / "healthy"

RESNET50_CHECK = [
    PY,
    "-m",
    "netdoctor",
    "check",
    "fixtures/healthy/resnet50.py:ResNet50",
    "--input-shape",
    "3,224,224",
]
FLOOR = [
    PY,
    "-c",
    """
import importlib.util

import torch
from torch import fx

spec = importlib.util.spec_from_file_location("resnet50", "fixtures/healthy/resnet50.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
fx.symbolic_trace(module.ResNet50())
""",
]

COMMANDS = [
    ("netdoctor rules", [PY, "-m", "netdoctor", "rules"]),
    ("python -c 'import torch'", [PY, "-c", "import torch"]),
    ("floor: torch + build + trace ResNet-50", FLOOR),
    ("check ResNet-50 (3x224x224)", RESNET50_CHECK),
    (
        "check healthy ResNet (3x32x32)",
        [
            PY,
            "-m",
            "netdoctor",
            "check",
            "fixtures/healthy/resnet.py:ResNet",
            "--input-shape",
            "3,32,32",
        ],
    ),
    (
        "check sick AlexNet (1x224x224)",
        [
            PY,
            "-m",
            "netdoctor",
            "check",
            "fixtures/sick/alexnet.py:AlexNet",
            "--input-shape",
            "1,224,224",
        ],
    ),
    (
        f"check the healthy folder ({len(list(HEALTHY.glob('*.py')))} files)",
        [PY, "-m", "netdoctor", "check", "fixtures/healthy"],
    ),
    ("check --fix on a copy of AlexNet", None),  # filled in main(): needs a fresh copy per run
]


def run_once(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MiB) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed")
    rss = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20
    return wall, usage.ru_utime + usage.ru_stime, rss


def ratio_to_floor(pairs: int, env: dict[str, str]) -> None:
    run_once(FLOOR, REPO, env)  # warm the file cache
    run_once(RESNET50_CHECK, REPO, env)
    check, floor = [], []
    for _ in range(pairs):
        check.append(run_once(RESNET50_CHECK, REPO, env))
        floor.append(run_once(FLOOR, REPO, env))
    wall = statistics.median(c[0] / f[0] for c, f in zip(check, floor))
    cpu = statistics.median(c[1] / f[1] for c, f in zip(check, floor))
    print(
        f"check ResNet-50 3x224x224 vs the floor (import torch + build + fx trace), "
        f"{pairs} pairs in turn:"
    )
    for label, runs in (("check", check), ("floor", floor)):
        print(
            f"  {label:6} median wall {statistics.median(r[0] for r in runs):6.2f} s, "
            f"CPU {statistics.median(r[1] for r in runs):6.2f} s"
        )
    print(f"  ratio  median of pairs: wall {wall:.2f}x, CPU {cpu:.2f}x")


def table(runs: int, env: dict[str, str]) -> None:
    print(f"{'command':40} {'median s':>9} {'min..max s':>13} {'peak MiB':>9}")
    for label, argv in COMMANDS:
        walls, peaks = [], []
        for i in range(runs + 1):  # the first run warms the file cache
            if argv is None:
                work = Path(tempfile.mkdtemp())
                shutil.copy(REPO / "fixtures/sick/alexnet.py", work / "alexnet.py")
                cmd, cwd = (
                    [
                        PY,
                        "-m",
                        "netdoctor",
                        "check",
                        "alexnet.py:AlexNet",
                        "--input-shape",
                        "1,224,224",
                        "--fix",
                    ],
                    work,
                )
            else:
                cmd, cwd = argv, REPO
            wall, _, peak = run_once(cmd, cwd, env)
            if argv is None:
                shutil.rmtree(cwd)
            if i:
                walls.append(wall)
                peaks.append(peak)
        print(
            f"{label:40} {statistics.median(walls):9.2f} "
            f"{min(walls):6.2f}..{max(walls):<6.2f} {max(peaks):9.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command in the table")
    parser.add_argument("--pairs", type=int, default=9, help="check/floor pairs for the ratio")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every process")
    parser.add_argument("--only", choices=["ratio", "table"])
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    subprocess.run(
        [PY, "-m", "compileall", "-q", str(REPO / "src" / "netdoctor")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"threads: {args.threads or 'torch default'}")
    if args.only != "table":
        ratio_to_floor(args.pairs, env)
    if args.only != "ratio":
        table(args.runs, env)


if __name__ == "__main__":
    main()
