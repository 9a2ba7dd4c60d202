"""ND111 redundant-activation: the same idempotent activation applied twice in a row (doc:
rules/ND111.md)."""

from __future__ import annotations

from collections.abc import Iterator

from netdoctor.findings import Finding, Severity
from netdoctor.graph.ir import Node
from netdoctor.graph.walks import call_site, data_inputs, is_constant, op_label
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.graph.nd105_softmax_output import remove_op_fix

_IDEMPOTENT = {"relu", "relu6", "hardtanh"}
# "In a row": only ops that move values around without computing (a max-pool between two ReLUs
# also makes the second redundant, but that is the ordinary conv-relu-pool-block layout).
_RANGE_KEEPING = {"reshape", "identity", "getitem"}


def _same_activation(a: Node, b: Node) -> bool:
    if a.op != b.op:
        return False
    if a.op == "hardtanh":
        keys = ("min_val", "max_val")
        return all(k in a.attrs and a.attrs.get(k) == b.attrs.get(k) for k in keys)
    return True


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
    graph = ctx.graph
    memo: dict[str, bool] = {}
    seen_lines: set = set()
    for second in graph.of_op(*_IDEMPOTENT):
        if len(data_inputs(graph, second, memo)) != 1:
            continue
        through = _RANGE_KEEPING | ({"dropout"} if second.op == "relu" else set())
        producers = [
            n
            for n in graph.upstream(second.name, through=through)
            if not is_constant(graph, n.name, memo)
        ]
        if len(producers) != 1 or not _same_activation(producers[0], second):
            continue
        first = producers[0]
        where = second.location if second.module else call_site(second)
        if where is not None:
            if where in seen_lines:
                continue  # the same line of code run again (a block used twice)
            seen_lines.add(where)
        kind = second.attrs.get("type", second.op)
        message = (
            f"{op_label(second)} is applied to the output of {op_label(first)}, "
            f"the same activation: {second.op} is idempotent ({second.op}({second.op}(x)) = "
            f"{second.op}(x)), so the second one does nothing but cost a pass over the "
            "tensor. Often a sign that a layer was meant to sit between them."
        )
        summary = f"remove the second {kind} " + (
            f"({second.module})" if second.module else f"(line {where.line})" if where else ""
        )
        snippet = f"# drop {second.label}: it repeats {first.label}"
        yield RULE.finding(
            message,
            module=second.module,
            location=where,
            fix=remove_op_fix(second, summary, snippet, safe=True),
            evidence={"first": first.label, "second": second.label, "activation": second.op},
            impact=0.1,
        )


RULE = Rule(
    "ND111",
    "redundant-activation",
    Severity.INFO,
    Stage.GRAPH,
    summary="the same idempotent activation applied twice in a row",
    check=check,
    options=NoOptions,
    fixture=Fixture("check", ("fixtures/sick/double_relu.py:DoubleReLU",)),
    healthy=Fixture("check", ("fixtures/healthy/lenet_relu.py:LeNet",)),
)
