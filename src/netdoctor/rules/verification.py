"""What a rule gives the probe's verified fix (`netdoctor.probe.verify`): the symptom to measure
before and after, and the remedy to apply in memory.

* `SymptomSpec` (a rule's `symptoms`): a measurement read off a `TrainingRun` and the option that
  is its threshold; `bind` gives the `Symptom` for the options in force, so "the symptom is gone"
  means the re-run would no longer trigger the rule as the user configured it.
* `Remedy` (what a rule's `remedy` returns): a change to a fresh copy of the model
  (`model_fn`), to the input batches (`transform`) or to the learning rate (`lr_factor`); the
  user's object and files are never touched. Remedies of different kinds combine; two of one
  kind (two data transforms, two learning-rate changes) do not (`conflicts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from netdoctor.rules.options import RuleOptions

if TYPE_CHECKING:
    import torch
    from torch import nn

    from netdoctor.findings import Report
    from netdoctor.measure.record import TrainingRun

OptionsT = TypeVar("OptionsT", bound=RuleOptions)


def _no_threshold(options: Any) -> float | None:
    return None


@dataclass(frozen=True)
class SymptomSpec(Generic[OptionsT]):
    """A rule's measured symptom: `measure(run, options)` reads it off a run; `unit`: "ratio" |
    "fraction" | "step" | "count" | "loss"; `better`: "higher" | "lower"; `threshold`: the
    option the rule fires beyond."""

    name: str
    unit: str
    better: str
    measure: Callable[[TrainingRun, OptionsT], float | None]
    threshold: Callable[[OptionsT], float | None] = _no_threshold
    variant: str = ""  # which of the rule's variants it measures (see Rule.variant)
    needs_train_eval: bool = False  # the re-run must repeat the train/eval check

    def bind(self, rule_id: str, options: OptionsT) -> Symptom:
        def measure(run: TrainingRun) -> float | None:
            return self.measure(run, options)

        return Symptom(
            rule_id,
            self.name,
            self.unit,
            self.better,
            self.threshold(options),
            measure,
            self.needs_train_eval,
        )


@dataclass(frozen=True)
class Symptom:
    """A symptom with its threshold for the options in force."""

    rule: str  # the runtime rule that measures it
    name: str  # what it is, for people
    unit: str
    better: str
    threshold: float | None  # the rule fires beyond it
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


@dataclass
class RemedyContext:
    """What a remedy may read: the report (its other findings), the probe's run (its learning
    rate, its layers) and the user's model (never changed: remedies edit a copy)."""

    report: Report
    run: TrainingRun
    model: nn.Module | None = None


@dataclass
class Remedy:
    rule: str
    description: str  # what was changed, in words ("inputs scaled to [0, 1] (x / 255)")
    kind: str  # "model" | "data" | "lr" | "batchnorm"
    model_fn: Callable[[nn.Module], None] | None = None  # edits a copy of the model in place
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    lr_factor: float | None = None  # multiplies the learning rate
    retry: bool = False  # lr remedies: when no better, scale the lr again (at most twice)


def lr_remedy(rule: str, lr: float, factor: float, retry: bool = False) -> Remedy:
    return Remedy(rule, lr_text(lr, lr * factor), "lr", lr_factor=factor, retry=retry)


def lr_text(old: float, new: float) -> str:
    return f"learning rate {old:g} → {new:g}"


def conflicts(remedy: Remedy, chosen: list[Remedy]) -> bool:
    """Two changes of the data, or of the learning rate, do not stack; the same edit twice is
    one edit."""
    for other in chosen:
        if remedy.kind in ("data", "lr", "batchnorm") and other.kind == remedy.kind:
            return True
        if remedy.description == other.description:
            return True
    return False
