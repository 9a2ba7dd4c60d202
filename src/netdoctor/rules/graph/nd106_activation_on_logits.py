"""ND106 activation-on-logits: a ReLU-family activation after the final layer (doc:
rules/ND106.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from netdoctor.findings import Finding, Severity
from netdoctor.graph.ir import WEIGHT_OPS, Graph, Node
from netdoctor.graph.walks import call_site, op_label, output_producers
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.graph.nd105_softmax_output import (
    LOGIT_PASS,
    remove_op_fix,
    remove_output_activation,
)

_CLAMPING = {"relu", "relu6", "elu", "selu", "softplus"}

_CLAMP_WHY = {
    "relu": "a ReLU clamps every logit at 0 from below and passes no gradient where a logit is "
    "negative: a class whose logit goes negative for an input gets no gradient to "
    "recover, and the model cannot express 'surely not this class'",
    "relu6": "a ReLU6 clamps logits to [0, 6] and passes no gradient outside that range",
    "elu": "an ELU bounds logits below by -1 and saturates there (vanishing gradient)",
    "selu": "a SELU bounds logits below by -1.76 and saturates there (vanishing gradient)",
    "softplus": "a Softplus keeps logits positive and flattens (vanishing gradient) for "
    "negative pre-activations",
}


_POOLS = {"avgpool", "maxpool", "mean"}


def _reduces(graph: Graph, node: Node) -> bool:
    """Whether a pooling node returns fewer values per sample than it reads (it pools over
    positions); a mean reduces by definition."""
    if node.op == "mean":
        return True
    source = graph.nodes.get(node.inputs[0]) if node.inputs else None
    if node.shape is None or source is None or source.shape is None:
        return False
    return math.prod(node.shape[1:]) < math.prod(source.shape[1:])


def pooled_scores(graph: Graph, act: Node) -> bool:
    """Whether every path from the activation to an output pools over positions first: the
    activation clamps a map of class scores (one per position, as in Network-in-Network and
    SqueezeNet's conv classifier), and each logit is the pool of that map. A class then gets
    gradient wherever one of its positions scores above zero, not only when its logit does: the
    clamp is a nonlinearity of the last hidden map, not of the logits."""
    stack, seen, reached = [s.name for s in graph.successors(act.name)], set(), False
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = graph.nodes[name]
        if node.op in _POOLS and _reduces(graph, node):
            reached = True
            continue
        if node.op == "output" or node.op not in LOGIT_PASS:
            return False
        stack.extend(s.name for s in graph.successors(name))
    return reached


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
    graph = ctx.graph
    producers = output_producers(graph, LOGIT_PASS)
    if not producers or any(p.op not in _CLAMPING for p in producers):
        return  # mixed outputs (e.g. mean and softplus(std) heads) are deliberate
    for act in producers:
        layers = [
            n
            for n in graph.upstream(act.name, through=LOGIT_PASS)
            if n.op != "param" and n.op != "size"
        ]
        if not layers or any(n.op not in WEIGHT_OPS for n in layers):
            continue
        if pooled_scores(graph, act):
            continue
        layer = layers[0]
        message = (
            f"{op_label(act)} is applied to the output of "
            f"the final layer {layer.label}: {_CLAMP_WHY[act.op]}. Cross-entropy wants "
            "unbounded logits; end the model with the weight layer."
        )
        summary = f"remove the {act.attrs.get('type', act.op)} after the final layer {layer.label}"

        snippet = (
            "# end forward with the final layer: return the logits unclamped\n"
            f"return logits  # not {act.op}(logits)"
        )
        yield RULE.finding(
            message,
            module=act.module or layer.module,
            location=act.location if act.module else call_site(act),
            fix=remove_op_fix(act, summary, snippet, safe=False),
            evidence={"activation": act.op, "final_layer": layer.label},
            impact=4.0,
        )


RULE = Rule(
    "ND106",
    "activation-on-logits",
    Severity.WARNING,
    Stage.GRAPH,
    summary="a ReLU-family activation after the final layer",
    check=check,
    options=NoOptions,
    remedy=remove_output_activation,
    fixture=Fixture("check", ("fixtures/sick/relu_logits.py:ReluLogitsNet",)),
    healthy=Fixture("check", ("fixtures/healthy/dcgan_generator.py:DCGANGenerator",)),
)
