"""ND001 trace-fallback: symbolic tracing failed and the report was built from a fallback (doc:
rules/ND001.md)."""

from __future__ import annotations

from collections.abc import Iterator

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
    out = ctx.outcome
    if out is None or not out.fallback_reason:
        return
    if out.graph is not None and out.input is not None:  # the hook fallback ran on the input
        how = (
            f"the graph was built from one recorded forward pass on a "
            f"{out.input.describe()} input instead, so branches that input did not take "
            "are not seen"
        )
    else:
        how = "no fallback was possible (no working input), so graph rules were skipped"
    root = out.graph.root_location if out.graph is not None else None
    yield RULE.finding(
        f"torch.fx could not trace the model ({out.fallback_reason}); {how}.",
        location=root,
        evidence={
            "fallback": "hooks" if out.graph is not None else None,
            "reason": out.fallback_reason,
        },
        fix=Fix(
            "nothing to fix for netdoctor; for a complete graph, keep Python control flow "
            "on tensor values out of forward (e.g. torch.where) and register submodules"
        ),
    )


RULE = Rule(
    "ND001",
    "trace-fallback",
    Severity.INFO,
    Stage.META,
    summary="symbolic tracing failed; the report was built from a fallback",
    check=check,
    options=NoOptions,
    fixture=Fixture("check", ("fixtures/sick/untraceable_plain.py:GatedDeepNet",)),
    healthy=Fixture("check", ("fixtures/healthy/mlp_normalized.py:MLP",)),
)
