"""Graph walks shared by the output, structure and initialization rules (ND105-ND111, ND2xx).

"Data" below means values that depend on the model input; parameters, shapes (`x.shape`,
`x.size(0)`) and what is computed from them alone (an expanded cls token) are constant-like.
"""

from __future__ import annotations

from collections.abc import Collection

from netdoctor.findings import Location
from netdoctor.graph.ir import MERGE_OPS, NORM_OPS, WEIGHT_OPS, Graph, Node

_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
# Ops after which a weight layer's scale no longer matters for the signal it sends on: a
# normalization, a merge with another data path (residual branch, concatenation), gating or
# attention (multiplication by another data tensor), a recurrent cell (its own gates).
_MULTIPLICATIVE = {"mul", "div", "matmul"}


def is_constant(graph: Graph, name: str, memo: dict[str, bool] | None = None) -> bool:
    """True for parameters, shape queries and values computed from them alone."""
    memo = {} if memo is None else memo
    if name in memo:
        return memo[name]
    node = graph.nodes.get(name)
    if node is None:
        return True
    memo[name] = False  # cycles (ONNX loops): not constant
    if node.op in ("param", "size"):
        result = True
    elif node.op == "getattr":
        result = node.attrs.get("attr", "shape") in _SHAPE_ATTRS
    elif node.op in ("input", "output") or node.op in WEIGHT_OPS:
        result = False
    else:
        result = bool(node.inputs) and all(is_constant(graph, i, memo) for i in node.inputs)
    memo[name] = result
    return result


def data_inputs(graph: Graph, node: Node, memo: dict[str, bool] | None = None) -> list[str]:
    return [i for i in node.inputs if i in graph.nodes and not is_constant(graph, i, memo)]


def data_consumers(graph: Graph, name: str, memo: dict[str, bool] | None = None) -> list[Node]:
    """Successors that use the value as data (not `x.shape` queries)."""
    return [
        s
        for s in graph.successors(name)
        if not (s.op in ("getattr", "size") and is_constant(graph, s.name, memo))
    ]


def output_producers(graph: Graph, through: set[str]) -> list[Node]:
    """The nearest producers of the model outputs, looking past ops in `through`; parameters,
    shapes and the raw input are left out."""
    memo: dict[str, bool] = {}
    found: list[Node] = []
    for out in graph.outputs:
        for node in graph.upstream(out.name, through=through):
            if node.op == "input" or is_constant(graph, node.name, memo):
                continue
            if node not in found:
                found.append(node)
    return found


def reaches_output_directly(graph: Graph, name: str) -> bool:
    """Whether an output is reachable from this node without passing another weight layer
    (the layer is a head: it produces the logits, or a value returned as is)."""
    stack, seen = [s.name for s in graph.successors(name)], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        node = graph.nodes[n]
        if node.op == "output":
            return True
        if node.op in WEIGHT_OPS:
            continue
        stack.extend(s.name for s in graph.successors(n))
    return False


def is_normalization(node: Node, computed: Collection[str] = ()) -> bool:
    """A normalization: torch's (a norm op), a normalization module of the model's own that the
    recorded forward saw as one opaque call (marked `normalizes`: its output does not change when
    its input is scaled), or one written out in forward (`computed`: `self_normalized`)."""
    return node.op in NORM_OPS or bool(node.attrs.get("normalizes")) or node.name in computed


def absorbed(
    graph: Graph,
    name: str,
    memo: dict[str, bool] | None = None,
    normalized: set[str] | frozenset[str] = frozenset(),
) -> bool:
    """Whether every path from this node to a model output first meets a normalization layer, a
    merge with another data path (residual add, concatenation), gating/attention or a recurrent
    layer: the layer's own output scale is then renormalized or sits inside a residual branch
    (where a small scale is a deliberate choice: Fixup, ReZero, layer scale, GPT-2 init). A
    normalization module of the model's own (a recorded leaf marked `normalizes`) and the nodes
    in `normalized` (a normalization computed in forward: `self_normalized`) count as
    normalization layers."""
    memo = {} if memo is None else memo
    stack, seen = [s.name for s in graph.successors(name)], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        node = graph.nodes[n]
        if node.op == "output":
            return False
        if node.op in ("rnn", "attention") or is_normalization(node, normalized):
            continue
        if (node.op in MERGE_OPS or node.op in _MULTIPLICATIVE) and len(
            data_inputs(graph, node, memo)
        ) >= 2:
            continue
        stack.extend(s.name for s in graph.successors(n))
    return True


# Second-moment statistics and normalizations which, applied to a layer's own weight inside its
# forward, fix the weight's scale by construction (weight standardization, the scaled WS of
# NF-Nets, weight normalization): torch.var_mean / var / std / norm / F.normalize, or a
# normalization function (timm's StdConv2d runs F.batch_norm over the weight). An exported graph
# spells the statistic out: the square root of a mean (ONNX ReduceMean ... Sqrt).
_SECOND_MOMENTS = {
    "var",
    "std",
    "var_mean",
    "std_mean",
    "norm",
    "linalg_vector_norm",
    "linalg_norm",
}
_WEIGHT_SCALERS = _SECOND_MOMENTS | {"l2norm"} | NORM_OPS
_ROOTS, _REDUCTIONS = {"sqrt", "rsqrt"}, {"mean", "sum"}


