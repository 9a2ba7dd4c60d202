"""ND412 cannot-overfit-batch: the model cannot drive the loss down on one small fixed batch (doc:
rules/ND412.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Severity
from netdoctor.measure.summary import (
    mean,
)
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.numbers import g, pct


@dataclass(frozen=True)
class Options(RuleOptions):
    max_loss_ratio: float = 0.2
    still_falling: float = 0.9


def check(ctx: RuntimeContext, options: Options) -> Iterator[Finding]:
    run = ctx.run
    of = run.overfit
    if not of:
        return
    ratio = options.max_loss_ratio
    first, best = of.get("loss_first"), of.get("loss_min")
    if first is None or not math.isfinite(first) or first <= 0:
        return
    falling = options.still_falling
    acc = of.get("accuracy")
    if best is not None and math.isfinite(best) and best <= ratio * first:
        return
    losses = [v for v in of.get("losses", []) if math.isfinite(v)]
    trend = None
    if len(losses) >= 20:
        prev, last = mean(losses[-20:-10]), mean(losses[-10:])
        trend = last / prev if prev and last is not None else None
        if trend is not None and trend < falling:
            return  # slow (e.g. a frozen backbone's few features) but still going down fast
    message = (
        f"the model cannot overfit one batch: {of['steps']} Adam steps (lr "
        f"{g(of['lr'])}) on the same {of['samples']} samples took the loss only from "
        f"{g(first)} to {g(best)} (needs <= {pct(ratio)} of the start)"
        + (
            f" and it has levelled off (last 10 steps at {pct(trend)} of the 10 before)"
            if trend is not None
            else ""
        )
        + (f", accuracy {g(acc)}" if acc is not None else "")
        + ". A working model memorizes a tiny batch almost at once; this points at the "
        "model or the data/loss wiring, not at the learning rate."
    )
    yield RULE.finding(
        message,
        fix=None,
        evidence={**{k: v for k, v in of.items() if k != "losses"}, "trend": trend},
        impact=3.0,
    )


RULE = Rule(
    "ND412",
    "cannot-overfit-batch",
    Severity.WARNING,
    Stage.RUNTIME,
    summary="the model cannot drive the loss down on one small fixed batch",
    check=check,
    options=Options,
    causes=(
        "ND304",
        "ND303",
        "ND202",
        "ND410",
        "ND108",
        "ND104",
        "ND105",
        "ND106",
        "ND404",
        "ND403",
        "ND405",
        "ND102",
        "ND101",
        "ND302",
        "ND301",
    ),
    fixture=Fixture(
        "probe",
        ("fixtures/sick/softmax_output.py:SoftmaxNet", "--data", "synthetic", "--steps", "100"),
    ),
    healthy=Fixture(
        "probe", ("fixtures/healthy/mlp_normalized.py:MLP", "--data", "synthetic", "--steps", "100")
    ),
)
