"""ND107 linear-collapse: two weight layers joined by nothing nonlinear collapse to one linear
map (doc: rules/ND107.md)."""

from __future__ import annotations

from collections.abc import Iterator

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.fixes.patch import (
    diff_fix,
    insert_args_after,
    nn_prefix,
    read,
    torch_function_prefix,
    wrap_call,
)
from netdoctor.graph.ir import WEIGHT_OPS, Graph, Node
from netdoctor.graph.walks import call_site, data_consumers, data_inputs, is_constant, module_attr
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext


def _is_grouped(node: Node) -> bool:
    """A block-diagonal layer: a grouped or depthwise convolution (groups > 1), or a Linear
    that maps its input group by group (its output comes in groups: a last dimension that is
    a fraction of its out_features). Followed by a layer that mixes the groups, it is a
    structured factorization (as a depthwise conv followed by a pointwise one is), not a
    dense layer stacked on a dense layer."""
    groups = node.attrs.get("groups") or 1
    if node.op == "conv":
        return isinstance(groups, int) and groups > 1
    out = node.attrs.get("out_features")
    last = node.shape[-1] if node.shape else None
    return isinstance(out, int) and isinstance(last, int) and 0 < last < out and out % last == 0


def _dims(node: Node) -> tuple[int, int] | None:
    if node.op == "linear":
        a, b = node.attrs.get("in_features"), node.attrs.get("out_features")
    else:
        a, b = node.attrs.get("in_channels"), node.attrs.get("out_channels")
    return (a, b) if isinstance(a, int) and isinstance(b, int) else None


def _is_bottleneck(first: Node, second: Node) -> bool:
    """A deliberate low-rank factorization: the first layer narrows (out < in) to a width the
    second widens again (an autoencoder's linear latent code, an SVD/LoRA-style factorization).
    A forgotten activation in a plain MLP (784 -> 256 -> 10) keeps narrowing: not a bottleneck."""
    a, b = _dims(first), _dims(second)
    return a is not None and b is not None and a[1] < a[0] and a[1] < b[1]


def _strides(node: Node) -> bool:
    """A convolution that downsamples (stride > 1 along some axis)."""
    stride = node.attrs.get("stride")
    if isinstance(stride, int):
        return stride > 1
    return isinstance(stride, tuple) and any(isinstance(s, int) and s > 1 for s in stride)


def linear_stem(graph: Graph, fixed: set[str], memo: dict[str, bool]) -> dict[str, bool]:
    """The convolutions of the model's linear stem: those that read the model's input through
    linear ops and other convolutions only (padding, a reshape, a constant rescaling of the
    pixels, a fixed filter), each with whether the stem has downsampled by then (it or a conv
    before it strides)."""
    stem: dict[str, bool] = {}
    stack = [(n.name, False) for n in graph.of_op("input")]
    seen: set[tuple[str, bool]] = set()
    while stack:
        name, strided = stack.pop()
        if (name, strided) in seen:
            continue
        seen.add((name, strided))
        for nxt in data_consumers(graph, name, memo):
            if len(data_inputs(graph, nxt, memo)) != 1:
                continue  # another data path merges in: past the stem
            if nxt.op == "conv" and nxt.name not in fixed:
                now = strided or _strides(nxt)
                stem[nxt.name] = stem.get(nxt.name, False) or now
                stack.append((nxt.name, now))
            elif nxt.op in _LINEAR_PASS or nxt.op in _AFFINE_WITH_CONSTANT or nxt.name in fixed:
                stack.append((nxt.name, strided))
    return stem


def _is_strided_stem(first: Node, second: Node, stem: dict[str, bool]) -> bool:
    """A patch embedding in steps: convolutions on the model's input with nothing nonlinear
    between them, downsampling (ConvNeXt's overlapping stems: 3x3/2 then 3x3/2 where the
    original patchifies with one 4x4/4; ResNet-Q's 3x3/2 then two 3x3 before its first
    normalization). A linear patch embedding is the standard design (ViT, Swin, ConvNeXt:
    normalization, not an activation, follows it); reaching its receptive field in several
    overlapping steps is a choice, not a forgotten activation. Convs on the input that never
    downsample are an ordinary first layer pair, and still reported."""
    return first.name in stem and stem.get(second.name, False)


