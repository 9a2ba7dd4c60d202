"""ND403 vanishing-gradients: the first layers' gradients orders of magnitude below the last
layers' (doc: rules/ND403.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.record import TrainingRun
from netdoctor.measure.summary import (
    gradient_ends,
    layer_grad,
)
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.graph.nd101_deep_plain_stack import batchnorm_remedy
from netdoctor.rules.numbers import g
from netdoctor.rules.runtime._common import (
    site,
)
from netdoctor.rules.verification import Remedy, RemedyContext, SymptomSpec


@dataclass(frozen=True)
class Options(RuleOptions):
    min_first_last_ratio: float = 1e-2
    min_grad_norm: float = 1e-7


def check(ctx: RuntimeContext, options: Options) -> Iterator[Finding]:
    run = ctx.run
    if run.steps_run < 1:
        return
    min_ratio = options.min_first_last_ratio
    min_norm = options.min_grad_norm
    rows = [(p, v) for p in run.weight_layers() if (v := layer_grad(p)) is not None]
    ends = gradient_ends(run)
    if ends is None:
        return
    first, g_first, last, g_last = ends
    ratio = g_first / g_last
    live = [(p, v) for p, v in rows if v > 0]
    tiny = [(p, v) for p, v in live if v < min_norm]
    reasons = []
    if ratio < min_ratio:
        reasons.append(
            f"the first weight layer's gradient, relative to its weight ({first.module}: "
            f"{g(g_first)}), is {g(ratio)} of the last one's ({last.module}: {g(g_last)}); "
            f"threshold {g(min_ratio)}"
        )
    if tiny:
        reasons.append(
            f"{len(tiny)} layer(s) have gradient norms below {g(min_norm)} "
            f"({', '.join(f'{p.module}: {g(v)}' for p, v in tiny[:4])})"
        )
    if not reasons:
        return
    decades = math.log10(1 / ratio) if 0 < ratio < 1 else None
    message = (
        "vanishing gradients: "
        + "; ".join(reasons)
        + ". The early layers barely learn"
        + (
            f": the gradient loses {decades:.1f} orders of magnitude from output to input."
            if decades
            else "."
        )
    )
    saturating = any(a.kind in ("sigmoid", "tanh") for a in run.activations)
    if saturating:
        fix = Fix(
            "use ReLU instead of sigmoid/tanh in hidden layers, insert BatchNorm after the "
            "hidden conv/linear layers, or add residual connections",
            "nn.Linear(256, 256),\nnn.BatchNorm1d(256),   # normalize before the "
            "activation\nnn.ReLU(),             # instead of nn.Sigmoid()\n",
        )
    else:
        fix = Fix(
            "insert BatchNorm after the hidden conv/linear layers, or add residual connections",
            "nn.Conv2d(64, 64, 3, padding=1, bias=False),\nnn.BatchNorm2d(64),\n"
            "nn.ReLU(),\n# or a residual block: return torch.relu(x + self.body(x))\n",
        )
    yield RULE.finding(
        message,
        module=first.module,
        location=site(run, first.module),
        fix=fix,
        evidence={
            "first_last_ratio": ratio,
            "first_layer": first.module,
            "last_layer": last.module,
            "first_relative_grad": g_first,
            "last_relative_grad": g_last,
            "layers": {p.module: v for p, v in rows},
        },
        impact=6.0,
    )


def gradient_ratio(run: TrainingRun, options: Options) -> float | None:
    ends = gradient_ends(run)
    return None if ends is None else ends[1] / ends[3]


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """With no root cause found: BatchNorm after every hidden weight layer (in a copy)."""
    if finding.cause is not None:
        return None
    layers = list(dict.fromkeys(p.module for p in context.run.weight_layers()))
    return batchnorm_remedy(finding.rule, layers)


RULE = Rule(
    "ND403",
    "vanishing-gradients",
    Severity.WARNING,
    Stage.RUNTIME,
    summary="early layers' gradients orders of magnitude below the last layers'",
    check=check,
    options=Options,
    causes=(
        "ND102",
        "ND101",
        "ND405",
        "ND202",
        "ND204",
        "ND302",
        "ND301",
        "ND406+",
        "ND404",
    ),
    symptoms=(
        SymptomSpec(
            "first/last layer gradient ratio",
            "ratio",
            "higher",
            gradient_ratio,
            threshold=lambda o: o.min_first_last_ratio,
        ),
    ),
    remedy=remedy,
    fixture=Fixture(
        "probe", ("fixtures/sick/lenet_sigmoid.py:LeNet", "--data", "synthetic", "--steps", "100")
    ),
    healthy=Fixture(
        "probe", ("fixtures/healthy/lenet_relu.py:LeNet", "--data", "synthetic", "--steps", "100")
    ),
)
