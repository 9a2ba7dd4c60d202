"""ND101 deep-plain-stack: many weight layers in series with no normalization and no skip
connection (doc: rules/ND101.md)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.fixes.patch import arg_code, diff_fix, insert_args_after, nn_prefix, read
from netdoctor.graph.ir import MERGE_OPS, WEIGHT_OPS, Graph, Node
from netdoctor.graph.walks import (
    is_constant,
    is_normalization,
    self_normalized,
    standardized_weight,
)
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.verification import Remedy, RemedyContext

if TYPE_CHECKING:
    import libcst as cst


@dataclass(frozen=True)
class Options(RuleOptions):
    min_depth: int = 7  # weight layers in series that count as deep


# How far the gains of a He-initialized chain may compound away from 1 (RMS factor, either way)
# and the chain still count as scale-preserving: one layer left at another library default (a
# classifier at N(0, 0.01), 2.2x below He) is no drift; PyTorch's default init, 2.45x below He in
# every layer, compounds past it in two layers.
_MAX_DRIFT = 4.0
# Past this drift a ReLU stack is a warning; within it, info. He et al. (2015, fig. 3) trained
# plain ReLU nets at Glorot's init, 1.41x below He per layer: 22 layers (1,400x compounded)
# converged, 30 layers (23,000x) did not; 5,000x lies between. AlexNet at PyTorch's default
# init drifts 260x (and trains, if fragile); a plain 11-layer MLP at it, 10,000x.
_FRAGILE_DRIFT = 5000.0


def plain_chains(graph: Graph) -> dict[str, list[Node]]:
    """For each node, the longest chain of weight layers reaching it with no normalization
    layer and no skip connection between. A merge (add/cat of two paths) keeps the SHORTEST
    incoming chain: the skip path is how the gradient gets around the stack, whatever gain
    either path is multiplied by. A layer whose weight is standardized in its forward (scaled
    weight standardization) normalizes like a layer followed by a normalization layer, and so
    does an activation normalized by its own statistics in forward (EvoNorm, a hand-written
    RMSNorm; in a recorded forward, a user-defined module that does either inside it). Shape
    and dtype queries (`x.shape`, `bias.to(x.dtype)`) carry no chain: they are not the
    signal."""
    chains: dict[str, list[Node]] = {}
    memo: dict[str, bool] = {}
    computed = self_normalized(graph)
    for node in graph.topological():
        incoming = [chains[i] for i in node.inputs if i in chains]
        if (
            is_normalization(node, computed)
            or node.op in ("input", "param")
            or is_constant(graph, node.name, memo)
            or standardized_weight(graph, node, memo)
        ):
            chains[node.name] = []
            continue
        real = [
            c
            for i, c in zip(node.inputs, incoming)
            if graph.nodes.get(i) is not None and graph.nodes[i].op != "param"
        ]
        if node.op in MERGE_OPS and len(real) >= 2:
            best = min(real, key=len)
        else:
            best = max(incoming, key=len) if incoming else []
        chains[node.name] = best + [node] if node.op in WEIGHT_OPS else best
    return chains


def he_drift(graph: Graph, chain: list[Node]) -> float | None:
    """How far the chain's hidden layers start from He initialization for the ReLU after each
    (std = gain / sqrt(fan), fan-in or fan-out, whichever is closer), compounded along the chain:
    the log of the RMS factor by which the signal (forward) or the gradient (backward) drifts,
    negative when it shrinks. None when a hidden layer's weights say nothing about their init
    (too few, frozen, constant) or another activation follows it (sigmoid, tanh: no init
    preserves their gradient, the activations' derivative is below 1 wherever a unit is not at
    0). The last layer is left out: it produces the output, its scale does not compound."""
    from netdoctor.rules.params.nd201_init_scale import layer_scale

    drift = 0.0
    for node in chain[:-1]:
        scale = layer_scale(graph, node)
        w = node.params.get("weight")
        if scale is None or w is None or scale["nonlinearity"] not in ("relu", "leaky_relu"):
            return None
        fan_out = w.shape[0] * math.prod(w.shape[2:])
        by_fan_in = math.log(scale["ratio"])
        by_fan_out = by_fan_in + 0.5 * math.log(fan_out / scale["fan_in"])
        drift += min(by_fan_in, by_fan_out, key=abs)
    return drift


def check(ctx: GraphContext, options: Options) -> Iterator[Finding]:
    graph = ctx.graph
    min_depth = options.min_depth
    chains = plain_chains(graph)
    if not chains:
        return
    chain = max(chains.values(), key=len)
    if len(chain) < min_depth:
        return
    drift = he_drift(graph, chain)
    if drift is not None and abs(drift) <= math.log(_MAX_DRIFT):
        return  # He-initialized: scale-preserving, trainable at any depth (He et al., 2015)
    shallow = drift is not None and abs(drift) <= math.log(_FRAGILE_DRIFT)
    names = [n.label for n in chain]
    shown = ", ".join(names) if len(names) <= 8 else ", ".join(names[:4] + ["..."] + names[-3:])
    stack = (
        f"{len(chain)} weight layers in series ({shown}) with no normalization layer and "
        f"no skip connection between them"
    )
    if shallow:
        assert drift is not None
        factor = math.exp(abs(drift))
        way = "below" if drift < 0 else "above"
        message = (
            f"{stack}. Their hidden layers start {factor:.0f}x {way} He's scale for their "
            f"ReLUs, compounded along the chain: plain ReLU stacks this close to it still "
            f"train (AlexNet), but are fragile to the learning rate and the seed (loss NaN on "
            f"some runs, as in the AlexNet-on-FashionMNIST report); normalization makes them "
            f"robust. Thresholds: {min_depth} layers; a warning past {_FRAGILE_DRIFT:g}x."
        )
    else:
        message = (
            f"{stack}: gradients shrink or grow layer by layer (loss NaN or stuck at chance, as "
            f"in the AlexNet-on-FashionMNIST report). Threshold: {min_depth}."
        )
    yield RULE.finding(
        message,
        module=chain[0].label,
        location=chain[0].location,
        fix=_batchnorm_fix(chain),
        evidence={
            "depth": len(chain),
            "min_depth": min_depth,
            **({} if drift is None else {"he_drift": float(f"{math.exp(drift):.3g}")}),
            "layers": [
                {"module": n.label, "op": n.op, "line": n.location.line if n.location else None}
                for n in chain
            ],
        },
        impact=float(len(chain)),
        severity=Severity.INFO if shallow else None,
    )


def _norm_for(node: Node, prefix: str) -> str | None:
    if node.op == "conv":
        dims = len(node.attrs.get("kernel_size", (3, 3)))
        channels = node.attrs.get("out_channels")
        return f"{prefix}BatchNorm{dims}d({channels})" if channels else None
    if node.op == "linear":
        features = node.attrs.get("out_features")
        return f"{prefix}BatchNorm1d({features})" if features else None
    return None


def _norm_from_call(norm: str) -> Callable[[cst.Call], str]:
    """BatchNorm text whose size reuses the layer's own argument text (`width`, not 128)."""

    def make(call: cst.Call) -> str:
        name, _, size = norm.rpartition("(")
        keyword = "out_channels" if "2d" in name or "3d" in name else "out_features"
        if "1d" in name and "Conv" in str(getattr(call.func, "attr", "")):
            keyword = "out_channels"
        code = arg_code(call, 1, keyword)
        return f"{name}({code})" if code else norm

    return make


