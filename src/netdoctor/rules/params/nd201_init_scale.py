"""ND201 init-scale: weight std far from the fan-in-preserving scale for the following
activation (doc: rules/ND201.md)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.fixes.patch import append_to_init, diff_fix, nn_prefix, read
from netdoctor.graph.ir import MERGE_OPS, NORM_OPS, RELU_FAMILY, WEIGHT_OPS, Graph, Node
from netdoctor.graph.walks import (
    absorbed,
    data_inputs,
    is_constant,
    is_normalization,
    reaches_output_directly,
    self_normalized,
)
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.verification import Remedy, RemedyContext


@dataclass(frozen=True)
class Options(RuleOptions):
    factor: float = 3.0  # a layer counts when its weight std is this many times off its scale
    max_shrink: float = 24.0  # report a path whose counted layers shrink the signal more than this


# Ops between a layer and "the activation that follows it".
_TO_ACTIVATION = {
    "reshape",
    "identity",
    "dropout",
    "avgpool",
    "maxpool",
    "getitem",
    "pad",
    "upsample",
}
# Below this many weights a sample std is too noisy to judge (PyTorch's default init sits 2.45x
# below He; with 64 uniform weights the sample std's spread is ~6%, so 3x stays 3+ sigma away).
_MIN_WEIGHTS = 64
# kaiming_normal_'s nonlinearity argument for the activation that follows.
_NONLINEARITY = {"tanh": "tanh", "sigmoid": "sigmoid", "selu": "selu"}


def following_activation(graph: Graph, node: Node) -> Node | None:
    nxt = graph.downstream(node.name, through=_TO_ACTIVATION)
    return nxt[0] if len(nxt) == 1 and nxt[0].op != "output" else None


def nonlinearity_of(act: Node | None) -> str:
    if act is None:
        return "linear"
    if act.op in RELU_FAMILY and act.op not in ("selu",):
        return "leaky_relu" if act.op == "leaky_relu" else "relu"
    return _NONLINEARITY.get(act.op, "linear")


def _gain(nonlinearity: str, act: Node | None) -> float:
    """The fan-in-preserving gain the rule compares against: He sqrt(2) for the ReLU family
    (sqrt(2 / (1 + a^2)) for LeakyReLU), LeCun 1 for everything else."""
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = act.attrs.get("negative_slope", 0.01) if act is not None else 0.01
        return math.sqrt(2.0 / (1.0 + float(slope) ** 2))
    return 1.0


def fan_in(shape: tuple[int, ...]) -> int | None:
    """torch.nn.init's convention: weight.shape[1] * receptive field (conv: in/groups * k*k)."""
    if len(shape) < 2:
        return None
    return int(math.prod(shape[1:])) or None


def init_fix(graph: Graph, layers: list[Node], nonlinearity: str) -> Fix:
    """An init loop: a diff appending it to the model class's __init__ when that can be found,
    else a paste-ready snippet."""
    types = sorted({n.attrs["type"] for n in layers if n.attrs.get("type")}) or ["Linear"]
    summary = (
        "initialise the weights for the activation that follows: "
        f'nn.init.kaiming_normal_(m.weight, nonlinearity="{nonlinearity}") '
        "(fan-in-preserving: He for ReLU, LeCun gain for tanh/sigmoid/none)"
    )

    def code(prefix: str) -> str:
        classes = ", ".join(f"{prefix}{t}" for t in types)
        classes = f"({classes},)" if len(types) == 1 else f"({classes})"
        return (
            "for m in self.modules():\n"
            f"    if isinstance(m, {classes}):\n"
            f'        {prefix}init.kaiming_normal_(m.weight, nonlinearity="{nonlinearity}")\n'
            "        if m.bias is not None:\n"
            f"            {prefix}init.zeros_(m.bias)\n"
        )

    snippet = "# at the end of the model's __init__:\n" + code("nn.")
    root = graph.root_location
    if root is None or not root.line:
        return Fix(summary, snippet, "snippet")
    class_line = root.line
    prefix = nn_prefix(read(root.path) or "")
    return diff_fix(
        summary, root.path, lambda src: append_to_init(src, class_line, code(prefix)), snippet
    )


