"""ND409 prediction-collapse: the predictions collapse to one or two classes (doc:
rules/ND409.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Severity
from netdoctor.measure.record import TrainingRun
from netdoctor.measure.summary import (
    able_to_learn,
    cut_short,
)
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.numbers import pct
from netdoctor.rules.runtime._common import (
    LOOP_ROOTS,
    NOT_LEARNING,
)
from netdoctor.rules.verification import SymptomSpec


@dataclass(frozen=True)
class Options(RuleOptions):
    top2_share: float = 0.9


def check(ctx: RuntimeContext, options: Options) -> Iterator[Finding]:
    run = ctx.run
    share = options.top2_share
    if not run.pred_counts or not run.label_counts or (run.num_outputs or 0) < 3:
        return
    if run.stopped in ("non-finite", "labels", "non-finite-input") or run.steps_run < 10:
        return
    if run.competing_losses:
        return
    pred_counts = run.pred_counts
    preds = sorted(pred_counts, reverse=True)
    labels = sorted(run.label_counts, reverse=True)
    total_p, total_l = sum(preds), sum(labels)
    if not total_p or not total_l:
        return
    top2 = (preds[0] + preds[1]) / total_p
    label_top2 = (labels[0] + labels[1]) / total_l
    if top2 < share or label_top2 > share / 2:
        return
    classes = sorted(range(len(pred_counts)), key=lambda i: -pred_counts[i])[:2]
    message = (
        f"predictions collapsed: over the last {run.window} steps, {pct(top2)} of the "
        f"predictions are class {classes[0]} or {classes[1]}, while those two classes "
        f"are only {pct(label_top2)} of the labels. The model outputs (nearly) the same "
        "answer for every input."
    )
    can_overfit, typical = able_to_learn(run)
    still_learning = can_overfit and typical is not None and typical >= 1e-5
    if still_learning:
        message += (
            " The model memorizes one batch and its updates are normal-sized, so this is "
            "likely an early phase of training (it predicts the most common answers "
            "first), not a broken model."
        )
    short = cut_short(run)
    if short:
        message += (
            f" The time budget allowed only {run.steps_run} of {short} steps: an early "
            "phase of training predicts the most common answers first."
        )
    yield RULE.finding(
        message,
        fix=None,
        evidence={
            "top2_share": top2,
            "label_top2_share": label_top2,
            "predicted": run.pred_counts,
            "labels": run.label_counts,
            "can_overfit_batch": can_overfit,
            "steps_cut_from": short,
        },
        impact=2.0,
        severity=Severity.INFO if still_learning or short else None,
    )


def top2_share(run: TrainingRun, options: Options) -> float | None:
    preds = sorted(run.pred_counts or [], reverse=True)
    total = sum(preds)
    return (preds[0] + preds[1]) / total if len(preds) >= 2 and total else None


RULE = Rule(
    "ND409",
    "prediction-collapse",
    Severity.WARNING,
    Stage.RUNTIME,
    summary="predictions collapse to one or two classes",
    check=check,
    options=Options,
    causes=LOOP_ROOTS + NOT_LEARNING + ("ND407",),
    symptoms=(
        SymptomSpec(
            "share of predictions in the top 2 classes",
            "fraction",
            "lower",
            top2_share,
            threshold=lambda o: o.top2_share,
        ),
    ),
    fixture=Fixture(
        "probe",
        (
            "fixtures/sick/untraceable_plain.py:GatedDeepNet",
            "--data",
            "synthetic",
            "--steps",
            "100",
        ),
    ),
    healthy=Fixture(
        "probe", ("fixtures/healthy/lenet_relu.py:LeNet", "--data", "synthetic", "--steps", "100")
    ),
)
