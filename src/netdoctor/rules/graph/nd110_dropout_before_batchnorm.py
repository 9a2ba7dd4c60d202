"""ND110 dropout-before-batchnorm: dropout feeding BatchNorm shifts variance between train and
eval (doc: rules/ND110.md)."""

from __future__ import annotations

from collections.abc import Iterator

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.graph.walks import call_site
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
    graph = ctx.graph
    for drop in graph.of_op("dropout"):
        if drop.attrs.get("type") == "AlphaDropout" or drop.attrs.get("p") == 0:
            continue
        norms = [
            n
            for n in graph.downstream(drop.name, through={"reshape", "identity"})
            if n.op == "batchnorm"
        ]
        if not norms:
            continue
        norm = norms[0]
        p = drop.attrs.get("p")
        message = (
            f"{drop.label} ({drop.attrs.get('type', 'dropout')}"
            + (f", p={p:g}" if isinstance(p, float) else "")
            + f") feeds {norm.label} ({norm.attrs.get('type', 'BatchNorm')}): in training "
            "BatchNorm's running variance is estimated on dropout-scaled activations, "
            "in eval dropout is off and the variance is different, so eval outputs are "
            "shifted (the 'variance shift' of Li et al., 2019). Put dropout after the "
            "last BatchNorm (e.g. right before the classifier) instead."
        )
        snippet = (
            "# move the dropout after the BatchNorm (or after the last BatchNorm):\n"
            f"nn.{norm.attrs.get('type', 'BatchNorm1d')}(...),\n"
            f"nn.{drop.attrs.get('type', 'Dropout')}(p={p if p is not None else 0.5}),"
        )
        yield RULE.finding(
            message,
            module=drop.module,
            location=drop.location if drop.module else call_site(drop),
            fix=Fix(
                "move the dropout after the BatchNorm (or after the last BatchNorm), or remove it",
                snippet,
                "snippet",
                safe=False,
            ),
            evidence={"dropout": drop.label, "norm": norm.label, "p": p},
            impact=0.5,
        )


RULE = Rule(
    "ND110",
    "dropout-before-batchnorm",
    Severity.INFO,
    Stage.GRAPH,
    summary="dropout feeding BatchNorm shifts variance between train and eval",
    check=check,
    options=NoOptions,
    fixture=Fixture("check", ("fixtures/sick/dropout_bn.py:DropoutBeforeBN",)),
    healthy=Fixture("check", ("fixtures/healthy/alexnet_bn.py:AlexNetBN",)),
)
