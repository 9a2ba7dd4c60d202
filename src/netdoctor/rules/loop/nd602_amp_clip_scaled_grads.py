"""ND602 amp-clip-scaled-grads: gradients clipped while a GradScaler's scale still multiplies
them (`unscale_` missing before `clip_grad_norm_`) (doc: rules/ND602.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Location, Severity
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import LoopContext
from netdoctor.rules.loop._common import line_fix, scaler_names


@dataclass(frozen=True)
class Options(RuleOptions):
    min_clips: int = 2  # clips of scaled gradients before reporting


def check(ctx: LoopContext, options: Options) -> Iterator[Finding]:
    for f in ctx.loop.scalers:
        if not f.enabled or f.scaled_clips < options.min_clips:
            continue
        fn = "clip_grad_norm_" if f.clip_kind == "norm" else "clip_grad_value_"
        limit = f"{f.clip_limit:g}" if f.clip_limit is not None else "its limit"
        scale = f.clip_scale
        seen = f.clip_seen_norm
        if f.clip_kind == "norm" and seen is not None and scale:
            measured = (
                f"It measured a total norm of {seen:.4g} = {scale:g} (the scale) x "
                f"{seen / scale:.3g} (the true norm)"
            )
            effect = (
                f"every step is clipped to max_norm / scale = {f.clip_limit or 0:g} / {scale:g}"
                " once the scaler divides the gradients back: the updates shrink by the scale "
                "and the loss barely moves"
            )
        else:
            measured = f"the gradients were {scale:g}x their true size" if scale else "scaled"
            effect = "the limit applies to scaled values, so the real gradients are cut far "
            effect += "below it"
        message = (
            f"{fn}(..., {limit}) ran on gradients still multiplied by {f.label}'s scale, in "
            f"{f.scaled_clips} of {f.clips} clips: no scaler.unscale_(optimizer) before it. "
            f"{measured}; {effect}."
        )
        yield RULE.finding(
            message,
            location=f.clip_site,
            fix=_unscale_fix(f.clip_site, f.step_site, ctx.draft),
            evidence={
                "scaler": f.label,
                "scaled_clips": f.scaled_clips,
                "clips": f.clips,
                "clip": fn,
                "limit": f.clip_limit,
                "seen_norm": seen,
                "scale": scale,
            },
            impact=14.0,
        )


def _unscale_fix(clip_site: Location | None, step_site: Location | None, draft: bool) -> Fix:
    from netdoctor.fixes.patch import insert_statement_before

    scaler, optimizer = scaler_names(step_site)
    statement = f"{scaler}.unscale_({optimizer})"
    summary = f"call {statement} before clipping, so the clip sees the true gradients"
    snippet = (
        f"{scaler}.scale(loss).backward()\n{statement}\n"
        f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)\n"
        f"{scaler}.step({optimizer})\n{scaler}.update()\n"
    )
    return line_fix(
        summary,
        snippet,
        clip_site,
        draft,
        lambda src, line: insert_statement_before(src, line, statement),
    )


RULE = Rule(
    "ND602",
    "amp-clip-scaled-grads",
    Severity.ERROR,
    Stage.LOOP,
    summary="gradients clipped before scaler.unscale_(): the clip sees them times the scale",
    check=check,
    options=Options,
    fixture=Fixture("run", ("fixtures/loops/amp_clip_scaled.py",)),
    healthy=Fixture("run", ("fixtures/loops/amp_fp16_healthy.py",)),
)
