"""ND407 loss-stalled: the loss does not decrease over the run and the accuracy stays at chance
(doc: rules/ND407.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.summary import (
    able_to_learn,
    cut_short,
    loss_window,
)
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.numbers import g, pct
from netdoctor.rules.runtime._common import (
    LOOP_ROOTS,
    NOT_LEARNING,
    lr_snippet,
    raise_lr,
)
from netdoctor.rules.verification import Remedy, RemedyContext


@dataclass(frozen=True)
class Options(RuleOptions):
    min_steps: int = 30  # each 10% window then holds >= 3 steps: a mean, not one batch's noise
    min_relative_drop: float = 0.1
    chance_margin: float = 0.1


def check(ctx: RuntimeContext, options: Options) -> Iterator[Finding]:
    run = ctx.run
    min_steps = options.min_steps
    min_drop = options.min_relative_drop
    margin = options.chance_margin
    if run.steps_run < min_steps or run.stopped in ("non-finite", "labels", "non-finite-input"):
        return
    if run.competing_losses:
        return  # a GAN's losses hover by design
    first, last, k = loss_window(run)
    if first is None or last is None:
        return
    drop = (first - last) / abs(first) if first else 0.0
    if drop >= min_drop:
        return
    chance = run.chance
    accs = [a for a in run.accuracy[-k:] if a is not None]
    acc = sum(accs) / len(accs) if accs else None
    if chance is not None and acc is not None and acc > chance + margin:
        return
    at_chance = (
        f"; accuracy {g(acc)} is at chance ({g(chance)})"
        if acc is not None and chance is not None
        else ""
    )
    message = (
        f"the loss is not decreasing: {g(first)} over the first {k} steps -> {g(last)} "
        f"over the last {k} ({pct(max(drop, 0.0))} lower; threshold "
        f"{pct(min_drop)}){at_chance}. The model is not learning."
    )
    lr = run.config.learning_rate
    fix = Fix(
        f"if nothing else explains it: raise the learning rate ({g(lr)} -> {g(lr * 10)}) "
        "or probe longer (--steps)",
        lr_snippet(run, 10.0),
    )
    # A model that memorizes one batch and takes normal-sized steps is able to learn: the data
    # needs more than this short probe (common with --data synthetic for CNNs). Say so, quietly.
    can_overfit, typical = able_to_learn(run)
    slow_but_able = can_overfit and typical is not None and typical >= 1e-5
    if slow_but_able:
        message += (
            f" But the model memorizes one batch and its updates are normal-sized "
            f"(median update/weight ratio {g(typical)}): it can learn, this data needs a "
            "longer probe (--steps) or a higher learning rate."
        )
    short = cut_short(run)
    if short:
        message += (
            f" The time budget allowed only {run.steps_run} of {short} steps, so this "
            "says the model had not learned yet, not that it cannot (--steps, "
            "--time-budget)."
        )
    yield RULE.finding(
        message,
        fix=fix,
        evidence={
            "loss_first": first,
            "loss_last": last,
            "relative_drop": drop,
            "accuracy": acc,
            "chance": chance,
            "steps": run.steps_run,
            "can_overfit_batch": bool(can_overfit),
            "median_update_ratio": typical,
            "fallback_fix": True,
            "steps_cut_from": short,
        },
        impact=3.0,
        severity=Severity.INFO if slow_but_able or short else None,
    )


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """Nothing else explains the stall: a higher learning rate."""
    return raise_lr(finding, context) if finding.cause is None else None


RULE = Rule(
    "ND407",
    "loss-stalled",
    Severity.WARNING,
    Stage.RUNTIME,
    summary="loss not decreasing over the probe; accuracy at chance",
    check=check,
    options=Options,
    causes=LOOP_ROOTS + NOT_LEARNING,
    remedy=remedy,
    fixture=Fixture(
        "probe", ("fixtures/sick/bad_init.py:DeepTanhMLP", "--data", "synthetic", "--steps", "100")
    ),
    healthy=Fixture(
        "probe", ("fixtures/healthy/lenet_relu.py:LeNet", "--data", "synthetic", "--steps", "100")
    ),
)