# Where a path of unnormalized layers starts afresh: the signal's scale there no longer depends
# on the layers before (normalized, or the sum/product with another data path), or it is the input.
_RESETS = NORM_OPS | {"input", "rnn", "attention"}
_MIXING = MERGE_OPS | {"mul", "div", "matmul"}


def layer_scale(graph: Graph, node: Node) -> dict[str, Any] | None:
    """How far a layer's weight std is from the fan-in-preserving scale for the activation that
    follows (ratio = std / target), or None when the weights say nothing about the init."""
    w = node.params.get("weight")
    if w is None or not w.trainable or w.all_equal or w.std <= 0:
        return None
    if w.numel < _MIN_WEIGHTS:
        return None  # too few weights for their std to say anything about the init
    if node.attrs.get("type") == "Bilinear" or node.attrs.get("no_grad"):
        return None
    n_in = fan_in(w.shape)
    if not n_in:
        return None
    act = following_activation(graph, node)
    nl = nonlinearity_of(act)
    target = _gain(nl, act) / math.sqrt(n_in)
    return {
        "node": node,
        "std": w.std,
        "target": target,
        "ratio": w.std / target,
        "fan_in": n_in,
        "activation": act.op if act is not None else None,
        "nonlinearity": nl,
        "head": reaches_output_directly(graph, node.name),
    }


def _unit_scale(node: Node, factor: float, computed: set[str]) -> bool:
    """A normalization whose output is at unit scale: no affine weight, or one whose RMS is
    within `factor` of 1 (a LayerNorm or BatchNorm as built; not one whose gain starts at 0).
    A normalization module of the model's own (a library's LayerNorm / RMSNorm class, which the
    graph sees as one opaque call: `hook_frontend.normalizes`) counts as one, and so does a
    normalization written out in forward (`computed`: x minus its mean, divided by the root of
    its own variance; its gain is a separate multiplication, judged by `_gain_rms`)."""
    if not is_normalization(node, computed):
        return False
    w = node.params.get("weight")
    if w is None:
        return True
    rms = math.sqrt(w.mean**2 + w.std**2)
    return 1.0 / factor <= rms <= factor


_GAIN_VIEWS = {"reshape", "getitem", "identity", "to", "type_as", "float"}


def _gain_rms(graph: Graph, node: Node, memo: dict[str, bool]) -> float | None:
    """The RMS of the learned gain a multiplication or division applies to the signal (a
    normalization's affine weight written out, a layer scale), seen through views; None when
    the node applies none."""
    if node.op not in ("mul", "div") or len(data_inputs(graph, node, memo)) != 1:
        return None
    for i, name in enumerate(node.inputs):
        prev = graph.nodes.get(name)
        while prev is not None and prev.op in _GAIN_VIEWS and len(prev.inputs) == 1:
            prev = graph.nodes.get(prev.inputs[0])
        if prev is None or prev.op != "param" or len(prev.params) != 1:
            continue
        if node.op == "div" and i == 0:
            return None  # a parameter divided by the signal: no gain
        (w,) = prev.params.values()
        rms = math.sqrt(w.mean**2 + w.std**2)
        return rms if node.op == "mul" else 1.0 / rms if rms > 0 else None
    return None


def _path_predecessors(
    graph: Graph, node: Node, memo: dict[str, bool], factor: float, computed: set[str]
) -> tuple[list[Node], bool]:
    """The nearest weight layers upstream of `node` on a path without a reset point between,
    and whether the walk stops only at normalizations whose output is at unit scale (no weight
    layer upstream: the path starts right after them, and no learned gain off unit scale, a
    layer scale, multiplies the signal on the way)."""
    found: list[Node] = []
    stack, seen = list(node.inputs), set()
    starts, normalized = 0, True
    while stack:
        name = stack.pop()
        if name in seen or name not in graph.nodes:
            continue
        seen.add(name)
        prev = graph.nodes[name]
        if prev.op in WEIGHT_OPS:
            found.append(prev)
        elif prev.op in _RESETS or is_normalization(prev, computed):
            starts += 1
            normalized = normalized and _unit_scale(prev, factor, computed)
        elif is_constant(graph, name, memo):
            continue
        elif prev.op in _MIXING and len(data_inputs(graph, prev, memo)) >= 2:
            starts += 1
            normalized = False
        else:
            gain = _gain_rms(graph, prev, memo)
            if gain is not None and not 1.0 / factor <= gain <= factor:
                normalized = False
            stack.extend(prev.inputs)
    return found, normalized and starts > 0 and not found


