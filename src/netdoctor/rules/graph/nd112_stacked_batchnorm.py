"""ND112 stacked-batchnorm: a BatchNorm feeding another BatchNorm, which cancels the first one's
scale and shift (doc: rules/ND112.md)."""

from __future__ import annotations

from collections.abc import Iterator

from netdoctor.findings import Finding, Severity
from netdoctor.graph.ir import Graph, Node
from netdoctor.graph.walks import data_consumers, data_inputs
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.graph.nd105_softmax_output import remove_op_fix

# Ops that keep every feature of the first norm's output a feature of the second's input: the
# second norm still sees each channel's scale and shift on their own (a flatten between a
# BatchNorm2d and a BatchNorm1d, an nn.Identity).
_FEATURE_KEEPING = {"identity", "reshape"}


def _next_norm(graph: Graph, node: Node, memo: dict[str, bool]) -> Node | None:
    """The BatchNorm module that is the only consumer of `node`'s output (through ops that keep
    its features), when it has no other data input."""
    consumers = data_consumers(graph, node.name, memo)
    while len(consumers) == 1 and consumers[0].op in _FEATURE_KEEPING:
        consumers = data_consumers(graph, consumers[0].name, memo)
    if len(consumers) != 1 or consumers[0].op != "batchnorm" or not consumers[0].module:
        return None
    second = consumers[0]
    return second if len(data_inputs(graph, second, memo)) == 1 else None


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
    graph = ctx.graph
    memo: dict[str, bool] = {}
    seen: set[str] = set()
    for first in graph.of_op("batchnorm"):
        affine = [p for p in first.params.values() if p.trainable]
        if not first.module or not affine or first.module in seen:
            continue  # a functional batch_norm (weight standardization), or nothing to cancel
        second = _next_norm(graph, first, memo)
        if second is None:
            continue
        seen.add(first.module)
        numel = sum(p.numel for p in affine)
        kind = first.attrs.get("type", "BatchNorm")
        message = (
            f"{first.label} ({kind}) feeds {second.label} "
            f"({second.attrs.get('type', 'BatchNorm')}) directly: in training the second "
            "normalizes each channel with the batch's mean and standard deviation, which "
            "removes the first one's per-channel shift exactly and its scale up to BatchNorm's "
            f"eps, so the first one's {numel} affine parameters get (almost) no gradient and "
            "stay at their initial values. The pair normalizes twice; one BatchNorm does the "
            "same job."
        )
        summary = f"remove {first.label}: {second.label} normalizes its output again"
        snippet = f"# drop {first.label}: {second.label} already normalizes each channel"
        yield RULE.finding(
            message,
            module=first.module,
            location=first.location,
            fix=remove_op_fix(first, summary, snippet, safe=False),
            evidence={"first": first.label, "second": second.label, "cancelled": numel},
            impact=0.2,
        )


RULE = Rule(
    "ND112",
    "stacked-batchnorm",
    Severity.INFO,
    Stage.GRAPH,
    summary="a BatchNorm feeding another BatchNorm, which cancels its scale and shift",
    check=check,
    options=NoOptions,
    fixture=Fixture("check", ("fixtures/sick/stacked_batchnorm.py:StackedBN",)),
    healthy=Fixture("check", ("fixtures/healthy/resnet.py:ResNet",)),
)