def _fixed_transform(graph: Graph, node: Node, memo: dict[str, bool]) -> bool:
    """A functional convolution or linear map whose weight is no parameter: a fixed filter or
    transform held in a buffer or computed from constants (the binomial blur of anti-aliased
    downsampling, a DCT basis). It learns nothing: like average pooling, it is a linear op
    between layers, not a layer of its own."""
    if node.op not in WEIGHT_OPS or node.module:
        return False  # a Conv/Linear module (its weight may be parametrized: not ours to judge)
    stack, seen = [i for i in node.inputs[1:] if is_constant(graph, i, memo)], set()
    while stack:
        name = stack.pop()
        if name in seen or name not in graph.nodes:
            continue
        seen.add(name)
        producer = graph.nodes[name]
        if producer.op == "param" and producer.params:
            return False  # a parameter (standardized or not) is the weight
        stack.extend(producer.inputs)
    return True


def _through_linear(graph: Graph, name: str, memo: dict[str, bool], down: bool) -> list[Node]:
    """The nearest nodes past single-input linear ops (reshapes, dropout, casts by views...),
    downstream (consumers) or upstream (producers) of a node."""
    stack, seen, found = [name], set(), []
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        nexts = (
            data_consumers(graph, cur, memo)
            if down
            else [graph.nodes[i] for i in data_inputs(graph, graph.nodes[cur], memo)]
        )
        for n in nexts:
            if n.op in _LINEAR_PASS and len(data_inputs(graph, n, memo)) == 1:
                stack.append(n.name)
            else:
                found.append(n)
    return found


def _is_update_of_a_layer(graph: Graph, first: Node, second: Node, memo: dict[str, bool]) -> bool:
    """A low-rank or adapter update (LoRA: W x + B(A x)): the pair reads the same input as
    another weight layer and its output is added to that layer's. The sum is a linear map of
    the input either way; the factorized branch is a parametrization of the update (trained,
    shared or swapped apart from W), not a stack of layers with a forgotten activation."""
    sources = set(data_inputs(graph, first, memo))
    for merge in _through_linear(graph, second.name, memo, down=True):
        if merge.op not in ("add", "sub"):
            continue
        for producer in _through_linear(graph, merge.name, memo, down=False):
            if (
                producer.op in WEIGHT_OPS
                and producer.name != second.name
                and sources & set(data_inputs(graph, producer, memo))
            ):
                return True
    return False


def describe(node: Node) -> str:
    kind = node.attrs.get("type", node.op)
    if node.op == "linear" and node.attrs.get("in_features"):
        return f"{kind}({node.attrs['in_features']}, {node.attrs.get('out_features')})"
    if node.op == "conv" and node.attrs.get("in_channels"):
        return f"{kind}({node.attrs['in_channels']}, {node.attrs.get('out_channels')})"
    return kind


# Ops that keep a map linear (or affine): reshaping, slicing, identity, dropout (a rescaled mask
# in training, the identity in eval), average pooling and other linear reductions, padding,
# interpolation. Add/sub/mul/div count only when the other operand is a constant or parameter.
_LINEAR_PASS = {
    "reshape",
    "identity",
    "dropout",
    "avgpool",
    "getitem",
    "split",
    "pad",
    "upsample",
    "mean",
    "sum",
    "neg",
}
_AFFINE_WITH_CONSTANT = {"add", "sub", "mul", "div"}


def _shares_weights(graph: Graph, node: Node) -> bool:
    """The layer's weight is also another module's (a block shared by several layers through
    tied parameters): the pair cannot be merged into one layer without untying it, so each
    layer's weight is constrained by its other uses and the two are not a free factorization."""
    info = graph.modules.get(node.module) if node.module else None
    return info is not None and info.shares_parameters


