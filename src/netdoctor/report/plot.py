"""The gradient-flow plot (`netdoctor probe --plot FILE.png`): formatting only."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from netdoctor.errors import UserError

if TYPE_CHECKING:
    from netdoctor.measure.record import TrainingRun


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        ) from None


def write_plot(run: TrainingRun | None, path: str, title: str) -> None:
    """The classic gradient-flow plot (mean and max gradient norm per layer, input -> output)
    next to the loss curve."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from netdoctor.measure.summary import finite, gradient_flow

    rows = gradient_flow(run) if run is not None else []
    fig, (ax, lx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    names = [r["name"] for r in rows]
    means = [r["grad_norm"] or 0.0 for r in rows]
    maxes = [r["grad_norm_max"] or 0.0 for r in rows]
    xs = range(len(rows))
    ax.bar(xs, maxes, alpha=0.35, lw=1, color="c", label="max over steps")
    ax.bar(xs, means, alpha=0.8, lw=1, color="b", label="mean over steps")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=8)
    if any(v > 0 for v in maxes):
        ax.set_yscale("log")
    ax.set_xlabel("layer (input -> output)")
    ax.set_ylabel("gradient norm")
    ax.set_title("Gradient flow")
    ax.legend()
    losses = list(run.loss) if run is not None else []
    lx.plot(range(1, len(losses) + 1), [v if math.isfinite(v) else float("nan") for v in losses])
    shown = finite(losses)
    if shown and min(shown) > 0 and max(shown) / min(shown) > 100:
        lx.set_yscale("log")
    lx.set_xlabel("step")
    lx.set_ylabel("loss")
    lx.set_title("Loss")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
