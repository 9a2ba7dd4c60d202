"""What the probe's instrumentation costs, and how long a default probe takes.

    python benchmarks/probe_overhead.py                 # CPU (and CUDA too when present)
    python benchmarks/probe_overhead.py --device cpu --steps 60 --repeat 3
    python benchmarks/probe_overhead.py --device cuda --precision fp16 --skip-cli

Table 1, per model: milliseconds per training step of
  * bare         -- a plain PyTorch loop: zero_grad, forward, loss, backward, step, loss.item()
  * probe/plain  -- netdoctor's probe loop without instrumentation (loss and accuracy only)
  * probe/instr  -- the instrumented probe step: module hooks + TorchFunctionMode activation
                    statistics, per-parameter gradient and weight norms, update/weight ratios
and the ratio instr/bare. Best of --repeat runs (the machine may be shared). With `--precision
fp16|bf16` all three run the AMP recipe (autocast around forward and loss; fp16 with a
GradScaler: scale, backward, unscale_, step, update), and probe/instr adds each module's max
|output| (its float16 headroom).

Table 2: wall time of `netdoctor probe` with default settings (100 steps, batch 64, SGD) in a
fresh process (torch import, static check, data rules, probe, overfit-one-batch, verified fix),
on small FashionMNIST-layout data written by tests/datagen.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from netdoctor.loading.target import load  # noqa: E402
from netdoctor.probe.engine import ProbeConfig, run_probe  # noqa: E402

MODELS = [  # (label, target, kwargs, input shape, steps factor)
    ("MLP 784-300-10", "fixtures/sick/mlp.py:MLP", {}, (1, 28, 28), 1.0),
    ("LeNet-5 (ReLU)", "fixtures/healthy/lenet_relu.py:LeNet", {}, (1, 28, 28), 1.0),
    (
        "BN CNN",
        "fixtures/sick/bn_momentum.py:KerasMomentumNet",
        {"momentum": 0.1},
        (1, 28, 28),
        1.0,
    ),
    ("ResNet-18 (narrow)", "fixtures/healthy/resnet.py:ResNet", {}, (3, 32, 32), 0.25),
    ("ViT (4 blocks)", "fixtures/healthy/vit.py:ViT", {}, (3, 32, 32), 0.25),
]


class FixedBatches:
    """A DataSource stand-in serving precomputed batches (no data cost in the timings)."""

    def __init__(self, shape, batch_size, n=8, classes=10):
        g = torch.Generator().manual_seed(0)
        self.data = [
            (
                torch.randn((batch_size, *shape), generator=g),
                torch.randint(0, classes, (batch_size,), generator=g),
            )
            for _ in range(n)
        ]

    def batches(self, n=None):
        for i in range(len(self.data) if n is None else n):
            yield self.data[i % len(self.data)]


PRECISION = "fp32"  # --precision


def bare_loop(model, source, steps, device) -> float:
    net = __import__("copy").deepcopy(model).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    batches = [(x.to(device), y.to(device)) for x, y in source.data]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(PRECISION)
    scaler = torch.amp.GradScaler(device.type) if PRECISION == "fp16" else None
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def probe_loop(model, source, steps, device, instrument) -> float:
    cfg = ProbeConfig(steps=steps, device=device.type, overfit_steps=0, precision=PRECISION)
    run = run_probe(model, source, cfg, instrument=instrument, overfit=False, train_eval=False)
    return run.timings["train_s"] / max(1, run.steps_run)


def table1(device: torch.device, steps: int, repeat: int, batch_size: int) -> None:
    print(
        f"\nPer-step cost on {device.type}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f" ({torch.get_num_threads()} threads)"
        )
        + f", batch {batch_size}, {PRECISION}, best of {repeat}:"
    )
    head = (
        f"{'model':22s} {'params':>9s} {'steps':>5s} {'bare ms':>9s} {'plain ms':>9s} "
        f"{'instr ms':>9s} {'instr/bare':>10s}"
    )
    print(head)
    print("-" * len(head))
    for label, target, kwargs, shape, factor in MODELS:
        torch.manual_seed(0)
        model = load(str(REPO / target), kwargs).models[0].model
        n = max(10, int(steps * factor))
        source = FixedBatches(shape, batch_size)
        probe_loop(model, source, 3, device, True)  # warm-up (lazy imports, kernels)
        bare_loop(model, source, 3, device)
        bare = min(bare_loop(model, source, n, device) for _ in range(repeat))
        plain = min(probe_loop(model, source, n, device, False) for _ in range(repeat))
        instr = min(probe_loop(model, source, n, device, True) for _ in range(repeat))
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{label:22s} {params:9d} {n:5d} {1e3 * bare:9.2f} {1e3 * plain:9.2f} "
            f"{1e3 * instr:9.2f} {instr / bare:10.2f}"
        )


def table2(device: str, repeat: int) -> None:
    from datagen import write_idx_dataset

    with tempfile.TemporaryDirectory() as tmp:
        write_idx_dataset(Path(tmp), "FashionMNIST", n_train=4096, n_test=64)
        runs = [
            ("LeNet-5 (ReLU), healthy", "fixtures/healthy/lenet_relu.py:LeNet", []),
            ("LeNet-5 (sigmoid), + verify", "fixtures/sick/lenet_sigmoid.py:LeNet", []),
            (
                "MLP raw pixels lr 0.5, + verify",
                "fixtures/sick/mlp.py:MLP",
                ["--raw", "--lr", "0.5", "--momentum", "0"],
            ),
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), NO_COLOR="1")
        print(
            f"\nDefault `netdoctor probe` wall time (fresh process, --device {device}, "
            f"best of {repeat}):"
        )
        print(f"{'run':34s} {'wall s':>7s}")
        print("-" * 42)
        for label, target, extra in runs:
            best = None
            for _ in range(repeat):
                t0 = time.perf_counter()
                proc = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "netdoctor",
                        "probe",
                        target,
                        "--data",
                        "fashionmnist",
                        "--data-dir",
                        tmp,
                        "--device",
                        device,
                        "--format",
                        "json",
                        *extra,
                    ],
                    cwd=REPO,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                wall = time.perf_counter() - t0
                if proc.returncode not in (0, 1):
                    print(f"{label:34s} failed: {proc.stderr.strip()[:200]}")
                    break
                best = wall if best is None else min(best, wall)
            if best is not None:
                print(f"{label:34s} {best:7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: CPU, and CUDA as well when present",
    )
    ap.add_argument("--steps", type=int, default=60, help="steps per timing (small models)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-cli", action="store_true", help="skip table 2")
    ap.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="table 1's loops under autocast (fp16 with a GradScaler)",
    )
    args = ap.parse_args()
    global PRECISION
    PRECISION = args.precision
    devices = (
        ["cpu", "cuda"]
        if args.device == "auto" and torch.cuda.is_available()
        else (["cpu"] if args.device == "auto" else [args.device])
    )
    for d in devices:
        table1(torch.device(d), args.steps, args.repeat, args.batch_size)
    if not args.skip_cli:
        for d in devices:
            table2(d, args.repeat)


if __name__ == "__main__":
    main()