def standardized_weight(graph: Graph, node: Node, memo: dict[str, bool] | None = None) -> bool:
    """Whether a conv/linear call uses a weight normalized by its own statistics in forward
    (`F.conv2d(x, (w - w.mean()) / w.std() * gain)`): the layer then preserves the signal's scale
    whatever the raw weight's init, the job a normalization layer does (NF-ResNets, BiT)."""
    if node.op not in WEIGHT_OPS or "weight" in node.params:
        return False  # the layer uses its weight parameter as it is
    memo = {} if memo is None else memo
    weights = [i for i in node.inputs[1:] if is_constant(graph, i, memo)]
    stack, seen, ops = list(weights), set(), set()
    while stack:
        name = stack.pop()
        if name in seen or name not in graph.nodes:
            continue
        seen.add(name)
        producer = graph.nodes[name]
        if producer.op in _WEIGHT_SCALERS:
            return True
        ops.add(producer.op)
        stack.extend(producer.inputs)
    return bool(ops & _ROOTS) and bool(ops & _REDUCTIONS)


def call_site(node: Node) -> Location | None:
    """Where forward calls this op: the line of a functional op, the calling line of a module."""
    if node.module and node.attrs.get("call_location") is not None:
        return node.attrs["call_location"]
    if not node.module:
        return node.location
    return None


def module_attr(node: Node) -> str | None:
    """The attribute name a module is called through in forward (`head` for `self.head(x)`),
    when its path ends in an identifier (not a Sequential index)."""
    if not node.module:
        return None
    last = node.module.rsplit(".", 1)[-1]
    return last if last.isidentifier() else None


def source_line(location: Location | None) -> str | None:
    """The text of a source line (for messages), stripped."""
    if location is None or not location.line or not str(location.path).endswith(".py"):
        return None
    try:
        with open(location.path, encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if number == location.line:
                    return text.strip()
    except OSError:
        return None
    return None


def op_label(node: Node) -> str:
    """How a message names an op: `net.3 (ReLU)` for a module, the source text of the line for a
    functional call (`x = F.relu(x)`, line 37)."""
    if node.module:
        return f"{node.module} ({node.attrs.get('type', node.op)})"
    loc = call_site(node)
    text = source_line(loc)
    if text and loc is not None:  # (a source line comes from a location)
        return f"the {node.op} in `{text}` (line {loc.line})"
    return f"{node.op} ({node.name})"


# -- normalizations computed in forward ---------------------------------------------------------

# Statistics of a tensor's scale (torch's and ONNX's spellings): a variance, a standard deviation,
# a norm. The root of a mean (or sum) is one too, spelled out: sqrt(mean(x * x) + eps).
_SCALE_STATISTICS = _SECOND_MOMENTS | {"reducel2"}
_MEANS = {"mean", "sum", "reducemean", "reducesum", "reducesumsquare"}
# A factor that divides: rsqrt(v), 1 / v (ONNX's Reciprocal), v ** -0.5.
_INVERSES = {"rsqrt", "reciprocal"}
# Where "the same activation" ends, walking back: a layer's output is a new value.
_LAYER_BOUNDARY = WEIGHT_OPS | NORM_OPS | {"input", "rnn", "attention", "embedding", "module"}
_LOCAL_NODES = 32  # how far back the walk looks (a normalization is a handful of ops)


def _local_values(graph: Graph, name: str, memo: dict[str, bool]) -> tuple[set[str], set[str]]:
    """The data values a value is computed from inside its layer, itself included, back to the
    nearest weight layer, normalization or input (those included, not walked past); and the
    ops met on the way."""
    values: set[str] = set()
    ops: set[str] = set()
    stack = [name]
    while stack and len(values) < _LOCAL_NODES:
        n = stack.pop()
        if n in values or n not in graph.nodes or is_constant(graph, n, memo):
            continue
        values.add(n)
        node = graph.nodes[n]
        ops.add(node.op)
        exponents = node.attrs.get("constants", ()) if node.op == "pow" else ()
        if any(c % 1 != 0 for c in exponents):
            ops.add("sqrt")  # v ** 0.5, v ** -0.5
        if any(c < 0 for c in exponents) or (
            node.op == "div" and node.inputs and is_constant(graph, node.inputs[0], memo)
        ):
            ops.add("reciprocal")  # v ** -0.5, 1 / v
        if node.op not in _LAYER_BOUNDARY:
            stack.extend(node.inputs)
    return values, ops


def _scale_of(ops: set[str]) -> bool:
    return bool(ops & _SCALE_STATISTICS) or (bool(ops & {"sqrt", "rsqrt"}) and bool(ops & _MEANS))


def self_normalized(graph: Graph) -> set[str]:
    """Names of the nodes that normalize an activation by its own statistics, computed in
    forward rather than by a normalization layer: a value divided by a scale statistic of itself
    (its standard deviation or variance over channels, groups, positions or the batch, its norm,
    the root of its mean square), or multiplied by the inverse of one (`x * rsqrt(mean(x²) + ε)`),
    and `F.normalize`. EvoNorm-S/B, filter response normalization, a hand-written RMSNorm or
    LayerNorm. Like a normalization layer, the node's output has a scale fixed by construction,
    whatever the scale of what came in."""
    memo: dict[str, bool] = {}
    found: set[str] = set()
    for node in graph:
        if node.op == "l2norm":
            found.add(node.name)
            continue
        if node.op not in ("div", "mul"):
            continue
        data = data_inputs(graph, node, memo)
        if len(data) != 2 or data[0] == data[1]:
            continue
        pairs = [(data[0], data[1])] if node.op == "div" else [data, data[::-1]]
        for value, factor in pairs:
            factor_values, factor_ops = _local_values(graph, factor, memo)
            if not _scale_of(factor_ops):
                continue
            if node.op == "mul" and not factor_ops & _INVERSES:
                continue
            if factor_values & _local_values(graph, value, memo)[0]:
                found.add(node.name)
                break
    return found
