"""ND505 lr-collapse: the learning rate falls by orders of magnitude early in the run and stays
there, or a decay schedule runs past its end and climbs back (doc: rules/ND505.md)."""

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
    mirror: float = 0.25  # a climb back to half the peak over >= this x the fall's steps is a
    # decay run past its end (a cosine's T_max in epochs, stepped per batch), not a restart


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


@dataclass(frozen=True)
class Overrun:
    """A decay that fell from its peak to near zero, then climbed back the way it came."""

    peak_step: int  # 0-based steps
    back_step: int  # first step back at half the peak or more
    low: float  # the lowest lr on the way


def decay_overrun(
    lrs: list[float], low_step: int, peak: float, drop: float, mirror: float
) -> Overrun | None:
    """Given the lr's first fall below peak / drop at `low_step`: an Overrun if the lr then climbs
    back to half its peak gradually (over >= mirror x the fall's steps, unlike a warm restart's
    jump) and the rise to the peak was shorter than that (unlike a cyclic schedule, which climbs
    as long as it falls)."""
    peak_step = next(i for i, v in enumerate(lrs) if v == peak)
    fall = low_step - peak_step
    if peak_step > mirror * fall:
        return None  # as long a climb to the peak as the fall: a cycle by design
    last_low = low_step
    for i in range(low_step, len(lrs)):
        v = lrs[i]
        if not math.isfinite(v):
            continue
        if v < peak / drop:
            last_low = i
        elif v >= peak / 2:
            if i - last_low < mirror * fall:
                return None  # a jump back up: a warm restart
            low = min(x for x in lrs[peak_step:i] if math.isfinite(x))
            return Overrun(peak_step, i, low)
    return None


@dataclass(frozen=True)
class Collapse:
    """What the lr curve shows: where it first fell below peak / drop, and whether it then
    stayed low (overrun None) or climbed back as a decay run past its end."""

    at: int  # 0-based step
    peak: float
    overrun: Overrun | None


def lr_collapse(lrs: list[float], options: Options) -> Collapse | None:
    """The finding's evidence on one lr curve, or None for a healthy schedule."""
    n = len(lrs)
    if n < options.min_steps:
        return None
    found = lr_collapse_step(lrs, options.min_drop)
    if found is None:
        return None
    at, peak = found
    if (at + 1) / n > options.early_fraction:
        return None  # a schedule that reaches ~0 near its end
    after = [v for v in lrs[at:] if math.isfinite(v)]
    low = sum(1 for v in after if v < peak / options.min_drop)
    if after and low / len(after) >= options.stays_low:
        return Collapse(at, peak, None)
    overrun = decay_overrun(lrs, at, peak, options.min_drop, options.mirror)
    if overrun is None:
        return None  # it recovers by design (a cyclic schedule, warm restarts)
    return Collapse(at, peak, overrun)


def check(ctx: LoopContext, options: Options) -> Iterator[Finding]:
    loop = ctx.loop
    for o in loop.optimizers:
        lrs = o.lr_curve()
        n = len(lrs)
        collapse = lr_collapse(lrs, options)
        if collapse is None:
            continue
        at, peak, overrun = collapse.at, collapse.peak, collapse.overrun
        final = lrs[-1]
        if overrun is not None:
            message = (
                f"the learning rate of {o.label} fell from {g(peak)} to {g(overrun.low)} by "
                f"step {at + 1} of {n} ({pct((at + 1) / n)} of the run), then climbed back to "
                f"{g(lrs[overrun.back_step])} by step {overrun.back_step + 1}: a decay schedule "
                "that ran past its end and keeps cycling, so the lr swings between its peak and "
                "zero instead of annealing once over the run."
            )
        else:
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
                "climbed_back_step": overrun.back_step + 1 if overrun else None,
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
