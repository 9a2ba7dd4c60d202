"""ND106 activation-on-logits: a ReLU-family activation after the final layer (doc:
rules/ND106.md)."""

from __future__ import annotations

from collections.abc import Iterator

from netdoctor.findings import Finding, Severity
from netdoctor.graph.ir import WEIGHT_OPS
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
