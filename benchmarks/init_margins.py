"""How far the weight-dependent rules' statistics sit from their thresholds, over random inits.

    python benchmarks/init_margins.py               # seeds 0..9
    python benchmarks/init_margins.py --seeds 20

For every fixture model and seed (the model built and measured under the seed, as
`netdoctor check --seed` does), the statistics ND201 and ND204 compare with their thresholds:

  * ND201 shrink -- the largest product of shrink factors along a path of unnormalized layers
                    that holds a hidden layer 3x or more below its fan-in scale (threshold
                    max-shrink = 24); 1 when no hidden layer is that far below
  * ND201 above  -- the largest std / fan-in scale of a judged hidden layer (threshold factor = 3)
  * ND204 low/high -- the smallest and largest signal RMS, relative to the input's, along the
                    hidden layers that carry the signal at init (threshold: 1e5 either way)

and prints each statistic's range over the seeds, the verdict (the same for every seed, or
"FLIPS"), and the margin: the factor between the threshold and the seed closest to it. The rule
docs (rules/ND201.md, rules/ND204.md) quote these numbers.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from netdoctor.graph.build import build_graph  # noqa: E402
from netdoctor.loading.seeding import seeded  # noqa: E402
from netdoctor.loading.shapes import InputSpec  # noqa: E402
from netdoctor.loading.target import load  # noqa: E402
from netdoctor.rules.params.nd201_init_scale import init_scale_outliers  # noqa: E402
from netdoctor.rules.params.nd204_signal_collapse import signal_ratios  # noqa: E402

FACTOR, MAX_SHRINK, MAX_RATIO = 3.0, 24.0, 1e5
MNIST = InputSpec((1, 28, 28), "float32", None)
SICK = {"alexnet.py": InputSpec((1, 224, 224), "float32", None)}


def targets() -> list[tuple[str, InputSpec | None]]:
    """(target, input) for every model class of the corpus (healthy: input inferred, as a folder
    check does; sick: 1x28x28 as the tests use, AlexNet 1x224x224)."""
    out = []
    for folder in ("healthy", "sick"):
        for path in sorted((REPO / "fixtures" / folder).glob("*.py")):
            result = load(str(path))
            for loaded in result.models:
                spec = None if folder == "healthy" else SICK.get(path.name, MNIST)
                out.append(
                    (f"fixtures/{folder}/{path.name}:{loaded.target.rsplit(':', 1)[1]}", spec)
                )
    return out


def statistics(target: str, spec: InputSpec | None, seed: int) -> dict[str, float] | None:
    loaded = load(str(REPO / target), seed=seed).models[0]
    with seeded(seed):
        graph = build_graph(loaded, spec).graph
    if graph is None:
        return None
    _, shrink, above = init_scale_outliers(graph, FACTOR, MAX_SHRINK)
    _, chain, ratios = signal_ratios(graph)
    low, high = (min(ratios), max(ratios)) if len(chain) >= 2 else (0.0, 0.0)
    return {"shrink": shrink, "above": above, "low": low, "high": high}


def margin(values: list[float], threshold: float) -> tuple[str, float]:
    """Verdict and the factor between the threshold and the value closest to it (> 1)."""
    over = [v > threshold for v in values]
    verdict = "fires" if all(over) else "clean" if not any(over) else "FLIPS"
    closest = min(values, key=lambda v: abs(math.log(v / threshold)))
    return verdict, max(closest / threshold, threshold / closest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("-k", default="", help="only targets containing this text")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    header = (
        f"{'model':58} {'ND201 shrink (max 24)':>26} {'ND201 above (max 3)':>23} "
        f"{'ND204 low..high (1e5 either way)':>40}"
    )
    print(header)
    print("-" * len(header))
    for target, spec in targets():
        if args.k not in target:
            continue
        stats = [statistics(target, spec, s) for s in range(args.seeds)]
        if any(s is None for s in stats):
            print(f"{target:58} (no graph)")
            continue
        cells = []
        for key, threshold in (("shrink", MAX_SHRINK), ("above", FACTOR)):
            values = [s[key] for s in stats]
            if not all(values):  # no hidden layer to judge
                cells.append("-")
                continue
            verdict, m = margin(values, threshold)
            cells.append(f"{min(values):6.3g}..{max(values):<6.3g} {verdict:5} x{m:<5.3g}")
        lows, highs = [s["low"] for s in stats], [s["high"] for s in stats]
        if not all(lows):  # fewer than two hidden layers to compare: ND204 stays silent
            cells.append("-")
        else:
            verdict, m = margin([max(1 / lo, hi) for lo, hi in zip(lows, highs)], MAX_RATIO)
            cells.append(f"{min(lows):8.2g}..{max(highs):<8.2g} {verdict:5} x{m:<8.3g}")
        print(f"{target:58} {cells[0]:>26} {cells[1]:>23} {cells[2]:>40}")


if __name__ == "__main__":
    main()
