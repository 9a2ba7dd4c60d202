"""ND205 tied-embedding-scale: an output layer tied to an input embedding at the embedding's
scale, so the initial logits are far from zero and the initial loss far above ln(V)
(doc: rules/ND205.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.fixes.patch import append_to_init, diff_fix, nn_prefix, read
from netdoctor.graph.ir import Graph, Node, ParamInfo
from netdoctor.graph.walks import is_normalization, reaches_output_directly, self_normalized
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.verification import Remedy, RemedyContext


@dataclass(frozen=True)
class Options(RuleOptions):
    # Flag when the cross-entropy the initial logits' scale predicts exceeds (1 + tolerance)
    # x ln(V). At 1.0, logits of RMS above sqrt(2 ln V): past the point where the softmax's
    # mass freezes onto the few largest logits (rules/ND205.md).
    tolerance: float = 1.0


def initial_cross_entropy(rms: float, classes: int) -> float:
    """The expected cross-entropy of `classes` logits drawn i.i.d. N(0, rms^2), against a
    target they know nothing of: E[log sum exp z], the free energy of Derrida's random energy
    model, exact as the class count grows. Below rms = sqrt(2 ln V) it is ln V + rms^2/2
    (within 1% of a measurement at the rule's thresholds); above, the largest logit dominates
    and it is rms * sqrt(2 ln V) (10-13% high at 1000-50000 classes, never low)."""
    critical = math.sqrt(2.0 * math.log(classes))
    if rms <= critical:
        return math.log(classes) + rms * rms / 2.0
    return rms * critical


# Ops that pass a value on unchanged in scale (between the normalization and the head, or the
# tied weight and a functional head).
_VIEWS = {"reshape", "identity", "dropout", "getitem", "to", "float", "type_as", "contiguous"}
_TRANSPOSES = {"t", "transpose", "permute", "getattr"}


def _param_name(graph: Graph, name: str, through: set[str]) -> str | None:
    """The qualified name of the parameter a value is, seen through `through` ops."""
    node = graph.nodes.get(name)
    while node is not None and node.op in through and node.inputs:
        node = graph.nodes.get(node.inputs[0])
    if node is None or node.op != "param" or len(node.params) != 1:
        return None
    (leaf,) = node.params
    if "." in node.target or node.target == leaf:
        return node.target  # torch.fx get_attr and the hook frontend name it in full
    return f"{node.module}.{leaf}" if node.module else leaf


@dataclass(frozen=True)
class Head:
    """An output layer and the name of the weight it multiplies by."""

    node: Node
    weight: str
    info: ParamInfo | None  # the weight's statistics, when the node holds them


def output_layers(graph: Graph) -> Iterator[Head]:
    """The layers that produce the logits: conv/linear modules and functional linear calls that
    reach an output without another weight layer, and `x @ W.T` with W a parameter."""
    for node in graph:
        if node.op == "linear":
            if node.module and "weight" in node.params:
                weight: str | None = f"{node.module}.weight"
                info: ParamInfo | None = node.params["weight"]
            else:
                arg = node.attrs.get("weight_args", {}).get("weight")
                weight = _param_name(graph, arg, _VIEWS) if arg else None
                info = None
        elif node.op == "matmul" and len(node.inputs) == 2:
            weight, info = _param_name(graph, node.inputs[1], _VIEWS | _TRANSPOSES), None
        else:
            continue
        if weight is not None and reaches_output_directly(graph, node.name):
            yield Head(node, weight, info)


def tied_embedding(graph: Graph, head: Head) -> Node | None:
    """The embedding whose weight the output layer uses (the same Parameter, under another
    module's name, or read from the embedding in forward)."""
    names = set(graph.aliases(head.weight))
    for node in graph.of_op("embedding"):
        if node.module and f"{node.module}.weight" in names and node.module != head.node.module:
            return node
    return None


def _downstream_factor(graph: Graph, node: Node) -> float | None:
    """The product of the constant factors the logits are multiplied (or divided) by on their
    way to the output (a logit scale, T5's d^-1/2 is applied before: measured in the head's
    input), through ops that keep their scale; None when a branch or another op makes it
    unknown."""
    factor = 1.0
    while True:
        succ = graph.successors(node.name)
        if len(succ) != 1:
            return None
        node = succ[0]
        if node.op == "output":
            return factor
        consts = node.attrs.get("constants", [])
        if node.op in ("mul", "div") and len(consts) == 1 and len(node.inputs) == 1:
            c = abs(float(consts[0]))
            if c == 0:
                return None
            factor = factor * c if node.op == "mul" else factor / c
        elif node.op not in _VIEWS:
            return None


def _normalized_input_gain(graph: Graph, head: Node) -> float | None:
    """The RMS of the head's input when it is a normalization's output (its gain: 1 without an
    affine weight; a constant gain, as built), seen through ops that keep the scale; None
    otherwise (then only a measurement knows the logits' scale)."""
    computed = self_normalized(graph)
    name = head.inputs[0] if head.inputs else None
    while name is not None:
        node = graph.nodes.get(name)
        if node is None:
            return None
        if is_normalization(node, computed):
            w = node.params.get("weight")
            if w is None:
                return 1.0
            return abs(w.mean) if w.all_equal else None
        if node.op not in _VIEWS or not node.inputs:
            return None
        name = node.inputs[0]
    return None


def logit_scale(graph: Graph, head: Head, weight: ParamInfo) -> tuple[float, bool] | None:
    """The RMS of the logits at initialization and whether it was measured (the check's forward
    pass on a batch of random tokens) or derived (a unit-scale normalized input of width d
    times weights of std s gives logits of RMS s * sqrt(d)); None when neither is possible."""
    measured = head.node.attrs.get("init_rms")
    factor = _downstream_factor(graph, head.node)
    if factor is None:
        return None
    if measured is not None and math.isfinite(measured):
        return measured * factor, True
    gain = _normalized_input_gain(graph, head.node)
    if gain is None or len(weight.shape) != 2:
        return None
    rms = math.sqrt(weight.std**2 + weight.mean**2) * math.sqrt(weight.shape[1]) * gain
    return rms * factor, False


def check(ctx: GraphContext, options: Options) -> Iterator[Finding]:
    graph = ctx.graph
    if graph.frontend == "onnx":
        return  # exported weights are trained ones: their scale says nothing of init
    seen: set[str] = set()
    for head in output_layers(graph):
        embedding = tied_embedding(graph, head)
        if embedding is None or embedding.name in seen:
            continue
        weight = embedding.params.get("weight")
        if weight is None or len(weight.shape) != 2 or weight.shape[0] < 2:
            continue
        scale = logit_scale(graph, head, weight)
        if scale is None:
            continue
        rms, measured = scale
        vocab, width = weight.shape
        expected = initial_cross_entropy(rms, vocab)
        chance = math.log(vocab)
        if expected <= (1.0 + options.tolerance) * chance:
            continue
        seen.add(embedding.name)
        yield _finding(graph, head, embedding, weight, rms, measured, expected, options)


def _finding(
    graph: Graph,
    head: Head,
    embedding: Node,
    weight: ParamInfo,
    rms: float,
    measured: bool,
    expected: float,
    options: Options,
) -> Finding:
    vocab, width = weight.shape
    chance = math.log(vocab)
    std = math.sqrt(weight.std**2 + weight.mean**2)
    target = width**-0.5
    emb = embedding.module or embedding.name
    out = head.node.label
    how = "measured on random tokens" if measured else f"= {std:.3g} x sqrt({width})"
    default = " (nn.Embedding's default N(0, 1))" if 0.9 <= std <= 1.1 else ""
    limit = math.sqrt(2.0 * options.tolerance * chance)
    message = (
        f"{out}, the output layer, shares its weight with the embedding {emb}, whose "
        f"init std is {std:.3g}{default}: the input side's scale, not the output layer's. "
        f"The {vocab} logits start with RMS {rms:.3g} ({how}), so cross-entropy at "
        f"initialisation is about {expected:.3g}, against ln({vocab}) = {chance:.3g} for a "
        "model that knows nothing: the model starts confidently wrong, and its first "
        "hundreds of steps go to shrinking the logits (a 4-layer GPT with N(0, 1) tied "
        "embeddings starts at 123 and is still above ln(V) after 100 steps). Threshold: a "
        f"predicted initial loss above {1 + options.tolerance:g} x ln(V), logits RMS above "
        f"{limit:.3g} here (GPT-2's N(0, 0.02) gives {0.02 * math.sqrt(width):.3g} at this "
        "width)."
    )
    return RULE.finding(
        message,
        module=emb,
        location=embedding.location,
        fix=_fix(graph, emb, width),
        evidence={
            "embedding": emb,
            "output_layer": out,
            "embedding_std": std,
            "width": width,
            "vocab": vocab,
            "logit_rms": rms,
            "measured": measured,
            "expected_loss": expected,
            "ln_vocab": chance,
            "tolerance": options.tolerance,
            "suggested_std": target,
        },
        impact=4.0,
    )


def _fix(graph: Graph, embedding: str, width: int) -> Fix:
    """Initialise the tied weight at std d^-1/2 (logits at unit RMS), after the tie: a diff
    appending it to the model class's __init__ when that can be found, else a snippet."""
    summary = (
        f"initialise the tied embedding {embedding} at std {width}**-0.5 (logits of unit RMS "
        "at init; GPT-2 and Hugging Face use 0.02), after tying it to the output layer; or keep "
        f"N(0, 1) and multiply the logits by {width}**-0.5 as T5 does"
    )

    def code(prefix: str) -> str:
        return f"{prefix}init.normal_(self.{embedding}.weight, std={width} ** -0.5)\n"

    snippet = "# at the end of the model's __init__, after the weights are tied:\n" + code("nn.")
    root = graph.root_location
    if root is None or not root.line:
        return Fix(summary, snippet, "snippet")
    class_line = root.line
    prefix = nn_prefix(read(root.path) or "")
    return diff_fix(
        summary,
        root.path,
        partial(append_to_init, class_line=class_line, code=code(prefix)),
        snippet,
    )


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """The tied embedding re-initialised at std d^-1/2, in a copy of the model."""
    from netdoctor.fixes.memory import init_scale

    ev = finding.evidence
    name, std = ev.get("embedding"), ev.get("suggested_std")
    if not isinstance(name, str) or not isinstance(std, float):
        return None
    return Remedy(
        RULE.id,
        f"{name} re-initialised at std {std:.3g}",
        "model",
        model_fn=init_scale([(name, std)]),
    )


RULE = Rule(
    "ND205",
    "tied-embedding-scale",
    Severity.WARNING,
    Stage.PARAMS,
    summary="output layer tied to an embedding at the input's scale: initial loss >> ln(V)",
    check=check,
    options=Options,
    consequence="ND408",
    remedy=remedy,
    fixture=Fixture("check", ("fixtures/sick/tied_embedding.py:TiedEmbeddingLM",)),
    healthy=Fixture("check", ("fixtures/healthy/tied_lm.py:GPT2LM",)),
)
