"""ND402 exploding-gradients: gradient norms growing without bound or far above the weights' scale
(doc: rules/ND402.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.record import TrainingRun
from netdoctor.measure.summary import (
    batch_cut,
    finite,
    median,
    total_grad_norms,
)
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.numbers import g
from netdoctor.rules.runtime._common import (
    adaptive,
    batch_cut_text,
    lower_lr,
    lr_snippet,
    site,
)
from netdoctor.rules.verification import SymptomSpec


@dataclass(frozen=True)
class Options(RuleOptions):
    max_growth: float = 1e3
    max_grad_weight_ratio: float = 1e3


def check(ctx: RuntimeContext, options: Options) -> Iterator[Finding]:
    run = ctx.run
    if run.steps_run < 2:
        return
    max_growth = options.max_growth
    max_ratio = options.max_grad_weight_ratio
    layers = run.weight_layers()
    if not layers:
        return
    totals = total_grad_norms(run)
    start = median(totals[:3])
    peak = max(finite(totals), default=None)
    nonfinite_grad = any(not math.isfinite(t) and not math.isnan(t) for t in totals) or (
        run.nonfinite is not None and run.nonfinite.kind == "gradient"
    )
    growth = (peak / start) if start and peak is not None and start > 0 else None
    worst, worst_ratio = None, 0.0
    for p in layers:
        for gn, wn in zip(p.grad_norm, p.weight_norm):
            if math.isfinite(gn) and wn > 0 and gn / wn > worst_ratio:
                worst, worst_ratio = p, gn / wn
    reasons = []
    if growth is not None and growth > max_growth:
        reasons.append(
            f"the total gradient norm grew {g(growth)}x (from {g(start)} over the "
            f"first steps to {g(peak)}; threshold {g(max_growth)}x)"
        )
    # Adam-family updates do not scale with the gradient: a gradient far above its weight (a
    # loss summed over the batch) moves the weight by about lr all the same. Only growth over
    # time and overflow mean explosion there.
    if worst is not None and worst_ratio > max_ratio and not adaptive(run.config.optimizer):
        reasons.append(
            f"{worst.name}'s gradient norm reached {g(worst_ratio)}x its weight norm "
            f"(threshold {g(max_ratio)}x)"
        )
    if nonfinite_grad:
        reasons.append("a gradient overflowed to Inf")
    if not reasons:
        return
    module = worst.module if worst is not None else None
    message = (
        "gradients explode: " + "; ".join(reasons) + ". Each update then jumps far past "
        "the minimum and the weights grow until activations overflow (loss NaN)."
    )
    fix = Fix(
        f"lower the learning rate ({g(run.config.learning_rate)} -> "
        f"{g(run.config.learning_rate / 10)}) and/or clip the gradient norm",
        lr_snippet(run, 0.1) + "# between loss.backward() and optimizer.step():\n"
        "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)\n",
    )
    cut = batch_cut(run)
    if cut:
        message += batch_cut_text(cut)
    yield RULE.finding(
        message,
        module=module,
        location=site(run, module),
        fix=fix,
        evidence={
            "growth": growth,
            "start_norm": start,
            "peak_norm": peak,
            "max_grad_weight_ratio": worst_ratio,
            "worst_parameter": worst.name if worst else None,
            "total_grad_norm": totals,
            "batch_cut_from": cut and cut[1],
            "nonfinite_only": reasons == ["a gradient overflowed to Inf"],
        },
        impact=7.0,
        severity=Severity.INFO if cut and not nonfinite_grad else None,
    )


def gradient_growth(run: TrainingRun, options: Options) -> float | None:
    totals = total_grad_norms(run)
    start, peak = median(totals[:3]), max(finite(totals), default=None)
    return peak / start if start and peak is not None else None


RULE = Rule(
    "ND402",
    "exploding-gradients",
    Severity.WARNING,
    Stage.RUNTIME,
    summary="gradient norms growing without bound or far above the weights' scale",
    check=check,
    options=Options,
    causes=("ND304", "ND302", "ND301", "ND501", "ND201", "ND204", "ND406+", "ND101"),
    symptoms=(
        SymptomSpec(
            "gradient norm growth (peak / start)",
            "ratio",
            "lower",
            gradient_growth,
            threshold=lambda o: o.max_growth,
        ),
    ),
    remedy=lower_lr,
    fixture=Fixture(
        "probe",
        (
            "fixtures/sick/exploding.py:ExplodingMLP",
            "--data",
            "synthetic",
            "--lr",
            "2",
            "--steps",
            "30",
        ),
    ),
    healthy=Fixture(
        "probe", ("fixtures/healthy/mlp_normalized.py:MLP", "--data", "synthetic", "--steps", "100")
    ),
)
