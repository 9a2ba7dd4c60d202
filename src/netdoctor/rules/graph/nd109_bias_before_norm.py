"""ND109 bias-before-norm: a conv/linear bias immediately followed by BatchNorm is cancelled
(doc: rules/ND109.md)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.fixes.patch import diff_fix, set_keyword
from netdoctor.graph.ir import WEIGHT_OPS, Node
from netdoctor.graph.walks import data_consumers, data_inputs
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.graph.nd107_linear_collapse import describe

_CANCELLING_NORMS = {"batchnorm", "instancenorm"}  # per-channel mean subtracted: bias cancelled


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
    graph = ctx.graph
    memo: dict[str, bool] = {}
    seen: set[str] = set()
    groups: dict[object, list[tuple[Node, Node]]] = {}  # one finding per construction line
    for layer in graph.of_op(*WEIGHT_OPS):
        bias = layer.params.get("bias")
        key = layer.module or layer.name
        if not layer.attrs.get("has_bias") or bias is None or not bias.trainable or key in seen:
            continue
        consumers = data_consumers(graph, layer.name, memo)
        while len(consumers) == 1 and consumers[0].op == "identity":
            consumers = data_consumers(graph, consumers[0].name, memo)
        if len(consumers) != 1 or consumers[0].op not in _CANCELLING_NORMS:
            continue
        norm = consumers[0]
        if len(data_inputs(graph, norm, memo)) != 1:
            continue
        seen.add(key)
        groups.setdefault(layer.location or key, []).append((layer, norm))
    for pairs in groups.values():
        layer, norm = pairs[0]
        loc = layer.location
        numel = sum(lay.params["bias"].numel for lay, _ in pairs)
        kind = norm.attrs.get("type", norm.op)
        if len(pairs) == 1:
            who = f"{layer.label} ({describe(layer)}) has a bias, but its output goes"
        else:
            names = ", ".join(lay.label for lay, _ in pairs[:5]) + (
                ", ..." if len(pairs) > 5 else ""
            )
            who = (
                f"{len(pairs)} {layer.attrs.get('type', layer.op)} layers built on the same "
                f"line ({names}) have a bias, but each one's output goes"
            )
        message = (
            f"{who} straight into a {kind} ({norm.label}"
            + (", ..." if len(pairs) > 1 else "")
            + f"), which subtracts the per-channel mean: the {numel} bias values are "
            "cancelled exactly, get zero gradient and only cost memory (the norm's own "
            "shift, beta, plays the bias's role)."
        )
        summary = (
            "construct " + (layer.label if len(pairs) == 1 else "these layers") + " with bias=False"
        )
        snippet = f"nn.{layer.attrs.get('type', 'Conv2d')}(..., bias=False)"
        types = (layer.attrs["type"],) if layer.attrs.get("type") else ()
        line = loc.line if loc and loc.line else 0  # (no line: an ONNX node, nothing to edit)
        fix = (
            diff_fix(
                summary,
                loc.path if loc else None,
                partial(set_keyword, line=line, type_names=types, key="bias", value="False"),
                snippet,
            )
            if layer.module
            else Fix(summary, snippet, "snippet")
        )
        yield RULE.finding(
            message,
            module=layer.module,
            location=loc,
            fix=fix,
            evidence={
                "layers": [lay.label for lay, _ in pairs],
                "norms": [n.label for _, n in pairs],
                "bias_numel": numel,
            },
            impact=0.2,
        )


RULE = Rule(
    "ND109",
    "bias-before-norm",
    Severity.INFO,
    Stage.GRAPH,
    summary="a conv/linear bias immediately followed by BatchNorm is cancelled",
    check=check,
    options=NoOptions,
    fixture=Fixture("check", ("fixtures/sick/bias_before_bn.py:BiasBeforeBN",)),
    healthy=Fixture("check", ("fixtures/healthy/unet.py:UNet",)),
)