# A path that starts right after a unit-scale normalization and holds at most this many weight
# layers, the last of them the output layer, is a head: see init_scale_outliers.
_HEAD_LAYERS = 2


def init_scale_outliers(
    graph: Graph, factor: float, max_shrink: float
) -> tuple[list[dict], float, float]:
    """The layers whose init scale is a problem; the worst shrink factor along a path that holds
    a hidden layer more than `factor` below its scale (1.0 when none does); the largest ratio of
    a judged hidden layer's std to its scale (how far the worst one is above it).

    Too large is judged per layer: a hidden layer more than `factor` above its scale amplifies
    the signal (saturating the tanh/sigmoid after it, inflating the logits). Too small is judged
    along each path of unnormalized layers to the output: the shrink factors of the layers more
    than `factor` below their scale multiply, the output layer's included, and the path is
    reported when the product exceeds `max_shrink` and a hidden layer is among them. One hidden
    layer a few times small, or a small output layer on its own (recommended practice), is not.

    Nor is a head: a path that starts right after a normalization whose output is at unit scale
    and holds at most one hidden layer and the output layer (BERT's pooler + classifier,
    DistilBERT's pre_classifier + classifier, a MobileNet's classifier). A layer's weight
    gradient is shrunk by the small layers in front of it (its input) and behind it (the
    gradient it receives), all but its own: with two layers on the path each gets one factor, as
    with one small layer alone, and the unit-scale input makes the product only the logits'
    initial scale, small on purpose. From the model input (whose scale is the data's), a merge
    or a recurrent/attention output, and along three layers or more, the product counts.
    """
    memo: dict[str, bool] = {}
    computed = self_normalized(graph)
    scales: dict[str, dict | None] = {}
    judged: dict[str, dict | None] = {}
    for node in graph.topological():
        if node.op not in WEIGHT_OPS:
            continue
        key = node.module or node.name
        if key not in scales:
            scales[key] = layer_scale(graph, node)
        if absorbed(graph, node.name, memo, computed):
            continue  # normalized afterwards, or inside a residual branch / gate
        judged[node.name] = scales[key]
    # Along paths, ending at each layer: the sum of log shrink factors, the layers that
    # contributed, the number of weight layers on the path, whether it starts right after a
    # unit-scale normalization.
    paths: dict[str, tuple[float, list[dict], int, bool]] = {}
    limit = math.log(max_shrink)
    worst, largest = 0.0, 0.0
    offending: dict[str, dict[str, Any]] = {}
    grow: dict[str, dict[str, Any]] = {}
    for name, info in judged.items():
        node = graph.nodes[name]
        preds, after_norm = _path_predecessors(graph, node, memo, factor, computed)
        before = [paths[p.name] for p in preds if p.name in paths]
        total, layers, depth, after_norm = max(
            before, key=lambda t: t[0], default=(0.0, [], 0, after_norm)
        )
        depth += 1
        if info is not None and info["ratio"] < 1.0 / factor:
            total, layers = total + math.log(1.0 / info["ratio"]), layers + [info]
        paths[name] = (total, layers, depth, after_norm)
        if info is not None and not info["head"]:
            largest = max(largest, info["ratio"])
            if info["ratio"] > factor:
                grow[info["node"].name] = info  # a module called twice is one layer
        if after_norm and depth <= _HEAD_LAYERS and reaches_output_directly(graph, name):
            continue  # a head on a normalized signal: its small scale is the logits' start
        if any(not i["head"] for i in layers):
            worst = max(worst, total)
            if total > limit:
                offending.update((i["node"].name, i) for i in layers)
    bad = {**offending, **grow}
    order = {n.name: i for i, n in enumerate(graph.topological())}
    found = sorted(bad.values(), key=lambda i: order[i["node"].name])
    return found, math.exp(worst), largest


