"""ND406 update-ratio: per-layer update/weight ratios far outside ~1e-3, too large (unstable) or
too small (not learning) (doc: rules/ND406.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.record import TrainingRun
from netdoctor.measure.summary import (
    batch_cut,
    early_steps,
    finite,
    median,
)
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.numbers import g
from netdoctor.rules.runtime._common import (
    batch_cut_text,
    lower_lr,
    lr_snippet,
    raise_lr,
    site,
)
from netdoctor.rules.verification import Remedy, RemedyContext, SymptomSpec


@dataclass(frozen=True)
class Options(RuleOptions):
    min_ratio: float = 1e-8
    max_ratio: float = 0.3


def check(ctx: RuntimeContext, options: Options) -> Iterator[Finding]:
    run = ctx.run
    if run.steps_run < 3:
        return
    low = options.min_ratio
    high = options.max_ratio
    rows, early = [], []
    for p in run.weight_layers():
        r = median(p.update_ratio)
        if r is None or p.steps_with_grad == 0:
            continue
        rows.append((p, r))
        early.append((p, median(p.update_ratio[: early_steps(len(p.update_ratio))])))
    if not rows:
        return
    # Too small: typical over the whole probe. Too large: over the first steps, before the
    # damage (dead units, overflow) makes the later updates meaningless.
    small = [(p, r) for p, r in rows if r < low]
    large = [(p, r) for p, r in early if r is not None and r > high]
    if str(run.config.optimizer).lower() == "lbfgs":
        large = []  # a quasi-Newton step with a line search is large by design, no lr step
    lr = run.config.learning_rate
    for direction, group, factor in (("too-large", large, 0.1), ("too-small", small, 10.0)):
        if not group:
            continue
        worst = (
            max(group, key=lambda pr: pr[1])
            if direction == "too-large"
            else min(group, key=lambda pr: pr[1])
        )
        listed = ", ".join(f"{p.module}: {g(r)}" for p, r in group[:5])
        more = f" and {len(group) - 5} more" if len(group) > 5 else ""
        if direction == "too-large":
            message = (
                f"weights change too much per step: over the first steps the median "
                f"update/weight ratio is above {g(high)} in {len(group)} layer(s) "
                f"({listed}{more}); a healthy "
                "ratio is ~1e-3. Training is unstable and overshoots."
            )
            fix = Fix(
                f"lower the learning rate ({g(lr)} -> {g(lr * factor)})", lr_snippet(run, factor)
            )
        elif all(r == 0 for _, r in group):
            message = (
                f"weights do not move at all: the update/weight ratio is 0 in "
                f"{len(group)} layer(s) ({', '.join(p.module for p, _ in group[:5])}"
                f"{more}): their gradient is exactly zero, so they never learn."
            )
            fix = Fix("find what blocks their gradient (dead units, a constant layer)", None)
        else:
            message = (
                f"weights barely change: the median update/weight ratio is below "
                f"{g(low)} in {len(group)} layer(s) ({listed}{more}); a healthy ratio is "
                "~1e-3. These layers are effectively not learning."
            )
            fix = Fix(
                f"raise the learning rate ({g(lr)} -> {g(lr * factor)}) once the "
                "gradient problem behind it is fixed",
                lr_snippet(run, factor),
            )
        p = worst[0]
        cut = batch_cut(run) if direction == "too-large" else None
        if cut:
            message += batch_cut_text(cut)
        yield RULE.finding(
            message,
            module=p.module,
            location=site(run, p.module),
            fix=fix,
            evidence={
                "direction": direction,
                "min_ratio": low,
                "max_ratio": high,
                "ratios": {q.module: r for q, r in rows},
                "early_ratios": {q.module: r for q, r in early},
                "batch_cut_from": cut and cut[1],
            },
            impact=5.0,
            severity=Severity.INFO if cut else None,
        )


def variant(finding: Finding) -> str:
    """ "+" for updates too large, "-" for too small: different symptoms, different causes."""
    return "+" if finding.evidence.get("direction") == "too-large" else "-"


def causes(finding: Finding) -> tuple[str, ...]:
    if variant(finding) == "+":
        return ("ND501", "ND302", "ND301")
    return (
        "ND503", "ND602", "ND603", "ND604", "ND505", "ND410", "ND202", "ND404", "ND403", "ND405",
        "ND102", "ND101",
    )  # fmt: skip


def largest_early_update(run: TrainingRun, options: Options) -> float | None:
    values = [
        median(p.update_ratio[: early_steps(len(p.update_ratio))])
        for p in run.weight_layers()
        if p.update_ratio and p.steps_with_grad
    ]
    return max(finite(values), default=None)


def smallest_update(run: TrainingRun, options: Options) -> float | None:
    values = [
        median(p.update_ratio) for p in run.weight_layers() if p.update_ratio and p.steps_with_grad
    ]
    return min(finite(values), default=None)


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """Too large: a lower learning rate; too small (with an lr fix to offer): a higher one."""
    if variant(finding) == "+":
        return lower_lr(finding, context)
    if finding.fix is not None and finding.fix.patch:
        return raise_lr(finding, context)
    return None


RULE = Rule(
    "ND406",
    "update-ratio",
    Severity.WARNING,
    Stage.RUNTIME,
    summary="per-layer update/weight ratio far outside ~1e-3",
    check=check,
    options=Options,
    variant=variant,
    causes=causes,
    symptoms=(
        SymptomSpec(
            "largest update/weight ratio (first steps)",
            "ratio",
            "lower",
            largest_early_update,
            threshold=lambda o: o.max_ratio,
            variant="+",
        ),
        SymptomSpec(
            "smallest update/weight ratio",
            "ratio",
            "higher",
            smallest_update,
            threshold=lambda o: o.min_ratio,
            variant="-",
        ),
    ),
    remedy=remedy,
    fixture=Fixture(
        "probe",
        ("fixtures/sick/sigmoid_mlp.py:SigmoidMLP", "--data", "synthetic", "--steps", "100"),
    ),
    healthy=Fixture(
        "probe", ("fixtures/healthy/mlp_normalized.py:MLP", "--data", "synthetic", "--steps", "100")
    ),
)
