"""ND204 signal-collapse: activations shrink or grow across depth by orders of magnitude at init
(doc: rules/ND204.md)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Severity
from netdoctor.graph.ir import WEIGHT_OPS, Graph, Node
from netdoctor.graph.walks import live_at_init, reaches_output_directly
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.graph.nd102_saturating_activation_chain import relu_fix
from netdoctor.rules.params.nd201_init_scale import following_activation, init_fix, nonlinearity_of


@dataclass(frozen=True)
class Options(RuleOptions):
    max_ratio: float = 1e5  # flag when the signal changes by more than this factor (either way)


def signal_chain(graph: Graph) -> list[Node]:
    """Hidden weight layers with a measured output scale, in topological order: heads and
    constant-initialized layers left out, and so are the layers inside a residual branch that
    starts at zero gain (their output does not reach the model's output at initialization: the
    signal travels on the residual stream around them)."""
    chain, seen = [], set()
    live = live_at_init(graph)
    for node in graph.topological():
        if node.op not in WEIGHT_OPS or "init_signal_rms" not in node.attrs:
            continue
        if node.name not in live:
            continue
        key = node.module or node.name
        w = node.params.get("weight")
        if key in seen or (w is not None and w.all_equal):
            continue
        seen.add(key)
        if reaches_output_directly(graph, node.name):
            continue
        chain.append(node)
    return chain


_TINY = 1e-30


def signal_ratios(graph: Graph) -> tuple[Node | None, list[Node], list[float]]:
    """Where the signal is measured from (the input when its RMS was measured, else the chain's
    first layer; None when there is no chain), the signal chain, and each chain layer's signal
    RMS relative to the start's."""
    chain = signal_chain(graph)
    inputs = [n for n in graph.of_op("input") if n.attrs.get("init_signal_rms")]
    start = inputs[0] if inputs else (chain[0] if chain else None)
    if start is None:
        return None, [], []
    base = max(start.attrs["init_signal_rms"], _TINY)
    return start, chain, [max(n.attrs["init_signal_rms"], _TINY) / base for n in chain]


def check(ctx: GraphContext, options: Options) -> Iterator[Finding]:
    graph = ctx.graph
    limit = options.max_ratio
    start, chain, ratios = signal_ratios(graph)
    if start is None or len(chain) < 2:  # (a chain has a start)
        return
    start_value = start.attrs["init_signal_rms"]
    start_label = "the input" if start.op == "input" else start.label
    values = [n.attrs["init_signal_rms"] for n in chain]
    crossing = next(
        (
            (node, ratio)
            for node, ratio in zip(chain, ratios)
            if ratio > limit or ratio < 1.0 / limit
        ),
        None,
    )
    if crossing is None:
        return
    node, _ = crossing
    last = chain[-1]
    end_ratio = ratios[-1]
    lo, hi = min(values), max(values)
    grows = end_ratio > 1 if (end_ratio > limit or end_ratio < 1 / limit) else crossing[1] > 1
    verb = "grows" if grows else "shrinks"
    message = (
        f"at initialization the signal {verb} by orders of magnitude across depth: on a "
        f"unit-variance batch, the input-dependent RMS is {start_value:.3g} at "
        f"{start_label}, {node.attrs['init_signal_rms']:.3g} at {node.label} and "
        f"{values[-1]:.3g} at {last.label} (x{end_ratio:.3g} over {len(chain)} hidden "
        f"layers; range {lo:.3g}..{hi:.3g}). "
        + (
            "Deep layers receive (and send back) almost no signal: the loss barely moves."
            if not grows
            else "Activations and gradients explode: loss NaN or saturated units."
        )
        + f" Threshold: x{limit:g} either way."
    )
    acts = [following_activation(graph, n) for n in chain]
    nl = Counter(nonlinearity_of(a) for a in acts).most_common(1)[0][0]
    if nl == "sigmoid":
        # No init scale carries a signal through a sigmoid chain (slope <= 1/4 per layer, mean
        # 0.5): the activation is the cause, so the fix is ND102's.
        fix = relu_fix([a for a in acts if a is not None and a.op in ("sigmoid", "tanh")])
    else:
        fix = init_fix(graph, chain, nl)
    yield RULE.finding(
        message,
        module=node.label,
        location=node.location,
        fix=fix,
        evidence={
            "max_ratio": limit,
            "start": start_value,
            "end_ratio": end_ratio,
            "layers": [
                {
                    "module": n.label,
                    "signal_rms": n.attrs["init_signal_rms"],
                    "rms": n.attrs.get("init_rms"),
                }
                for n in chain
            ],
        },
        impact=6.0,
    )


RULE = Rule(
    "ND204",
    "signal-collapse",
    Severity.WARNING,
    Stage.PARAMS,
    summary="activations shrink or grow across depth by orders of magnitude at init",
    check=check,
    options=Options,
    consequence="ND403",
    fixture=Fixture("check", ("fixtures/sick/bad_init.py:DeepTanhMLP",)),
    healthy=Fixture("check", ("fixtures/healthy/nf_resnet.py:NFResNet",)),
)