def _batchnorm_fix(chain: list[Node]) -> Fix:
    hidden = chain[:-1]  # the last layer produces the output: no BatchNorm after it
    summary = (
        f"insert BatchNorm after each of the {len(hidden)} hidden weight layers "
        "(or add residual connections)"
    )
    paths = {n.location.path for n in hidden if n.location}
    lines = [n.location.line for n in hidden if n.location]
    snippet_lines = []
    for n in hidden:
        norm = _norm_for(n, "nn.")
        if norm:
            snippet_lines.append(f"# after {n.label} ({n.attrs.get('type', n.op)}):\n{norm},")
    snippet = "\n".join(snippet_lines)
    # Layers built in a loop share a line: one insertion there serves them all, as long as the
    # output layer is not among them (no BatchNorm after the logits).
    last = chain[-1].location
    if (
        len(paths) != 1
        or len(lines) != len(hidden)
        or (last and last.path in paths and last.line in lines)
    ):
        return Fix(summary, snippet or None, "snippet")
    path = paths.pop()
    source = read(path) or ""
    prefix = nn_prefix(source)
    inserts: dict[int, str | Callable[[cst.Call], str]] = {}
    kinds: dict[int, str] = {}
    for n in hidden:
        norm = _norm_for(n, prefix)
        if norm is None or n.location is None:  # (every hidden layer has a location here)
            return Fix(summary, snippet or None, "snippet")
        line = n.location.line or 0  # (no line: an ONNX node, nothing to edit)
        kind = norm.split("(")[0]  # layers sharing a line (a loop) must want the same norm
        if kinds.setdefault(line, kind) != kind:
            return Fix(summary, snippet or None, "snippet")
        inserts[line] = _norm_from_call(norm)
    types = tuple(sorted({n.attrs["type"] for n in hidden if n.attrs.get("type")}))
    return diff_fix(summary, path, lambda src: insert_args_after(src, inserts, types), snippet)


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """BatchNorm after every hidden layer of the chain, in a copy of the model."""
    layers = [d.get("module") for d in finding.evidence.get("layers", []) if isinstance(d, dict)]
    return batchnorm_remedy(finding.rule, [n for n in layers if n])


def batchnorm_remedy(rule_id: str, layers: list[str]) -> Remedy | None:
    """BatchNorm inserted after each of `layers` but the last (the output layer), in a copy of
    the model; None when there is no hidden layer."""
    from netdoctor.fixes.memory import insert_batchnorm

    hidden = [n for n in layers[:-1] if n]
    if not hidden:
        return None
    return Remedy(
        rule_id,
        f"BatchNorm inserted after {len(hidden)} hidden conv/linear layers",
        "model",
        model_fn=insert_batchnorm(hidden),
    )


RULE = Rule(
    "ND101",
    "deep-plain-stack",
    Severity.WARNING,
    Stage.GRAPH,
    summary="many weight layers in series with no normalization and no skip connection",
    check=check,
    options=Options,
    consequence="ND403",
    remedy=remedy,
    fixture=Fixture("check", ("fixtures/sick/plain_cnn20.py:PlainCNN20",)),
    healthy=Fixture("check", ("fixtures/healthy/resnet.py:ResNet",)),
)
