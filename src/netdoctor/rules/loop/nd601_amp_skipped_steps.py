"""ND601 amp-skipped-steps: a GradScaler skips step after step (its scale collapsing) instead of
the few skips of its normal calibration (doc: rules/ND601.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.facts import ScalerFacts
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import LoopContext


@dataclass(frozen=True)
class Options(RuleOptions):
    warmup: int = 20  # scaler steps of calibration: skips there are normal
    max_skips: int = 5  # skips after the warmup before reporting ...
    max_share: float = 0.01  # ... and their share of the steps after it
    max_run: int = 10  # consecutive skips after the warmup that are reported at once
    all_skipped: int = 10  # a run whose every step (at least this many) was skipped


def longest_run(steps: list[int]) -> int:
    """The longest stretch of consecutive step numbers in `steps` (sorted)."""
    best = run = 0
    previous = None
    for s in steps:
        run = run + 1 if previous is not None and s == previous + 1 else 1
        best = max(best, run)
        previous = s
    return best


def check(ctx: LoopContext, options: Options) -> Iterator[Finding]:
    for f in ctx.loop.scalers:
        if not f.enabled or not f.steps:
            continue
        late = [s for s in f.skipped if s > options.warmup]
        judged = f.steps - options.warmup
        every = len(f.skipped) == f.steps >= options.all_skipped
        too_many = judged > 0 and len(late) > max(options.max_skips, options.max_share * judged)
        too_long = longest_run(late) >= options.max_run
        collapsed = f.min_scale is not None and f.min_scale < 1
        if not (every or too_many or too_long or collapsed):
            continue
        yield _finding(f, options, every, collapsed)


def _finding(f: ScalerFacts, options: Options, every: bool, collapsed: bool) -> Finding:
    n = len(f.skipped)
    losses = f.skipped_losses
    nonfinite = sum(1 for v in losses if not math.isfinite(v))
    forward = nonfinite > len(losses) / 2
    scale = f.min_scale
    scale_text = (
        f"; its scale fell from {f.initial_scale:g} to {scale:.3g}"
        if scale is not None and f.initial_scale is not None and scale < f.initial_scale
        else ""
    )
    what = "every one" if every else f"{n}"
    message = f"{f.label} skipped {what} of {f.steps} optimizer steps{scale_text}"
    if collapsed:
        message += " (below 1: PyTorch's GradScaler documents this as a sign something is wrong)"
    if forward:
        where = f" in module {f.overflow_module}" if f.overflow_module else ""
        message += (
            f". The loss itself was NaN/Inf on {nonfinite} of the skipped steps: the forward "
            f"overflows float16 (past 65504){where}, so the scaler skips and shrinks its scale "
            "in vain: the model never trains (see ND401 for the module and its inputs)."
        )
        fix = Fix(
            "keep float16 from overflowing in the forward: normalize the inputs (raw sensor or "
            "pixel counts), run the overflowing module in float32, or train in bfloat16",
            "x = (x - mean) / std                      # inputs near unit scale\n"
            "# or keep the overflowing module in float32:\n"
            "with torch.autocast(device_type, enabled=False):\n"
            "    out = module(x.float())\n"
            "# or: torch.autocast(device_type, dtype=torch.bfloat16), without a GradScaler\n",
        )
        location = f.scale_site or f.step_site
    else:
        message += (
            ". The loss was finite on these steps: the gradients overflow float16 once "
            "multiplied by the scale, step after step -- more than the scaler's calibration "
            f"(a few skips in the first steps, then one in hundreds; threshold: more than "
            f"{options.max_skips} after step {options.warmup}, or {options.max_run} in a row)."
        )
        fix = Fix(
            "find what makes the gradients huge: a loss summed instead of averaged "
            "(reduction='mean'), a learning rate too high; or train in bfloat16",
            "loss = F.cross_entropy(logits, y)        # reduction='mean', not 'sum'\n"
            "# or: torch.autocast(device_type, dtype=torch.bfloat16), without a GradScaler\n",
        )
        location = f.step_site
    return RULE.finding(
        message,
        location=location,
        fix=fix,
        evidence={
            "scaler": f.label,
            "steps": f.steps,
            "skipped": n,
            "first_skipped": f.skipped[0] if f.skipped else None,
            "nonfinite_losses": nonfinite,
            "initial_scale": f.initial_scale,
            "min_scale": scale,
            "overflow_module": f.overflow_module,
        },
        impact=15.0 if every or collapsed else 9.0,
        severity=Severity.ERROR if every or collapsed else None,
    )


RULE = Rule(
    "ND601",
    "amp-skipped-steps",
    Severity.WARNING,
    Stage.LOOP,
    summary="a GradScaler skips step after step (inf/NaN every time) or its scale collapses",
    check=check,
    options=Options,
    causes=("ND605",),  # the module whose float16 output overflowed, when one was measured
    fixture=Fixture("run", ("fixtures/loops/amp_overflow.py",)),
    healthy=Fixture("run", ("fixtures/loops/amp_fp16_healthy.py",)),
)
