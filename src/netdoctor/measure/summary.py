"""Summaries of a measured training run (`TrainingRun`): what the runtime rules, the verified
fix's symptoms and the reporters read off the per-step traces. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from netdoctor.measure.record import ParamTrace, TrainingRun


def finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean(values: Iterable[float | None]) -> float | None:
    v = finite(values)
    return sum(v) / len(v) if v else None


def median(values: Iterable[float | None]) -> float | None:
    v = sorted(finite(values))
    if not v:
        return None
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def layer_grad(p: ParamTrace) -> float | None:
    """A weight's typical gradient norm over the run: the mean over steps that had one."""
    return mean(p.grad_norm)


def gradient_flow(run: TrainingRun) -> list[dict[str, Any]]:
    """Rows for the report's gradient-flow table: weight layers in execution order."""
    rows = []
    for p in run.weight_layers():
        rows.append(
            {
                "name": p.module if p.name.endswith(".weight") else p.name,
                "parameter": p.name,
                "grad_norm": layer_grad(p),
                "grad_norm_max": max(finite(p.grad_norm), default=None),
                "weight_norm": p.weight_norm[0] if p.weight_norm else None,
                "update_ratio": median(p.update_ratio),
            }
        )
    return rows


# torch's lookup tables: a lookup's gradient reaches only the rows of the tokens in the batch,
# so its norm follows how much of the vocabulary a batch touches, not how deep the table sits
LOOKUP_TABLES = ("Embedding", "EmbeddingBag")


def relative_grad(p: ParamTrace) -> float | None:
    """A weight's typical gradient norm over its norm at the start (what a plain SGD step moves
    it by, per unit lr): comparable across layers of very different sizes, where raw norms
    are not (a 33k-word decoder's gradient against a 200-wide LSTM layer's). The raw norm when
    the weight's norm is unknown."""
    v = layer_grad(p)
    w = p.weight_norm[0] if p.weight_norm else None
    return v / w if v is not None and w else v


def gradient_ends(run: TrainingRun) -> tuple[ParamTrace, float, ParamTrace, float] | None:
    """(first, its relative gradient, last, its relative gradient) over the weight layers, in
    execution order, that received a nonzero gradient (`relative_grad`); None with fewer
    than two. Layers whose gradient is
    exactly zero are dead (ND404) or starved (ND410), not vanishing. A lookup table
    (`LOOKUP_TABLES`) is no end: its gradient's norm is a property of the batch's tokens."""
    rows = [
        (p, relative_grad(p))
        for p in run.weight_layers()
        if run.module_types.get(p.module) not in LOOKUP_TABLES
    ]
    live = [(p, v) for p, v in rows if v is not None and v > 0]
    if len(live) < 2:
        return None
    (first, g_first), (last, g_last) = live[0], live[-1]
    return first, g_first, last, g_last


def total_grad_norms(run: TrainingRun) -> list[float]:
    """The total gradient norm over the weight layers, per step (NaN where none had one)."""
    layers = run.weight_layers()
    totals = []
    for i in range(run.steps_run):
        sq = [
            p.grad_norm[i] ** 2
            for p in layers
            if i < len(p.grad_norm) and not math.isnan(p.grad_norm[i])
        ]
        totals.append(math.sqrt(sum(sq)) if sq else float("nan"))
    return totals


def cut_short(run: TrainingRun) -> int | None:
    """The steps a run was meant to take when a time budget cut it short, else None: the
    loss-trend rules then cannot say the model does not learn, only that it had not yet."""
    requested = getattr(run.config, "requested_steps", None)
    return requested if requested and requested > run.steps_run else None


def batch_cut(run: TrainingRun) -> tuple[int, int] | None:
    """(samples per step, the batch size asked for) when a time budget made the probe train on
    fewer samples per step; gradients of a few samples are noisier, so update and gradient
    sizes are not the ones the asked-for batch would see."""
    limit = getattr(run.config, "batch_limit", None)
    batch = getattr(run.config, "batch_size", None)
    return (limit, batch) if limit and batch and limit < batch else None


def early_steps(n: int) -> int:
    """How many of the first steps count as "early": 10%, at least 3."""
    return min(n, max(3, n // 10))


def loss_window(run: TrainingRun) -> tuple[float | None, float | None, int]:
    """(mean loss of the first 10% of steps, of the last 10%, window length)."""
    losses = run.loss
    k = max(1, len(losses) // 10)
    return mean(losses[:k]), mean(losses[-k:]), k


def able_to_learn(run: TrainingRun) -> tuple[bool, float | None]:
    """(the overfit-one-batch check passed, median over weight layers of the median
    update/weight ratio): a slow probe of a model that can learn is not a model problem."""
    of = run.overfit or {}
    first, best = of.get("loss_first"), of.get("loss_min")
    can = bool(first and best is not None and math.isfinite(best) and best <= 0.2 * first)
    return can, median([median(p.update_ratio) for p in run.weight_layers()])


def learned_well(run: TrainingRun | None) -> dict[str, Any] | None:
    """The run's numbers when it clearly learned -- the loss at least halved (mean of the last
    10% of steps against the first 10%) and, for classification, the accuracy at least halfway
    from chance to 1 -- else None."""
    if run is None or run.steps_run < 10 or run.stopped or cut_short(run):
        return None
    first, last, k = loss_window(run)
    if first is None or last is None or not last <= 0.5 * first:
        return None
    accs = [a for a in run.accuracy[-k:] if a is not None]
    acc = sum(accs) / len(accs) if accs else None
    chance = run.chance
    if acc is not None and chance is not None and acc < chance + 0.5 * (1 - chance):
        return None
    return {
        "loss_first": first,
        "loss_last": last,
        "accuracy": acc,
        "chance": chance,
        "steps": run.steps_run,
    }
