"""The measured symptom behind a finding, read off a TrainingRun, so a verified fix can show the
mechanism before and after it (not only the loss): the first/last gradient ratio for vanishing
gradients, the dead-unit fraction for dead ReLUs, the update ratio, the step of the first
non-finite value, the train/eval gap...

`symptom_for(top, findings)` picks the measurement for the report's top finding: its own when
it is a runtime finding, else that of the first runtime finding it causes, else the runtime
consequence its rule is known for (a sigmoid chain -> the gradient ratio). Each `Symptom`
knows the rule's default threshold, so "the symptom is gone" means the re-run would no longer
trigger the rule. The measurements reuse the runtime rules' own helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netdoctor.findings import Finding
from netdoctor.measure.record import TrainingRun
from netdoctor.rules.runtime import (
    early_steps,
    finite,
    gradient_ends,
    mean,
    median,
    total_grad_norms,
)


@dataclass(frozen=True)
class Symptom:
    rule: str  # the runtime rule that measures it
    name: str  # what it is, for people
    unit: str  # "ratio" | "fraction" | "step" | "count" | "loss"
    better: str  # "higher" | "lower"
    threshold: float | None  # the rule fires beyond it (its default option)
    measure: Callable[[TrainingRun], float | None]
    needs_train_eval: bool = False

    def value(self, run: TrainingRun) -> float | None:
        try:
            return self.measure(run)
        except (ValueError, ZeroDivisionError, IndexError, KeyError, TypeError):
            return None

    def healthy(self, value: float | None, steps: int) -> bool | None:
        """Whether `value` is on the rule's healthy side (None: cannot tell)."""
        if self.unit == "step":
            return value is None  # no non-finite value in the run
        if value is None or self.threshold is None or not math.isfinite(value):
            return None if value is None else False
        return value >= self.threshold if self.better == "higher" else value <= self.threshold

    def describe(self, value: float | None, steps: int) -> str:
        if self.unit == "step":
            return f"none in {steps} steps" if value is None else f"step {int(value)}"
        if value is None:
            return "n/a"
        if self.unit == "fraction":
            return f"{100 * value:.0f}%"
        if self.unit == "count":
            return str(int(value))
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
            return f"{value:.1e}"
        return f"{value:.3g}"

    def to_dict(self, before: float | None, after: float | None, steps: int) -> dict[str, Any]:
        was_healthy = self.healthy(before, steps)
        return {
            "rule": self.rule,
            "name": self.name,
            "unit": self.unit,
            "threshold": self.threshold,
            "better": self.better,
            "before": before,
            "after": after,
            "before_text": self.describe(before, steps),
            "after_text": self.describe(after, steps),
            "threshold_text": None
            if self.threshold is None
            else self.describe(self.threshold, steps),
            "present_before": None if was_healthy is None else not was_healthy,
            "gone": bool(self.healthy(after, steps)) and was_healthy is False,
        }


# ------------------------------------------------------------------------------ measurements


def gradient_ratio(run: TrainingRun) -> float | None:
    ends = gradient_ends(run)
    return None if ends is None else ends[1] / ends[3]


def dead_fraction(run: TrainingRun) -> float | None:
    """The largest share of never-active units in any ReLU layer (0 when there is none)."""
    values = [
        a.dead_fraction
        for a in run.activations
        if a.kind == "relu" and a.dead_fraction is not None and a.units >= 4
    ]
    return max(values, default=0.0)


def saturation(run: TrainingRun) -> float | None:
    """The largest share of saturated sigmoid/tanh outputs over the last steps (0: none left)."""
    w = run.window
    values = [
        mean(a.saturation[-w:])
        for a in run.activations
        if a.kind in ("sigmoid", "tanh") and a.saturation
    ]
    return max((v for v in values if v is not None), default=0.0)


def largest_early_update(run: TrainingRun) -> float | None:
    values = [
        median(p.update_ratio[: early_steps(len(p.update_ratio))])
        for p in run.weight_layers()
        if p.update_ratio and p.steps_with_grad
    ]
    return max(finite(values), default=None)


