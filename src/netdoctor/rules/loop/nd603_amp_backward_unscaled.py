"""ND603 amp-backward-unscaled: backward runs on the plain loss while a GradScaler steps, so
every update is divided by the scale (doc: rules/ND603.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Location, Severity
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import LoopContext
from netdoctor.rules.loop._common import line_fix, scaler_names


@dataclass(frozen=True)
class Options(RuleOptions):
    min_steps: int = 3  # scaler steps with only unscaled backwards before reporting
    min_share: float = 0.9  # ... and their share of the scaler's steps


def check(ctx: LoopContext, options: Options) -> Iterator[Finding]:
    for f in ctx.loop.scalers:
        n = f.unscaled_backward_steps
        if not f.enabled or n < options.min_steps or n / max(1, f.steps) < options.min_share:
            continue
        scale = f.min_scale if f.min_scale is not None else f.initial_scale
        factor = f"{scale:g}x" if scale else "the scale"
        message = (
            f"backward ran on the plain loss, not on {f.label}.scale(loss), before {n} of its "
            f"{f.steps} steps: scaler.step() still divides every gradient by its scale, so the "
            f"updates are {factor} too small and the model does not learn (and no step is ever "
            "skipped, so nothing looks wrong)."
        )
        yield RULE.finding(
            message,
            location=f.unscaled_backward_site,
            fix=_scale_fix(f.unscaled_backward_site, f.step_site, ctx.draft),
            evidence={
                "scaler": f.label,
                "unscaled_backward_steps": n,
                "steps": f.steps,
                "scale": scale,
            },
            impact=15.0,
        )


def _scale_fix(backward_site: Location | None, step_site: Location | None, draft: bool) -> Fix:
    from netdoctor.fixes.patch import wrap_receiver

    scaler, _ = scaler_names(step_site)
    summary = f"backward on the scaled loss: {scaler}.scale(loss).backward()"
    snippet = f"{scaler}.scale(loss).backward()\n"
    wrapper = f"{scaler}.scale"
    return line_fix(
        summary,
        snippet,
        backward_site,
        draft,
        lambda src, line: wrap_receiver(src, line, "backward", wrapper),
    )


RULE = Rule(
    "ND603",
    "amp-backward-unscaled",
    Severity.ERROR,
    Stage.LOOP,
    summary="backward on the plain loss while a GradScaler steps: updates divided by the scale",
    check=check,
    options=Options,
    fixture=Fixture("run", ("fixtures/loops/amp_backward_unscaled.py",)),
    healthy=Fixture("run", ("fixtures/loops/amp_fp16_healthy.py",)),
)