def collapsing_pairs(graph: Graph) -> list[tuple[Node, list[Node], Node]]:
    """(first layer, ops between, second layer) for every two weight layers joined only by
    linear ops, with no branching out of the first and no other data merging in. A fixed filter
    or transform (a functional conv/linear with no weight parameter) is one of those linear ops,
    not a layer."""
    memo: dict[str, bool] = {}
    pairs = []
    fixed = {n.name for n in graph.of_op(*WEIGHT_OPS) if _fixed_transform(graph, n, memo)}
    stem = linear_stem(graph, fixed, memo)
    for first in graph.of_op(*WEIGHT_OPS):
        if first.attrs.get("type") == "Bilinear" or first.name in fixed:
            continue
        cur = first
        between: list[Node] = []
        while True:
            consumers = data_consumers(graph, cur.name, memo)
            if len(consumers) != 1:
                break  # the value branches (or is unused / is the output)
            nxt = consumers[0]
            others = [i for i in data_inputs(graph, nxt, memo) if i != cur.name]
            if others or nxt.inputs.count(cur.name) > 1:
                break  # another data path merges in (residual add, concatenation, x * x)
            if nxt.op in WEIGHT_OPS and nxt.name not in fixed:
                if (
                    nxt.attrs.get("type") != "Bilinear"
                    and not (_is_grouped(first) or _is_grouped(nxt))
                    and not _is_bottleneck(first, nxt)
                    and not _is_strided_stem(first, nxt, stem)
                    and not _is_update_of_a_layer(graph, first, nxt, memo)
                    and not (_shares_weights(graph, first) or _shares_weights(graph, nxt))
                ):
                    pairs.append((first, between, nxt))
                break
            if nxt.op in _LINEAR_PASS or nxt.op in _AFFINE_WITH_CONSTANT or nxt.name in fixed:
                between.append(nxt)
                cur = nxt
                continue
            break
    return pairs


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
    graph = ctx.graph
    for first, between, second in collapsing_pairs(graph):
        via = ", ".join(sorted({n.op for n in between})) if between else "nothing"
        message = (
            f"{first.label} ({describe(first)}) feeds {second.label} "
            f"({describe(second)}) through {via}: no activation, normalization, "
            "max-pooling, multiplication or branching in between, so the two layers "
            "compose to a single linear map (W2·W1). The extra layer adds parameters but "
            "no expressive power. Insert a nonlinearity between them, or merge them into "
            "one layer if the factorization is deliberate."
        )
        yield RULE.finding(
            message,
            module=first.label,
            location=first.location,
            fix=_activation_fix(first, second),
            evidence={
                "first": first.label,
                "second": second.label,
                "between": [n.op for n in between],
            },
            impact=3.0,
        )


def _activation_fix(first: Node, second: Node) -> Fix:
    summary = f"insert an activation (e.g. nn.ReLU()) between {first.label} and {second.label}"
    snippet = (
        f"nn.ReLU(),  # in the nn.Sequential, right after {first.label}\n"
        f"# or in forward: x = torch.relu(self.{first.module or 'layer'}(x))"
    )
    if first.location is None:
        return Fix(summary, snippet, "snippet", safe=False)
    path, line = first.location.path, first.location.line or 0  # (no line: nothing to edit)
    prefix = nn_prefix(read(path) or "")
    fix = diff_fix(
        summary,
        path,
        lambda src: insert_args_after(src, {line: f"{prefix}ReLU()"}),
        snippet,
        safe=False,
    )
    if fix.kind == "diff":
        return fix
    site, attr = call_site(first), module_attr(first)
    if site is not None and attr:
        func = torch_function_prefix(read(site.path) or "")
        call_line = site.line or 0
        if func:
            return diff_fix(
                summary,
                site.path,
                lambda src: wrap_call(src, call_line, (attr,), f"{func}relu"),
                snippet,
                safe=False,
            )
    return fix


RULE = Rule(
    "ND107",
    "linear-collapse",
    Severity.WARNING,
    Stage.GRAPH,
    summary="two weight layers joined by nothing nonlinear collapse to one linear map",
    check=check,
    options=NoOptions,
    fixture=Fixture("check", ("fixtures/sick/linear_collapse.py:CollapsedMLP",)),
    healthy=Fixture("check", ("fixtures/healthy/mobilenet_v2.py:MobileNetV2",)),
)
