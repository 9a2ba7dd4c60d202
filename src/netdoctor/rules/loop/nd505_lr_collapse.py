"""ND505 lr-collapse: the learning rate falls by orders of magnitude early in the run and stays
there (doc: rules/ND505.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import LoopContext
from netdoctor.rules.loop._common import where
from netdoctor.rules.numbers import g, pct


@dataclass(frozen=True)
class Options(RuleOptions):
    min_drop: float = 100.0  # the lr counts as collapsed below its peak so far / this
    early_fraction: float = 0.25  # ... when that happens within this share of the run
    min_steps: int = 20  # steps of the lr curve before judging
    stays_low: float = 0.9  # share of the steps after the collapse that stay below it


def lr_collapse_step(lrs: list[float], drop: float) -> tuple[int, float] | None:
    """(0-based step where the lr first fell below the highest lr so far / drop, that peak)."""
    peak = 0.0
    for i, v in enumerate(lrs):
        if not math.isfinite(v):
            continue
        peak = max(peak, v)
        if peak > 0 and v < peak / drop:
            return i, peak
    return None


def check(ctx: LoopContext, options: Options) -> Iterator[Finding]:
    loop = ctx.loop
    drop = options.min_drop
    early = options.early_fraction
    min_steps = options.min_steps
    stay = options.stays_low
    for o in loop.optimizers:
        lrs = o.lr_curve()
        n = len(lrs)
        if n < min_steps:
            continue
        found = lr_collapse_step(lrs, drop)
        if found is None:
            continue
        at, peak = found
        if (at + 1) / n > early:
            continue  # a schedule that reaches ~0 near its end
        after = [v for v in lrs[at:] if math.isfinite(v)]
        low = sum(1 for v in after if v < peak / drop)
        if not after or low / len(after) < stay:
            continue  # it recovers (a cyclic schedule)
        final = lrs[-1]
        decades = math.log10(peak / final) if final > 0 else math.inf
        message = (
            f"the learning rate of {o.label} fell from {g(peak)} to {g(lrs[at])} by step "
            f"{at + 1} of {n} ({pct((at + 1) / n)} of the run) and stayed there "
            f"({g(final)} at the last step, "
            + (
                f"{decades:.1f} orders of magnitude below its peak"
                if math.isfinite(decades)
                else "zero"
            )
            + f"): the remaining {n - at - 1} steps barely train."
        )
        sched = max(loop.schedulers.values(), key=lambda s: s.calls, default=None)
        location = o.step_site
        if sched is not None and sched.calls:
            location = sched.site or location
            per_step = sched.calls >= 0.5 * max(1, loop.iterations)
            if per_step:
                message += (
                    f" {sched.name}.step() runs at every training step ({sched.calls} "
                    f"calls in {loop.iterations} steps) at {where(sched.site)}: a "
                    "schedule sized in epochs (step_size, milestones, T_max, a gamma per "
                    "epoch) then decays once per batch."
                )
            else:
                message += f" The scheduler is {sched.name}, stepped at {where(sched.site)}."
        fix = Fix(
            "step an epoch-sized scheduler once per epoch (after the batch loop), or size "
            "it in steps (e.g. T_max=epochs * len(loader))",
            "for epoch in range(epochs):\n    for x, y in loader:\n        ...\n"
            "        optimizer.step()\n    scheduler.step()   # once per epoch, outside "
            "the batch loop\n",
        )
        yield RULE.finding(
            message,
            location=location,
            fix=fix,
            evidence={
                "optimizer": o.label,
                "peak_lr": peak,
                "collapse_step": at + 1,
                "steps": n,
                "final_lr": final,
                "scheduler": sched.name if sched else None,
                "scheduler_calls": sched.calls if sched else None,
            },
            impact=9.0,
        )


RULE = Rule(
    "ND505",
    "lr-collapse",
    Severity.WARNING,
    Stage.LOOP,
    summary="the learning rate falls by orders of magnitude early in the run",
    check=check,
    options=Options,
    fixture=Fixture("run", ("fixtures/loops/lr_collapse.py",)),
    healthy=Fixture("run", ("fixtures/loops/warmup_cosine.py",)),
)
