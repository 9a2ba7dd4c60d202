"""ND507 loss-broadcast: a loss's input and target have different shapes that broadcast, so
every prediction is compared with every target (doc: rules/ND507.md)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import LoopContext
from netdoctor.rules.loop._common import user_file

if TYPE_CHECKING:
    from netdoctor.measure.facts import LossCallFacts


def check(ctx: LoopContext, options: NoOptions) -> Iterator[Finding]:
    loop = ctx.loop
    for c in loop.loss_calls():
        inp, tgt, both = c.input_shape, c.target_shape, c.broadcast_shape
        if not c.broadcast_calls or both is None or inp is None or tgt is None:
            continue  # (the watcher records the three shapes together)
        message = (
            f"{c.fn} compared an input of shape {tuple(inp)} with a target of shape "
            f"{tuple(tgt)}: they broadcast to {tuple(both)}, so every prediction is "
            f"compared with every target ({c.broadcast_calls} of {c.calls} calls). The "
            "loss is wrong and the model learns to predict the targets' mean."
        )
        fix = _broadcast_fix(c, inp, tgt, ctx.draft)
        yield RULE.finding(
            message,
            location=c.site,
            fix=fix,
            evidence={
                "loss": c.fn,
                "input_shape": list(inp),
                "target_shape": list(tgt),
                "broadcast_shape": list(both),
                "calls": c.broadcast_calls,
            },
            impact=12.0,
        )


def _broadcast_fix(
    c: LossCallFacts, inp: tuple[int, ...], tgt: tuple[int, ...], draft: bool
) -> Fix:
    from netdoctor.fixes.patch import diff_fix, wrap_call_argument

    if len(inp) == len(tgt) + 1 and inp[-1] == 1:
        index, suffix, what = 0, ".squeeze(-1)", "squeeze the input's trailing 1"
    elif len(tgt) == len(inp) + 1 and tgt[-1] == 1:
        index, suffix, what = 1, ".squeeze(-1)", "squeeze the target's trailing 1"
    else:
        index, suffix, what = 1, ".view_as(input)", "give the target the input's shape"
    summary = f"make the shapes equal ({what})"
    snippet = (
        "loss = criterion(pred.squeeze(-1), y)   # (N, 1) -> (N,), like y\n"
        if index == 0
        else "loss = criterion(pred, y.view_as(pred))\n"
    )
    site = c.site
    if (
        draft
        or site is None
        or site.line is None
        or not user_file(site)
        or suffix == ".view_as(input)"
    ):
        return Fix(summary, snippet)
    line = site.line
    return diff_fix(
        summary, site.path, lambda src: wrap_call_argument(src, line, index, suffix), snippet
    )


RULE = Rule(
    "ND507",
    "loss-broadcast",
    Severity.ERROR,
    Stage.LOOP,
    summary="loss input and target of different shapes that broadcast",
    check=check,
    options=NoOptions,
    fixture=Fixture("run", ("fixtures/loops/broadcast_mse.py",)),
    healthy=Fixture("run", ("fixtures/loops/gan.py",)),
)
