"""Verified fixes: apply the report's top fix in memory, re-run the probe, and show before and
after both the outcome (loss, accuracy) and the mechanism -- the measured symptom behind the
top finding (`symptoms`), e.g. the first/last gradient ratio or the dead-unit fraction.

When the top fix alone does not improve the outcome, the next ranked remedies are added one at a
time (at most `MAX_REMEDIES` in all; a learning-rate change that does not help is scaled again,
at most twice) and the smallest combination that works is reported. When the difference is
still unclear -- a small gain, or the symptom gone while the loss has not moved yet -- both sides
are re-run for `EXTEND` times the steps, and the report says so. When nothing helps, every
attempt is listed with its numbers.

Each re-run uses the same batches (sources are deterministic for a seed), the same steps and
the probe's own instruments, on a fresh copy of the model (`remedies`); the user's object and
files are never touched. Attempts that would not fit the time budget are not started.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from netdoctor.curves import FixCurve, finite_or_none
from netdoctor.findings import Finding, Report, Severity
from netdoctor.measure.record import TrainingRun
from netdoctor.measure.summary import learned_well
from netdoctor.probe.config import ProbeConfig, probe_config
from netdoctor.probe.engine import run_probe
from netdoctor.rules.engine import RuleSettings, remedy_for, symptom_for
from netdoctor.rules.verification import Remedy, RemedyContext, Symptom, conflicts, lr_text

if TYPE_CHECKING:
    from rich.progress import Progress

    from netdoctor.data.base import DataSource

MAX_REMEDIES = 3
LR_RETRIES = 2
EXTEND = 3

# The outcome improved: the final loss (mean of the last 10% of steps) is at least this much
# lower, and the accuracy at least this much higher (unless both are already near 1).
LOSS_GAIN = 0.10
ACC_GAIN = 0.02
# When both runs reach an accuracy of 0.98, the loss must also fall by this much (absolute).
SOLVED_LOSS_GAIN = 0.05
# Smaller gains than these are noise; in between, the difference is unclear.
UNCLEAR_LOSS_GAIN = 0.03


@dataclass
class Attempt:
    remedies: list[Remedy]
    lr_times: int = 1  # the learning-rate factor applied this many times (retries)
    steps: int = 0
    side: dict[str, Any] = field(default_factory=dict)
    symptom: float | None = None
    outcome: str = "no"  # "improved" | "unclear" | "no" | "failed"
    symptom_gone: bool = False
    error: str | None = None
    loss: list[float] = field(default_factory=list)  # per step of the re-run

    @property
    def improved(self) -> bool:
        return self.outcome == "improved"


def verify(
    model: nn.Module,
    source: DataSource,
    run: TrainingRun,
    report: Report,
    rules: RuleSettings,
    progress: Progress | None = None,
    deadline: float | None = None,
) -> tuple[dict[str, Any] | None, list[str], FixCurve | None]:
    """Re-run the probe with the top fix (and, if needed, the next ranked ones) applied.
    Returns (the measurement for report.measurements["verified_fix"], notes, the loss curves
    of the probe and of the re-run shown). The symptom's threshold is the one `rules` give
    its rule."""
    top = report.fix_first()
    if top is None or run.steps_run == 0:
        return _unverified([])  # nothing to fix, or nothing to compare with (the report says why)
    context = RemedyContext(report, run, model)
    first = remedy_for(top, context)
    if first is None:
        return _unverified(
            [
                f"fix first ({top.rule} {top.name}) changes code that cannot be applied "
                "in memory: not verified"
            ]
        )
    ranked = report.sorted_findings()
    candidates = _candidates(first, top, ranked, context)
    symptom = symptom_for(top, ranked, rules)
    v = _Verifier(model, source, run, symptom, progress, deadline)
    notes: list[str] = []

    winner: Attempt | None = None
    for size in range(1, len(candidates) + 1):
        combo = candidates[:size]
        retries = LR_RETRIES if any(r.retry for r in combo) else 0
        for times in range(1, retries + 2):
            a = v.attempt(combo, times)
            if a is None or a.improved or a.outcome == "failed":
                break
        if a is None or a.outcome == "failed":
            break
        if a.improved:
            winner = a
            break
    if winner is not None and len(winner.remedies) == MAX_REMEDIES:
        # the smallest combination that works: is the middle remedy needed?
        smaller = v.attempt([winner.remedies[0], winner.remedies[2]], winner.lr_times)
        if smaller is not None and smaller.improved:
            winner = smaller
    extended = False
    if winner is None:
        # a small gain, or the mechanism fixed (the symptom gone) while the loss has not moved
        # yet: the probe may be too short to show the outcome
        promising = [
            a
            for a in v.attempts
            if a.outcome == "unclear" or (a.symptom_gone and a.outcome != "failed")
        ]
        if promising:
            best = min(promising, key=lambda a: _finite_or_inf(a.side.get("loss_last")))
            longer = v.extend(best)
            if longer is not None:
                extended = True
                notes.append(
                    f"the verification ran {longer.steps} steps ({EXTEND}x the probe) "
                    f"because after {v.steps} steps the difference was unclear"
                )
                if longer.improved:
                    winner = longer
    if not v.attempts:
        return _unverified(
            notes
            + [
                f"fix first ({top.rule}) was not verified: a re-run of the probe "
                "would not fit the time left in the budget (--time-budget, or "
                "--steps for no budget)"
            ]
        )
    if v.out_of_time:
        notes.append(
            f"the verification stopped after {len(v.attempts)} attempt(s): the next "
            "would not fit the time budget (--time-budget)"
        )
    if v.attempts[0].outcome == "failed" and len(v.attempts) == 1:
        a = v.attempts[0]
        return _unverified(
            [
                f"fix first ({top.rule}) was applied in memory ({_applied(a, run)}) but "
                f"the re-run failed: {a.error}"
            ]
        )

    shown = winner or _best(v.attempts, symptom)
    before_side = v.before_side(shown.steps)
    result: dict[str, Any] = {
        "rule": top.rule,
        "fix": top.fix.summary
        if top.fix and len(shown.remedies) == 1 and shown.lr_times == 1
        else _applied(shown, run),
        "applied": _applied(shown, run),
        "remedies": [
            {"rule": r.rule, "description": _described(r, shown, run)} for r in shown.remedies
        ],
        "before": before_side,
        "after": shown.side,
        "improved": winner is not None or shown.symptom_gone,
        "outcome_improved": winner is not None,
        "steps": shown.steps,
        "extended": extended,
        "symptom": symptom.to_dict(v.before_symptom(shown.steps), shown.symptom, shown.steps)
        if symptom
        else None,
        "attempts": [_attempt_dict(a, run, symptom) for a in v.attempts],
        "stopped": "time budget" if v.out_of_time else None,
        "baseline_learned_well": learned_well(run) is not None,
    }
    curve = FixCurve(
        applied=result["applied"],
        before=finite_or_none(v.baseline(shown.steps).loss),
        after=finite_or_none(shown.loss),
    )
    return result, notes, curve


def _unverified(notes: list[str]) -> tuple[None, list[str], None]:
    """verify()'s answer when nothing was verified: the notes say why."""
    return None, notes, None