def smallest_update(run: TrainingRun) -> float | None:
    values = [
        median(p.update_ratio) for p in run.weight_layers() if p.update_ratio and p.steps_with_grad
    ]
    return min(finite(values), default=None)


def nonfinite_step(run: TrainingRun) -> float | None:
    return float(run.nonfinite.step) if run.nonfinite is not None else None


def gradient_growth(run: TrainingRun) -> float | None:
    totals = total_grad_norms(run)
    start, peak = median(totals[:3]), max(finite(totals), default=None)
    return peak / start if start and peak is not None else None


def train_eval_gap(run: TrainingRun) -> float | None:
    return (run.train_eval or {}).get("relative_gap")


def params_without_gradient(run: TrainingRun) -> float | None:
    return float(sum(1 for p in run.params if p.steps_with_grad == 0))


def top2_share(run: TrainingRun) -> float | None:
    preds = sorted(run.pred_counts or [], reverse=True)
    return (preds[0] + preds[1]) / sum(preds) if len(preds) >= 2 and sum(preds) else None


def initial_loss(run: TrainingRun) -> float | None:
    return run.loss[0] if run.loss and math.isfinite(run.loss[0]) else None


SYMPTOMS: dict[str, Symptom] = {
    "ND401": Symptom("ND401", "first non-finite value", "step", "lower", None, nonfinite_step),
    "ND402": Symptom(
        "ND402", "gradient norm growth (peak / start)", "ratio", "lower", 1e3, gradient_growth
    ),
    "ND403": Symptom(
        "ND403", "first/last layer gradient ratio", "ratio", "higher", 1e-2, gradient_ratio
    ),
    "ND404": Symptom(
        "ND404", "dead ReLU units (worst layer)", "fraction", "lower", 0.5, dead_fraction
    ),
    "ND405": Symptom(
        "ND405",
        "saturated sigmoid/tanh outputs (worst layer)",
        "fraction",
        "lower",
        0.5,
        saturation,
    ),
    "ND406+": Symptom(
        "ND406",
        "largest update/weight ratio (first steps)",
        "ratio",
        "lower",
        0.3,
        largest_early_update,
    ),
    "ND406-": Symptom(
        "ND406", "smallest update/weight ratio", "ratio", "higher", 1e-8, smallest_update
    ),
    "ND408": Symptom("ND408", "loss at initialisation", "loss", "lower", None, initial_loss),
    "ND409": Symptom(
        "ND409", "share of predictions in the top 2 classes", "fraction", "lower", 0.9, top2_share
    ),
    "ND410": Symptom(
        "ND410", "parameters without a gradient", "count", "lower", 0, params_without_gradient
    ),
    "ND411": Symptom(
        "ND411",
        "train/eval output gap",
        "ratio",
        "lower",
        0.3,
        train_eval_gap,
        needs_train_eval=True,
    ),
}

# Static and data findings: the runtime consequence each is known for, when no runtime finding
# in the report names it as its cause.
CONSEQUENCE = {
    "ND101": "ND403",
    "ND102": "ND403",
    "ND204": "ND403",
    "ND201": "ND403",
    "ND202": "ND404",
    "ND203": "ND411",
    "ND108": "ND410",
    "ND103": "ND410",
}


def key_of(f: Finding) -> str:
    if f.rule == "ND406":
        return "ND406+" if (f.evidence or {}).get("direction") == "too-large" else "ND406-"
    return f.rule


def symptom_for(top: Finding, findings: list[Finding]) -> Symptom | None:
    """The measurement that shows whether `top`'s fix works (see the module docstring)."""
    if key_of(top) in SYMPTOMS:
        return SYMPTOMS[key_of(top)]
    for f in findings:
        if f.cause == top.rule and key_of(f) in SYMPTOMS:
            return SYMPTOMS[key_of(f)]
    key = CONSEQUENCE.get(top.rule)
    return SYMPTOMS.get(key) if key else None
