"""What `netdoctor run` costs a user's training, side by side with the bare script.

    python benchmarks/run_overhead.py                        # both models
    python benchmarks/run_overhead.py --rounds 3 --steps 40 --models resnet18
    python benchmarks/run_overhead.py --models transformer-fp16,transformer-bf16  # AMP
    python benchmarks/run_overhead.py --device cuda --models all

Two realistic training scripts in `benchmarks/loops/` -- a standard ResNet-18 (11.2M
parameters, 3x32x32 images, batch 32, SGD + momentum + weight decay, cosine schedule) and a
small transformer encoder classifier (4 pre-norm layers, d_model 256, sequence 128 with a key
padding mask, batch 8, AdamW, warm-up + cosine, gradient clipping) -- and the same transformer
in mixed precision (`transformer-fp16`: autocast float16 with a GradScaler, unscale_ before the
clipping; `transformer-bf16`: autocast bfloat16, no scaler) -- each run as

  * bare      `python SCRIPT.py`
  * default   `python -m netdoctor run SCRIPT.py` (the default schedule: deep measurements on
              steps 1-4, 8, 16, 32, then every 50)
  * tensorboard  `python -m netdoctor run --tensorboard DIR SCRIPT.py` (the default schedule,
              with the TensorBoard export on; left out when the tensorboard package is missing)
  * every 1   `python -m netdoctor run --every 1 SCRIPT.py` (every step deep)

The scripts time each optimizer step themselves (zero_grad .. step .. loss.item(), wall and CPU
time), so the cost per step is told apart from the process's start and end.

Step time, in lock-step: the three processes run at once and take turns step by step (a token
passed round a ring of pipes, waited for outside the timing), so the k-th steps of the bare
script and of its netdoctor runs are neighbours in time and load on a shared machine falls on
them alike. Per round, the median over steps (the first --warmup steps and the last one left
out) of the paired ratio mode/bare of the k-th step's time; the overhead is the median over
rounds. Deep steps are in the timed range, but a median sees the typical step.

Whole process, one after another (rounds rotate the order): wall time of each process; what is
not steps (interpreter and torch import, building the model and data, and for netdoctor its
import, attaching and the report) is the start/report cost, given as the difference to the bare
script's, plus the one-off static checks netdoctor runs inside the first step (from its report).
Each netdoctor run also states its own cost ("netdoctor's measurements took X s ..."); that is
set against the measured extra step time. Seeds are fixed in the scripts, and every process
gets the same OMP/MKL thread count (--threads). `--device cuda` trains on the GPU (each step
ends in `loss.item()`, a sync, so its time is the GPU's); the device, its name and torch's
version head the output. On a CPU, float16 autocast runs about 10x slower than float32 (no
native half kernels), bfloat16 faster.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOOPS = REPO / "benchmarks" / "loops"
TRANSFORMER = "Transformer encoder, 4 x d256, seq 128, batch 8, AdamW"
MODELS = {  # name -> (label, script, its options)
    "resnet18": (
        "ResNet-18 (11.2M params), 3x32x32, batch 32, SGD",
        LOOPS / "resnet18.py",
        [],
    ),
    "transformer": (TRANSFORMER, LOOPS / "transformer.py", []),
    "transformer-fp16": (
        TRANSFORMER + ", fp16 autocast + GradScaler",
        LOOPS / "transformer.py",
        ["--precision", "fp16"],
    ),
    "transformer-bf16": (
        TRANSFORMER + ", bf16 autocast",
        LOOPS / "transformer.py",
        ["--precision", "bf16"],
    ),
}
DEFAULT_MODELS = "resnet18,transformer"
MODES = {  # name -> netdoctor run options (None: the bare script; {dir}: a fresh folder)
    "bare": None,
    "default": [],
    "tensorboard": ["--tensorboard", "{dir}"],
    "every1": ["--every", "1"],
}
WATCHED = [m for m in MODES if MODES[m] is not None]
NOTE = re.compile(
    r"measurements took ([\d.]+) s of the ([\d.]+) s the training ran.*"
    r"static checks ([\d.]+) s once"
)


@dataclass(frozen=True)
class Setup:
    """What every process of a run shares."""

    steps: int
    threads: int
    device: str
    workdir: Path


def start(
    name: str, mode: str, setup: Setup, turn: tuple[int, int] | None = None
) -> tuple[subprocess.Popen, list[str], float]:
    _, script, script_options = MODELS[name]
    timings = setup.workdir / f"{name}-{mode}.json"
    report = setup.workdir / f"{name}-{mode}-report.json"
    options = MODES[mode]
    cmd = [sys.executable]
    if options is not None:
        folder = tempfile.mkdtemp(prefix=f"{name}-{mode}-", dir=setup.workdir)
        options = [o.format(dir=folder) for o in options]
        cmd += ["-m", "netdoctor", "run", "--format", "json", "-o", str(report), *options]
    cmd += [str(script), "--steps", str(setup.steps), "--timings", str(timings)]
    cmd += [*script_options, "--device", setup.device]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(setup.threads),
        MKL_NUM_THREADS=str(setup.threads),
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    env.pop("BENCH_TURN_FDS", None)
    if turn is not None:
        env["BENCH_TURN_FDS"] = f"{turn[0]},{turn[1]}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=turn or (),
    )
    return proc, cmd, t0


def finish(
    proc: subprocess.Popen, cmd: list[str], t0: float, name: str, mode: str, workdir: Path
) -> dict:
    """Wait for one process; its step timings, wall time and (under netdoctor) its report."""
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    out = json.loads((workdir / f"{name}-{mode}.json").read_text())
    out["process"] = wall
    if MODES[mode] is not None:
        data = json.loads((workdir / f"{name}-{mode}-report.json").read_text())
        out["findings"] = [f["rule"] for f in data["findings"]]
        for note in data["notes"]:
            m = NOTE.search(note)
            if m:
                out["hooks"], out["static"] = float(m.group(1)), float(m.group(3))
    return out


def lockstep(name: str, order: list[str], setup: Setup) -> dict[str, dict]:
    """Run the modes at once, taking turns step by step (process i waits on pipe i and hands
    on to pipe i+1)."""
    pipes = [os.pipe() for _ in order]
    started = []
    try:
        for i, mode in enumerate(order):
            turn = (pipes[i][0], pipes[(i + 1) % len(order)][1])
            started.append((mode, start(name, mode, setup, turn)))
    finally:
        os.write(pipes[0][1], b".")  # the first turn
        for r, w in pipes:  # the children hold their own ends: a dead one breaks the ring
            os.close(r)
            os.close(w)
    results, failure = {}, None
    for mode, (proc, cmd, t0) in started:
        try:
            results[mode] = finish(proc, cmd, t0, name, mode, setup.workdir)
        except SystemExit as e:
            failure = failure or e
            for _, (other, _, _) in started:
                if other.poll() is None:
                    other.kill()
    if failure:
        raise failure
    return results


def sequential(name: str, order: list[str], setup: Setup) -> dict[str, dict]:
    results = {}
    for mode in order:
        proc, cmd, t0 = start(name, mode, setup)
        results[mode] = finish(proc, cmd, t0, name, mode, setup.workdir)
    return results


def describe(device: str) -> str:
    """The device the steps ran on, and torch's version (asked of a child process: this one
    never imports torch, so it holds no GPU)."""
    code = (
        "import sys, torch\n"
        "d = sys.argv[1]\n"
        "name = torch.cuda.get_device_name(torch.device(d)) if d.startswith('cuda') else "
        "'CPU'\n"
        "print(f'{d} ({name}), torch {torch.__version__}')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, device], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"device {device!r} is not usable:\n{result.stderr[-2000:]}")
    return result.stdout.strip()


def pct(x: float) -> str:
    return f"{100 * (x - 1):+.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help="comma separated, or all: " + ", ".join(MODELS),
    )
    ap.add_argument("--device", default="cpu", help="where the scripts train: cpu, cuda")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=8, help="first steps left out of the timing")
    ap.add_argument("--rounds", type=int, default=3, help="lock-step rounds per model")
    ap.add_argument(
        "--whole",
        type=int,
        default=2,
        help="rounds of whole processes one after another, per model",
    )
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads for every run")
    ap.add_argument("--json", help="also write the raw timings here")
    ap.add_argument(
        "--load",
        help="print the tables from a --json file of an earlier run (with "
        "the same --steps and --warmup) instead of running",
    )
    args = ap.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if names == ["all"]:
        names = list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    if args.steps < args.warmup + 3:
        raise SystemExit("--steps must leave at least 3 steps after --warmup")

    modes = list(MODES)
    if importlib.util.find_spec("tensorboard") is None:
        print("tensorboard is not installed: the export-on runs are left out", file=sys.stderr)
        modes.remove("tensorboard")
    watched = [m for m in WATCHED if m in modes]
    timed = slice(args.warmup, args.steps - 1)
    raw: dict[str, dict[str, list]] = {n: {"lockstep": [], "whole": []} for n in names}

    def log(kind: str, r: int, name: str, res: dict[str, dict]) -> None:
        text = "  ".join(
            f"{m} {1000 * statistics.median(res[m]['wall'][timed]):.0f} ms"
            f" ({res[m]['process']:.0f} s)"
            for m in modes
        )
        print(f"{kind} {r + 1} {name}: {text}", file=sys.stderr, flush=True)

    if args.load:
        raw = json.loads(Path(args.load).read_text())
        names = list(raw)
        modes = [m for m in MODES if m in raw[names[0]]["lockstep"][0]]
        watched = [m for m in WATCHED if m in modes]
        args.rounds = len(raw[names[0]]["lockstep"])
        args.whole = len(raw[names[0]]["whole"])
    device = "from " + args.load if args.load else describe(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(args.steps, args.threads, args.device, Path(tmp))
        for r in range(0 if args.load else max(args.rounds, args.whole)):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for name in names:
                if r < args.rounds:
                    raw[name]["lockstep"].append(lockstep(name, order, setup))
                    log("lock-step", r, name, raw[name]["lockstep"][-1])
                if r < args.whole:
                    raw[name]["whole"].append(sequential(name, order, setup))
                    log("whole", r, name, raw[name]["whole"][-1])
    if args.json:
        Path(args.json).write_text(json.dumps(raw))

    print(f"\ndevice: {device}")
    print(
        f"{args.steps} steps per run, steps {args.warmup + 1}-{args.steps - 1} timed, "
        f"{args.threads} thread(s) per process; {args.rounds} lock-step round(s), "
        f"{args.whole} round(s) of whole processes\n"
    )
    titles = {"default": "default", "tensorboard": "default + TensorBoard", "every1": "every 1"}
    print(
        "| model | bare ms/step | "
        + " | ".join(f"{titles[m]} ms/step" for m in watched)
        + " | whole process: "
        + " / ".join(["bare"] + [titles[m] for m in watched])
        + " | start+report (+ static checks) |"
    )
    print("|---" * (len(watched) + 4) + "|")
    details = []
    for name in names:
        rounds = raw[name]["lockstep"]

        def round_ratios(mode: str, key: str = "wall", rounds: list = rounds) -> list[float]:
            return [
                statistics.median(
                    m / b for m, b in zip(res[mode][key][timed], res["bare"][key][timed])
                )
                for res in rounds
            ]

        def step_ratio(mode: str, key: str = "wall") -> float:
            return statistics.median(round_ratios(mode, key))

        def step_ms(mode: str, rounds: list = rounds) -> float:
            return 1000 * statistics.median(
                statistics.median(res[mode]["wall"][timed]) for res in rounds
            )

        whole = raw[name]["whole"]
        cells = []
        if whole:
            walls = {m: statistics.median(res[m]["process"] for res in whole) for m in modes}
            cells.append(" / ".join(f"{walls[m]:.1f} s" for m in modes))
            fixed = {
                m: statistics.median(
                    (res[m]["process"] - sum(res[m]["wall"]))
                    - (res["bare"]["process"] - sum(res["bare"]["wall"]))
                    for res in whole
                )
                for m in watched
            }
            static = statistics.median(res["default"].get("static", 0.0) for res in whole)
            cells.append(f"{round(fixed['default'], 1) or 0.0:.1f} s (+ {static:.1f} s)")
            outside = {
                m: statistics.median(res[m]["process"] - sum(res[m]["wall"]) for res in whole)
                for m in modes
            }
            details.append(
                f"{name}: outside the steps (start, model and data, report) the "
                "processes took "
                + " / ".join(f"{outside[m]:.1f} s" for m in modes)
                + " ("
                + " / ".join(["bare"] + [titles[m] for m in watched])
                + ")"
            )
        else:
            cells += ["-", "-"]
        steps_cells = [f"{step_ms(m):.0f} ({pct(step_ratio(m))})" for m in watched]
        print(
            f"| {MODELS[name][0]} | {step_ms('bare'):.0f} | {' | '.join(steps_cells)} | "
            f"{' | '.join(cells)} |"
        )
        if "tensorboard" in watched:
            # the export's own cost: export on against export off, step by step
            export = [
                statistics.median(
                    t / d
                    for t, d in zip(
                        res["tensorboard"]["wall"][timed], res["default"]["wall"][timed]
                    )
                )
                for res in rounds
            ]
            details.append(
                f"{name}, TensorBoard export: step time with the export on / off (the default "
                f"schedule) {pct(statistics.median(export))}, per round "
                + ", ".join(pct(r) for r in export)
            )
        for mode in watched:
            # the report's own account of its time in the steps, against the measured extra
            # (step 1 left out of the sum: in lock-step it overlaps the other processes' start)
            said = statistics.median(res[mode]["hooks"] for res in rounds)
            extra = statistics.median(
                sum(res[mode]["wall"][1:-1]) - sum(res["bare"]["wall"][1:-1]) for res in rounds
            )
            found = sorted({f for res in rounds for f in res[mode]["findings"]})
            details.append(
                f"{name}, {mode}: per round "
                + ", ".join(pct(r) for r in round_ratios(mode))
                + f"; CPU time per step {pct(step_ratio(mode, 'cpu'))}; steps "
                f"2-{args.steps - 1} took {extra:.2f} s longer than the bare script's, and "
                f"netdoctor's report says its measurements took {said:.2f} s (all steps); "
                f"findings: {', '.join(found) or 'none'}"
            )
    print()
    for line in details:
        print(f"- {line}")


if __name__ == "__main__":
    main()