# ------------------------------------------------------------------------------ the candidates


def with_learning_rate(config: ProbeConfig, remedies: list[Remedy], times: int = 1) -> ProbeConfig:
    """The probe's config with the remedies' learning-rate factor applied `times` times (a
    change that was not enough is scaled again)."""
    for r in remedies:
        if r.lr_factor is not None:
            config = replace(config, lr=config.learning_rate * r.lr_factor**times)
    return config


def _candidates(
    first: Remedy, top: Finding, ranked: list[Finding], context: RemedyContext
) -> list[Remedy]:
    """The top remedy, then the remedies of the next ranked findings (warnings and errors), one
    per kind of change, at most MAX_REMEDIES."""
    out = [first]
    for f in ranked:
        if len(out) >= MAX_REMEDIES:
            break
        if f is top or f.severity < Severity.WARNING or f.fix is None:
            continue
        r = remedy_for(f, context)
        if r is not None and not conflicts(r, out):
            out.append(r)
    return out


# ------------------------------------------------------------------------------ the runs


class _Verifier:
    def __init__(
        self,
        model: nn.Module,
        source: DataSource,
        run: TrainingRun,
        symptom: Symptom | None,
        progress: Progress | None,
        deadline: float | None,
    ):
        self.model, self.source, self.run, self.symptom = model, source, run, symptom
        self.progress, self.deadline = progress, deadline
        self.attempts: list[Attempt] = []
        self.out_of_time = False
        self.step_s = run.timings.get("train_s", 0.0) / max(1, run.steps_run)
        # the probe's planned steps: a probe stopped early (NaN at step 3) still compares
        # with a full-length re-run
        self.steps = run.config.steps
        self._baselines: dict[int, TrainingRun] = {self.steps: run}

    def _fits(self, steps: int, runs: int = 1) -> bool:
        if self.deadline is None:
            return True
        need = 1.15 * self.step_s * steps * runs
        if time.monotonic() + need > self.deadline:
            self.out_of_time = True
            return False
        return True

    def _train(self, remedies: list[Remedy], lr_times: int, steps: int, label: str) -> TrainingRun:
        net = self.model
        if any(r.model_fn for r in remedies):
            net = copy.deepcopy(self.model)
            for r in remedies:
                if r.model_fn is not None:
                    r.model_fn(net)
        transforms = [r.transform for r in remedies if r.transform is not None]
        config = with_learning_rate(
            replace(probe_config(self.run), steps=steps), remedies, lr_times
        )
        needs_te = bool(self.symptom and self.symptom.needs_train_eval)
        return run_probe(
            net,
            self.source,
            config,
            instrument=True,
            transform=_compose(transforms),
            progress=self.progress,
            label=label,
            overfit=False,
            train_eval=needs_te,
        )

    def attempt(
        self, remedies: list[Remedy], lr_times: int = 1, steps: int | None = None
    ) -> Attempt | None:
        steps = steps or self.steps
        if not self._fits(steps):
            return None
        a = Attempt(list(remedies), lr_times, steps)
        try:
            after = self._train(remedies, lr_times, steps, "verify fix")
        except Exception as e:  # the edited model may not run (e.g. BatchNorm1d on 3-D input)
            a.outcome = "failed"
            a.error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            self.attempts.append(a)
            return a
        a.side = after.summary_side()
        a.loss = list(after.loss)
        a.symptom = self.symptom.value(after) if self.symptom else None
        before = self.before_side(steps)
        sym_before = self.before_symptom(steps)
        a.outcome = judge(before, a.side)
        a.symptom_gone = bool(
            self.symptom
            and self.symptom.healthy(a.symptom, steps)
            and not self.symptom.healthy(sym_before, steps)
        )
        self.attempts.append(a)
        return a

    def extend(self, best: Attempt) -> Attempt | None:
        steps = EXTEND * self.steps
        if not self._fits(steps, runs=2):
            return None
        base = replace(probe_config(self.run), steps=steps)
        try:
            self._baselines[steps] = run_probe(
                self.model,
                self.source,
                base,
                instrument=True,
                progress=self.progress,
                label="verify: baseline",
                overfit=False,
                train_eval=bool(self.symptom and self.symptom.needs_train_eval),
            )
        except Exception:  # the original model ran before; a failure here is not the fix's
            return None
        return self.attempt(best.remedies, best.lr_times, steps)

    def baseline(self, steps: int) -> TrainingRun:
        """The run the re-runs of `steps` steps are compared with: the probe, or the longer
        baseline of an extended verification."""
        return self._baselines.get(steps, self.run)

    def before_side(self, steps: int) -> dict[str, Any]:
        return self.baseline(steps).summary_side()

    def before_symptom(self, steps: int) -> float | None:
        return self.symptom.value(self.baseline(steps)) if self.symptom else None