def check(ctx: GraphContext, options: Options) -> Iterator[Finding]:
    graph = ctx.graph
    if graph.frontend == "onnx":
        return  # exported weights are usually trained ones: their scale says nothing of init
    factor = options.factor
    max_shrink = options.max_shrink
    bad, shrink, _ = init_scale_outliers(graph, factor, max_shrink)
    if not bad:
        return
    parts = []
    for b in bad[:4]:
        node = b["node"]
        scale = (
            "He sqrt(2/fan_in)"
            if b["nonlinearity"] in ("relu", "leaky_relu")
            else "LeCun sqrt(1/fan_in)"
        )
        after = f"the {b['activation']} that follows" if b["activation"] else "no activation"
        direction = "below" if b["ratio"] < 1 else "above"
        times = 1 / b["ratio"] if b["ratio"] < 1 else b["ratio"]
        role = " (the output layer)" if b["head"] else ""
        parts.append(
            f"{node.label}{role} weight std {b['std']:.3g} is {times:.1f}x {direction} "
            f"the {scale} = {b['target']:.3g} for fan-in {b['fan_in']} and {after}"
        )
    more = f" (and {len(bad) - 4} more layers)" if len(bad) > 4 else ""
    effects = []
    if shrink > max_shrink:
        effects.append(
            f"in series, with no normalization between, these layers shrink the "
            f"signal {shrink:.3g}x on its way to the output (and the gradient on its "
            "way back), so the first layers start out learning far slower than the "
            "last"
        )
    if any(b["ratio"] > factor for b in bad):
        effects.append(
            "a layer above its scale amplifies the signal by that factor: "
            "activations and gradients blow up (loss NaN) or saturate"
        )
    message = (
        f"{'; '.join(parts)}{more}: {'; '.join(effects)}. Thresholds: a hidden layer "
        f"{factor:g}x above its scale, or a {max_shrink:g}x shrink along a path of "
        f"layers each {factor:g}x or more below it (PyTorch's default init is 2.4x below "
        "He and never counts; one such layer, or a small output layer, alone is fine)."
    )
    hidden = [b for b in bad if not b["head"]] or bad
    common = Counter(b["nonlinearity"] for b in hidden).most_common(1)[0][0]
    first = bad[0]["node"]
    yield RULE.finding(
        message,
        module=first.label,
        location=first.location,
        fix=init_fix(graph, [b["node"] for b in bad], common),
        evidence={
            "factor": factor,
            "max_shrink": max_shrink,
            "shrink": shrink,
            "layers": [
                {
                    "module": b["node"].label,
                    "std": b["std"],
                    "expected": b["target"],
                    "ratio": b["ratio"],
                    "fan_in": b["fan_in"],
                    "activation": b["activation"],
                    "output_layer": b["head"],
                }
                for b in bad
            ],
        },
        impact=5.0 + len(bad),
    )


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """Every reported layer re-initialised at its fan-in-preserving scale, in a copy of the
    model."""
    from netdoctor.fixes.memory import init_scale

    layers = [
        (d["module"], float(d["expected"]))
        for d in finding.evidence.get("layers", [])
        if isinstance(d, dict) and d.get("module") and d.get("expected")
    ]
    return (
        Remedy(
            RULE.id,
            f"{len(layers)} layer(s) re-initialised at the fan-in-preserving scale",
            "model",
            model_fn=init_scale(layers),
        )
        if layers
        else None
    )


RULE = Rule(
    "ND201",
    "init-scale",
    Severity.WARNING,
    Stage.PARAMS,
    summary="weight std far from the fan-in-preserving scale for the following activation",
    check=check,
    options=Options,
    consequence="ND403",
    remedy=remedy,
    fixture=Fixture("check", ("fixtures/sick/mlp.py:MLP",)),
    healthy=Fixture("check", ("fixtures/healthy/mlp_normalized.py:MLP",)),
)
