"""What a graph computes at initialization, whatever the input: which values are exactly zero
(zero-init gains and layers, zero branches), which reach the output, which depend on the model
input at all, and the learned gains (LayerScale) that scale the signal on purpose, per part of a
concatenation where the parts can be followed. ND202 and ND204 read them; ND201 the liveness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from netdoctor.graph.ir import MERGE_OPS, NORM_OPS, WEIGHT_OPS, Graph, Node
from netdoctor.graph.walks import is_constant

# Ops whose output is zero when their (first) input is: views, copies, casts, reductions, pooling,
# and the activations with f(0) = 0.
_ZERO_PRESERVING = {
    "reshape",
    "reshape_as",
    "view_as",
    "getitem",
    "identity",
    "dropout",
    "neg",
    "split",
    "mean",
    "sum",
    "avgpool",
    "maxpool",
    "pad",
    "upsample",
    "div",
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "celu",
    "prelu",
    "rrelu",
    "gelu",
    "silu",
    "mish",
    "hardswish",
    "hardtanh",
    "tanh",
    # copies and casts
    "clone",
    "to",
    "float",
    "type_as",
    "requires_grad_",
}


# A tensor of zeros shaped like another (torch.zeros_like(x), x.new_zeros(shape)): what a
# function returns in place of a computation it cannot run here (a kernel missing on this device).
_ZEROS = {"zeros_like", "new_zeros"}


def _zero_info(info) -> bool:
    return info.numel > 0 and info.mean == 0 and (info.all_equal or info.numel == 1)


def _zero_param(node: Node) -> bool:
    return bool(node.params) and all(_zero_info(i) for i in node.params.values())


def _functional_zero(node: Node, ins: list[str], zero: set[str]) -> bool:
    """A functional conv/linear or normalization call (no module of its own) whose output is zero:
    conv/linear when its weight or its input is zero, a normalization when its scale is (a
    weight standardized in forward and multiplied by a gain that starts at zero: timm's
    ScaledStdConv2d with gain_init=0 runs F.batch_norm over the weight with that gain as its
    scale), each with a zero bias or none. The weight and bias are the frontend's reading of the
    call's arguments (`weight_args`); a conv/linear call it could not read is taken
    positionally (input, weight, bias)."""
    roles = node.attrs.get("weight_args")
    if roles is None and node.op in WEIGHT_OPS:
        roles = {"weight": ins[1] if len(ins) > 1 else None}
        if len(ins) > 2:
            roles["bias"] = ins[2]
    if not roles or "weight" not in roles:
        return False
    if "bias" in roles and roles["bias"] not in zero:
        return False
    scaled_by_zero = roles["weight"] in zero
    if node.op in WEIGHT_OPS:
        return scaled_by_zero or (bool(ins) and ins[0] in zero)
    return scaled_by_zero


def zero_at_init(graph: Graph) -> set[str]:
    """Names of the nodes whose value is exactly zero at initialization whatever the input: zero
    parameters (a ReZero / SkipInit gain), tensors of zeros (`torch.zeros_like(x)`), products
    with them, views, pools and f(0) = 0
    activations of those, weight and normalization layers whose parameters are all zero (Fixup's
    last conv of a branch, the zero-init last BatchNorm of torchvision's and timm's ResNets), a
    conv whose weight is standardized in forward and scaled by a zero gain (the last conv of
    timm's NF-ResNet / NFNet branches), and a weight layer fed zero with no bias to add."""
    zero: set[str] = set()
    for node in graph.topological():
        ins = [i for i in node.inputs if i in graph.nodes]
        if node.op == "param":
            hit = _zero_param(node)
        elif node.op in _ZEROS:
            hit = True
        elif node.op == "mul":
            hit = 0 in node.attrs.get("constants", ()) or any(i in zero for i in ins)
        elif node.op in _ZERO_PRESERVING:
            hit = bool(ins) and ins[0] in zero
        elif node.op in MERGE_OPS:
            hit = bool(ins) and all(i in zero for i in ins)
        elif node.op in WEIGHT_OPS and node.module:
            # All-zero weights and bias (Fixup's last conv), or a zero input and no bias to add.
            bias = node.params.get("bias")
            hit = _zero_param(node) or (
                bool(ins) and ins[0] in zero and (bias is None or _zero_info(bias))
            )
        elif node.op in NORM_OPS:
            # All-zero affine parameters (a zero-init last BatchNorm), or a zero input and no
            # bias to add (a normalized zero is zero; an exported conv's folded-BatchNorm mark).
            bias = node.params.get("bias")
            hit = _zero_param(node) or (
                bool(ins)
                and ins[0] in zero
                and (_zero_info(bias) if bias is not None else len(ins) == 1)
            )
            hit = hit or (not node.module and _functional_zero(node, ins, zero))
        elif node.op in WEIGHT_OPS:
            hit = _functional_zero(node, ins, zero)
        else:
            hit = False
        if hit:
            zero.add(node.name)
    return zero


def live_at_init(graph: Graph) -> set[str]:
    """Names of the nodes whose value reaches a model output at initialization, following the
    residual stream: a residual branch whose value is zero at init, because it is multiplied by a
    zero gain (`x + alpha * f(x)`, alpha = 0: SkipInit, ReZero, NF-Nets) or ends in an all-zero
    layer (Fixup), adds nothing to the stream it merges into, and what runs inside it is not
    followed. (A zero output layer is not a branch: the layers before it are followed.)"""
    zero = zero_at_init(graph)
    live: set[str] = set()
    stack = [n.name for n in graph.outputs]
    while stack:
        name = stack.pop()
        if name in live or name not in graph.nodes:
            continue
        live.add(name)
        node = graph.nodes[name]
        inputs = [i for i in node.inputs if i in graph.nodes]
        if node.op in MERGE_OPS and any(i not in zero for i in inputs):
            inputs = [i for i in inputs if i not in zero]
        stack.extend(inputs)
    return live


def input_dependent(graph: Graph) -> set[str]:
    """Names of the nodes whose value depends on the model input: reachable from an input node
    through data (not through `x.shape` queries). A layer outside it computes the same value for
    every sample: a projection of positional indices (ConViT's `pos_proj`), of learned queries or
    of a class token before it meets the data."""
    memo: dict[str, bool] = {}
    found: set[str] = set()
    for node in graph.topological():
        if node.op == "input":
            found.add(node.name)
        elif node.op != "param" and any(i in found for i in node.inputs):
            if not is_constant(graph, node.name, memo):
                found.add(node.name)
    return found


def joins_input_free_value(graph: Graph, node: Node, dependent: set[str]) -> bool:
    """Whether a value that does not depend on the model input (a class token, learned queries)
    is concatenated with the data upstream of this layer, without a weight layer between:
    indexing can then select that part alone (`self.q(x[:, 0])` on `cat([cls_token, x])`), and
    the layer sees the same value for every sample though its input depends on the data."""
    stack = [i for i in node.inputs if i in dependent]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        prev = graph.nodes[name]
        if prev.op in WEIGHT_OPS or prev.op == "input":
            continue
        if prev.op == "cat" and any(i not in dependent for i in prev.inputs if i in graph.nodes):
            return True
        stack.extend(i for i in prev.inputs if i in dependent)
    return False


# Views a learned gain goes through before it multiplies the data (`gamma.view(1, -1, 1, 1)`).
_GAIN_VIEWS = {"reshape", "getitem", "identity", "to", "type_as"}


def learned_gain(graph: Graph, name: str) -> float | None:
    """The value of a learned gain that starts at one nonzero value (LayerScale's gamma, a
    learned residual scale), seen through views; None for anything else. Training moves such a
    gain at a rate that does not depend on its own size, so a small start is a choice, not a
    collapse (a constant of the same size would stay)."""
    node = graph.nodes.get(name)
    while node is not None and node.op in _GAIN_VIEWS and len(node.inputs) == 1:
        node = graph.nodes.get(node.inputs[0])
    if node is None or node.op != "param" or len(node.params) != 1:
        return None
    (info,) = node.params.values()
    if not info.trainable or not info.all_equal or info.mean == 0:
        return None
    return abs(info.mean)


def deliberate_scales(graph: Graph, dependent: set[str]) -> dict[str, float]:
    """For each node that depends on the input, the factor by which learned gains multiply it on
    purpose: the product of the gains (`learned_gain`) on its path from the input; where paths
    merge, the largest (a residual stream keeps its scale when only the branch is scaled; a
    block without a shortcut passes its gain on to everything after it). A normalization
    restores the scale, up to its eps: it divides by sqrt(std^2 + eps), so an input much
    smaller than sqrt(eps) stays small (a BatchNorm with eps 1e-5 turns a LayerScale's 1e-5
    into 3e-3, the next one that into 0.7).

    A concatenation keeps one factor per part (`_Slot`) through the ops that act on each part
    alone: a learned gain, a sum with a tensor of the same parts, a normalization of each token;
    indexing that selects one part takes that part's factor. A class token that shares one
    tensor with the patches (`cat([cls, patches])`, updated by `x + gamma * cat([attn(x),
    x[:, 1:]])`) receives the input through gamma alone, and what reads it (`x[:, 0:1]`) has
    gamma's scale, however large the patches beside it are."""
    scales: dict[str, float] = {}
    slots: dict[str, _Layout] = {}
    for node in graph.topological():
        if node.name not in dependent:
            continue
        ins = [i for i in node.inputs if i in scales]
        gain = 1.0
        if node.op == "input" or not ins:
            scale = 1.0
        elif node.op in NORM_OPS:
            # Input std ~ d (the natural std taken as 1): out ~ d / sqrt(d^2 + eps); an input at
            # its natural scale comes out at 1 (within 1e-3: taken as 1).
            scale = _normalized(max(scales[i] for i in ins), _eps(node), free=False)
        else:
            scale = max(scales[i] for i in ins)
            if node.op == "mul" and len(ins) == 1:
                gains = [
                    g
                    for g in (learned_gain(graph, i) for i in node.inputs if i not in dependent)
                    if g is not None
                ]
                if len(gains) == 1:
                    gain = gains[0]
                    scale *= gain
        layout = _layout(graph, node, dependent, scales, slots, gain)
        if isinstance(layout, _Slot):  # one part selected, its dimension indexed away
            scale = layout.scale if layout.scale is not None else scale
        elif layout is not None:
            slots[node.name] = layout
            measured = [p.scale for p in layout[1] if p.scale is not None]
            scale = max(measured) if measured else scale
        scales[node.name] = scale
    return scales


@dataclass(frozen=True)
class _Slot:
    """One part of a concatenation, along its dimension: its length, the factor by which learned
    gains scale its input-dependent part (None: it has none, as a class token before it has
    attended to anything), and whether it holds a part that does not depend on the input."""

    length: int
    scale: float | None
    free: bool


# The dimension a tensor was concatenated along (non-negative) and its parts in order.
_Layout = tuple[int, tuple[_Slot, ...]]
# Ops that act on each element alone (a sum, a product with a constant-like value, a view of
# the same shape): the parts of their data operand stay where they were.
_ELEMENTWISE = {"add", "sub", "mul", "div", "identity", "dropout", "drop_path", "clone"}


def _eps(node: Node) -> float:
    eps = node.attrs.get("eps")
    return float(eps) if isinstance(eps, (int, float)) and eps > 0 else 0.0


def _normalized(d: float, eps: float, free: bool) -> float:
    """The factor after a normalization of a value whose input-dependent part has factor d. A
    value that also holds an input-free part (a class token) is divided by that part's spread,
    taken at its natural scale 1: the normalization then leaves a small factor as it is."""
    scale = d / math.sqrt((max(d * d, 1.0) if free else d * d) + eps)
    return 1.0 if scale > 0.999 else scale


def _layout(
    graph: Graph,
    node: Node,
    dependent: set[str],
    scales: dict[str, float],
    slots: dict[str, _Layout],
    gain: float,
) -> _Layout | _Slot | None:
    """The parts of a node's value (see deliberate_scales): a layout, one part when indexing
    selects it and removes the dimension, or None when the parts are not followed."""
    shape = node.shape
    if shape is None:
        return None
    if node.op == "cat" and isinstance(node.attrs.get("cat_dim"), int):
        dim = node.attrs["cat_dim"] % len(shape) if shape else 0
        parts: list[_Slot] = []
        for i in node.inputs:
            prev = graph.nodes.get(i)
            if prev is None or prev.shape is None or len(prev.shape) != len(shape):
                return None
            if i in slots and slots[i][0] == dim:
                parts.extend(slots[i][1])
            elif i in dependent:
                parts.append(_Slot(prev.shape[dim], scales.get(i), False))
            else:
                parts.append(_Slot(prev.shape[dim], None, True))
        # (a tensor concatenated twice is one input of the node: its parts are not known)
        return (dim, tuple(parts)) if sum(p.length for p in parts) == shape[dim] else None
    data = [i for i in node.inputs if i in dependent]
    if not data or any(i not in slots for i in data):
        return None
    dim, first = slots[data[0]]
    if node.op == "getitem" and len(data) == 1 and "index" in node.attrs:
        return _selected(node.attrs["index"], dim, first)
    lengths = [p.length for p in first]
    if any(slots[i][0] != dim or [p.length for p in slots[i][1]] != lengths for i in data):
        return None
    if any(graph.nodes[i].shape != shape for i in data):
        return None
    if node.op in ("layernorm", "rmsnorm") and len(data) == 1:
        normalized = node.attrs.get("normalized_shape")
        if not isinstance(normalized, (list, tuple)) or dim >= len(shape) - len(normalized):
            return None  # (the statistics mix the parts)
        eps = _eps(node)
        return dim, tuple(
            _Slot(p.length, None if p.scale is None else _normalized(p.scale, eps, p.free), p.free)
            for p in first
        )
    if node.op not in _ELEMENTWISE or (node.op in ("mul", "div") and len(data) > 1):
        return None
    joins_free = node.op in ("add", "sub") and len(data) < len(node.inputs)
    merged = []
    for k, length in enumerate(lengths):
        measured = [s for s in (slots[i][1][k].scale for i in data) if s is not None]
        merged.append(
            _Slot(
                length,
                max(measured) * gain if measured else None,
                joins_free or any(slots[i][1][k].free for i in data),
            )
        )
    return dim, tuple(merged)


def _selected(index: tuple, dim: int, parts: tuple[_Slot, ...]) -> _Layout | _Slot | None:
    """What `x[index]` holds of x's parts along `dim` (see _layout)."""
    out_dim = 0
    for position, entry in enumerate(index):
        if entry is None or entry == "...":
            return None
        if position < dim:
            out_dim += 0 if isinstance(entry, int) else 1
            continue
        total = sum(p.length for p in parts)
        if isinstance(entry, int):
            start = entry + total if entry < 0 else entry
            stop = start + 1
        else:
            start, stop, step = slice(*entry).indices(total)
            if step != 1:
                return None
        if not 0 <= start < stop <= total:
            return None
        kept, offset = [], 0
        for p in parts:
            lo, hi = max(start, offset), min(stop, offset + p.length)
            if lo < hi:
                kept.append(_Slot(hi - lo, p.scale, p.free))
            offset += p.length
        if isinstance(entry, int):
            return kept[0]
        return out_dim, tuple(kept)
    return out_dim + dim - len(index), parts  # (the index stops before the dimension)