def _compose(
    fns: list[Callable[[torch.Tensor], torch.Tensor]],
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if not fns:
        return None

    def transform(x: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            x = fn(x)
        return x

    return transform


def _finite_or_inf(v: float | None) -> float:
    return v if v is not None and math.isfinite(v) else math.inf


# ------------------------------------------------------------------------------ judging


def judge(before: dict[str, Any], after: dict[str, Any]) -> str:
    """ "improved": the final loss is clearly lower and the accuracy higher (or the probe blew up
    and the re-run learns); "unclear": a smaller gain; "no": no gain, or worse."""
    a, a0 = after.get("loss_last"), after.get("loss_first")
    if a is None or not math.isfinite(a):
        return "no"
    b = before.get("loss_last")
    ba, aa = before.get("accuracy"), after.get("accuracy")
    acc_gain = None if ba is None or aa is None else aa - ba
    if b is None or not math.isfinite(b):  # the probe went non-finite; the re-run did not
        learns = a0 is not None and math.isfinite(a0) and a < (1 - LOSS_GAIN) * a0
        return "improved" if learns else "no"
    loss_gain = (b - a) / abs(b) if b else 0.0
    solved = ba is not None and aa is not None and ba >= 0.98 and aa >= 0.98
    acc_ok = acc_gain is None or acc_gain >= ACC_GAIN or solved
    # both runs solved the task: a lower loss near zero is noise, not an improvement
    if solved and b - a < SOLVED_LOSS_GAIN:
        return "no"
    if loss_gain >= LOSS_GAIN and acc_ok:
        return "improved"
    if loss_gain >= UNCLEAR_LOSS_GAIN or (acc_gain is not None and acc_gain >= ACC_GAIN):
        return "unclear"
    return "no"


def improved(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """The outcome improved (see `judge`)."""
    return judge(before, after) == "improved"


def _best(attempts: list[Attempt], symptom: Symptom | None) -> Attempt:
    """What to show when no attempt improved the outcome: one that removed the symptom, else
    the one with the lowest final loss."""
    ok = [a for a in attempts if a.outcome != "failed"]
    gone = [a for a in ok if a.symptom_gone]
    if gone:
        return gone[0]
    if not ok:
        return attempts[-1]
    return min(ok, key=lambda a: _finite_or_inf(a.side.get("loss_last")))


# ------------------------------------------------------------------------------ the record


def _described(r: Remedy, a: Attempt, run: TrainingRun) -> str:
    if r.lr_factor is None:
        return r.description
    lr = run.config.learning_rate
    return lr_text(lr, lr * r.lr_factor**a.lr_times)


def _applied(a: Attempt, run: TrainingRun) -> str:
    return " + ".join(_described(r, a, run) for r in a.remedies)


def _attempt_dict(a: Attempt, run: TrainingRun, symptom: Symptom | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "applied": _applied(a, run),
        "rules": [r.rule for r in a.remedies],
        "steps": a.steps,
        "after": a.side,
        "outcome": a.outcome,
        "symptom_gone": a.symptom_gone,
    }
    if symptom is not None and a.outcome != "failed":
        out["symptom"] = a.symptom
        out["symptom_text"] = symptom.describe(a.symptom, a.steps)
    if a.error:
        out["error"] = a.error
    return out
