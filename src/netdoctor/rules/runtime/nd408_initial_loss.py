"""ND408 initial-loss: cross-entropy at initialisation far from ln(C) (doc: rules/ND408.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.record import TrainingRun
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.numbers import g, pct
from netdoctor.rules.verification import Remedy, RemedyContext, SymptomSpec


@dataclass(frozen=True)
class Options(RuleOptions):
    tolerance: float = 0.5


def check(ctx: RuntimeContext, options: Options) -> Iterator[Finding]:
    run = ctx.run
    tol = options.tolerance
    if run.config.loss != "cross_entropy" or not run.classification or not run.loss:
        return
    c = run.num_outputs
    if not c or c < 2:
        return
    loss0 = run.loss[0]
    if not math.isfinite(loss0):
        return
    expected = math.log(c)
    if abs(loss0 - expected) <= tol * expected:
        return
    if loss0 < expected and not run.from_init:
        return  # resumed or pretrained weights are allowed to know something at step 1
    if loss0 > expected:
        why = (
            "the initial outputs are confidently wrong: the logits are far from zero at "
            "initialisation (input scale or the last layer's init), so the first steps are "
            "spent shrinking them"
        )
    else:
        why = (
            "the model is already confident before training: check for a label leak or "
            "targets that are trivially predictable"
        )
    message = (
        f"cross-entropy at initialisation is {g(loss0)}, but a model that has not learned "
        f"anything should score ln({c}) = {g(expected)} (tolerance +-{pct(tol)}): {why}."
    )
    fix = (
        Fix(
            "initialise the last layer so the initial logits are near zero",
            "nn.init.zeros_(model.fc.weight)   # the last Linear (name yours)\n"
            "nn.init.zeros_(model.fc.bias)\n",
        )
        if loss0 > expected
        else None
    )
    yield RULE.finding(
        message,
        fix=fix,
        evidence={"loss_at_init": loss0, "expected": expected, "classes": c},
        impact=3.0,
    )


def initial_loss(run: TrainingRun, options: Options) -> float | None:
    return run.loss[0] if run.loss and math.isfinite(run.loss[0]) else None


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """Logits far from zero at init: the last weight layer starts at zero (in a copy)."""
    from netdoctor.fixes.memory import zero_parameters

    ev = finding.evidence
    if not ev.get("loss_at_init", 0) > ev.get("expected", math.inf):
        return None
    last = next((p.module for p in reversed(context.run.weight_layers())), None)
    if not last:
        return None
    return Remedy(RULE.id, f"{last} initialised to zero", "model", model_fn=zero_parameters(last))


RULE = Rule(
    "ND408",
    "initial-loss",
    Severity.WARNING,
    Stage.RUNTIME,
    summary="cross-entropy at init far from ln(C)",
    check=check,
    options=Options,
    causes=("ND506", "ND302", "ND301", "ND201", "ND105", "ND106"),
    symptoms=(SymptomSpec("loss at initialisation", "loss", "lower", initial_loss),),
    remedy=remedy,
    fixture=Fixture(
        "probe", ("fixtures/sick/bad_init.py:DeepReLUMLP", "--data", "synthetic", "--steps", "100")
    ),
    healthy=Fixture(
        "probe", ("fixtures/healthy/mlp_normalized.py:MLP", "--data", "synthetic", "--steps", "100")
    ),
)
