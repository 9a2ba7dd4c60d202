"""How long `netdoctor check` takes as a pre-commit hook or CI gate: whole fresh processes, as a
user runs them (Python start, torch import, model build, trace, rules, report).

    python benchmarks/check_speed.py              # 5 runs per command, medians
    python benchmarks/check_speed.py --runs 9

Prints, per command, the median and min..max wall seconds and the peak resident memory of the
process. The first command (`netdoctor rules`) shows the floor without torch; the `python -c
"import torch"` row shows how much of a check is the torch import alone.
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

COMMANDS = [
    ("netdoctor rules", [PY, "-m", "netdoctor", "rules"]),
    ("python -c 'import torch'", [PY, "-c", "import torch"]),
    ("check healthy ResNet (3x32x32)",
     [PY, "-m", "netdoctor", "check", "fixtures/healthy/resnet.py:ResNet", "--input-shape",
      "3,32,32"]),
    ("check sick AlexNet (1x224x224)",
     [PY, "-m", "netdoctor", "check", "fixtures/sick/alexnet.py:AlexNet", "--input-shape",
      "1,224,224"]),
    ("check the healthy folder (19 models)",
     [PY, "-m", "netdoctor", "check", "fixtures/healthy"]),
    ("check --fix on a copy of AlexNet", None),  # filled in main(): needs a fresh copy per run
]


def run_once(argv: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one fresh process."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed")
    rss = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20
    return wall, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    print(f"{'command':40} {'median s':>9} {'min..max s':>13} {'peak MiB':>9}")
    for label, argv in COMMANDS:
        walls, peaks = [], []
        for i in range(args.runs + 1):  # the first run warms the file cache
            if argv is None:
                work = Path(tempfile.mkdtemp())
                shutil.copy(REPO / "fixtures/sick/alexnet.py", work / "alexnet.py")
                cmd, cwd = [PY, "-m", "netdoctor", "check", "alexnet.py:AlexNet",
                            "--input-shape", "1,224,224", "--fix"], work
            else:
                cmd, cwd = argv, REPO
            wall, peak = run_once(cmd, cwd)
            if argv is None:
                shutil.rmtree(cwd)
            if i:
                walls.append(wall)
                peaks.append(peak)
        print(f"{label:40} {statistics.median(walls):9.2f} "
              f"{min(walls):6.2f}..{max(walls):<6.2f} {max(peaks):9.0f}")


if __name__ == "__main__":
    main()
