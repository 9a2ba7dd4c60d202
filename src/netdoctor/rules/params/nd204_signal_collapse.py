"""ND204 signal-collapse: activations shrink or grow across depth by orders of magnitude at init
(doc: rules/ND204.md)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Severity
from netdoctor.graph.init_values import (
    deliberate_scales,
    input_dependent,
    joins_input_free_value,
    live_at_init,
)
from netdoctor.graph.ir import WEIGHT_OPS, Graph, Node
from netdoctor.graph.walks import reaches_output_directly
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.graph.nd102_saturating_activation_chain import relu_fix
from netdoctor.rules.params.nd201_init_scale import following_activation, init_fix, nonlinearity_of


@dataclass(frozen=True)
class Options(RuleOptions):
    max_ratio: float = 1e5  # flag when the signal changes by more than this factor (either way)


# What float32 resolves: a deviation from the batch mean below this share of a tensor's RMS is
# rounding (one value computed for B samples differs by ~2^-23 = 1.2e-7 of itself between them),
# not a part that depends on the input.
_RESOLUTION = 1e-6


def same_for_every_sample(node: Node) -> bool:
    """Whether the layer's measured input was the same for every sample of the batch."""
    signal, rms = node.attrs.get("init_input_signal_rms"), node.attrs.get("init_input_rms")
    return signal is not None and rms is not None and signal <= _RESOLUTION * rms


def _resolved(node: Node) -> bool:
    """Whether the layer's input-dependent part stands out of float32 rounding of its output."""
    return node.attrs["init_signal_rms"] > _RESOLUTION * node.attrs.get("init_rms", 0.0)


def signal_chain(graph: Graph, dependent: set[str] | None = None) -> list[Node]:
    """Hidden weight layers with a measured output scale, in topological order: heads and
    constant-initialized layers left out, and so are the layers inside a residual branch that
    starts at zero gain (their output does not reach the model's output at initialization: the
    signal travels on the residual stream around them), and the layers that carry no signal
    because their input does not depend on the model's: computed from parameters or buffers
    alone (learned queries, positional tables), or selected from a concatenation with such a
    value and measured the same for every sample (a class token, `self.q(x[:, 0])`)."""
    chain, seen = [], set()
    live = live_at_init(graph)
    dependent = input_dependent(graph) if dependent is None else dependent
    for node in graph.topological():
        if node.op not in WEIGHT_OPS or "init_signal_rms" not in node.attrs:
            continue
        if node.name not in live or node.name not in dependent:
            continue
        if same_for_every_sample(node) and joins_input_free_value(graph, node, dependent):
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
    RMS relative to the start's, net of the learned gains that scale it on purpose
    (`gain_scales`)."""
    dependent = input_dependent(graph)
    chain = signal_chain(graph, dependent)
    inputs = [n for n in graph.of_op("input") if n.attrs.get("init_signal_rms")]
    start = inputs[0] if inputs else (chain[0] if chain else None)
    if start is None:
        return None, [], []
    scales = gain_scales(graph, [start, *chain], dependent)
    base = max(start.attrs["init_signal_rms"], _TINY) / scales[0]
    return (
        start,
        chain,
        [max(n.attrs["init_signal_rms"], _TINY) / s / base for n, s in zip(chain, scales[1:])],
    )


def gain_scales(graph: Graph, layers: list[Node], dependent: set[str] | None = None) -> list[float]:
    """The factor by which learned gains scale each layer's input on purpose (1.0 for most: see
    init_values.deliberate_scales). A LayerScale that starts at 1e-5 on a block without a shortcut
    scales everything after it down to the next normalization by 1e-5: that is the designer's
    choice, which training undoes in its first steps, not a collapse of the signal."""
    dependent = input_dependent(graph) if dependent is None else dependent
    scales = deliberate_scales(graph, dependent)
    return [
        # A reading lost in rounding (a bias far larger than what the input adds) is no measure
        # of the signal: it says only that the signal is that small or smaller, gains or not.
        max((scales[i] for i in n.inputs if i in scales), default=1.0) if _resolved(n) else 1.0
        for n in layers
    ]


def receiving_in_range(graph: Graph, start: Node, limit: float) -> set[str]:
    """The weight layers, the output layer included, whose measured input carries a signal in
    range: its input-dependent RMS relative to the start's, net of learned gains, within
    `limit` either way."""
    dependent = input_dependent(graph)
    live = live_at_init(graph)
    scales = deliberate_scales(graph, dependent)
    (start_scale,) = gain_scales(graph, [start], dependent)
    base = max(start.attrs["init_signal_rms"], _TINY) / start_scale
    found = set()
    for node in graph:
        signal, rms = node.attrs.get("init_input_signal_rms"), node.attrs.get("init_input_rms")
        if node.op not in WEIGHT_OPS or signal is None or rms is None:
            continue
        if node.name not in live or node.name not in dependent:
            continue
        resolved = signal > _RESOLUTION * rms
        scale = max((scales[i] for i in node.inputs if i in scales), default=1.0)
        ratio = max(signal, _TINY) / (scale if resolved else 1.0) / base
        if 1.0 / limit <= ratio <= limit:
            found.add(node.name)
    return found


def recovers(graph: Graph, node: Node, receiving: set[str]) -> bool:
    """Whether a layer that the signal reaches through this one receives a signal in range (a
    name in `receiving`): the small (or large) value here then does not carry on into depth. It
    sits inside a residual branch whose stream carries the signal around it (FocalNet's
    modulation, a product of small gates), on a side path that only mixes the data (a linear map
    of attention weights, talking-heads attention), or before a normalization that restores the
    scale. A collapse that compounds across depth reaches every layer after it, the output layer
    included."""
    stack, seen = [s.name for s in graph.successors(node.name)], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        if name in receiving:
            return True
        seen.add(name)
        stack.extend(s.name for s in graph.successors(name))
    return False


def check(ctx: GraphContext, options: Options) -> Iterator[Finding]:
    graph = ctx.graph
    limit = options.max_ratio
    start, chain, ratios = signal_ratios(graph)
    if start is None or len(chain) < 2:  # (a chain has a start)
        return
    start_value = start.attrs["init_signal_rms"]
    start_label = "the input" if start.op == "input" else start.label
    values = [n.attrs["init_signal_rms"] for n in chain]
    receiving = receiving_in_range(graph, start, limit)
    crossing = next(
        (
            (node, ratio)
            for node, ratio in zip(chain, ratios)
            if (ratio > limit or ratio < 1.0 / limit) and not recovers(graph, node, receiving)
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
    scales = gain_scales(graph, chain)
    gained = [g for g in scales if g != 1.0]
    if gained:
        message += (
            f" (Ratios are net of the learned gains on the path, such as a LayerScale, which "
            f"scale the signal by x{min(gained):.3g}..x{max(gained):.3g} on purpose.)"
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
                    **({"gain_scale": g} if g != 1.0 else {}),
                }
                for n, g in zip(chain, scales)
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
