"""ONNX frontend: an .onnx file -> the same IR the torch frontends build.

Weights come from initializers, shapes from ONNX shape inference, locations name the ONNX node.
BatchNormalization's momentum is stored in PyTorch's convention (ONNX 0.9 == PyTorch 0.1) so
ND203 judges the same number either way. External data outside the model's folder is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from netdoctor.errors import UserError
from netdoctor.findings import Location
from netdoctor.graph.ir import Graph, Node, ParamInfo

if TYPE_CHECKING:
    import onnx

_OPS = {
    "Conv": "conv",
    "ConvTranspose": "conv",
    "Gemm": "linear",
    "BatchNormalization": "batchnorm",
    "LayerNormalization": "layernorm",
    "GroupNormalization": "groupnorm",
    "InstanceNormalization": "instancenorm",
    "LRN": "lrn",
    "Relu": "relu",
    "LeakyRelu": "leaky_relu",
    "PRelu": "prelu",
    "Elu": "elu",
    "Selu": "selu",
    "Celu": "celu",
    "Gelu": "gelu",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "HardSigmoid": "hardsigmoid",
    "HardSwish": "hardswish",
    "Softplus": "softplus",
    "Mish": "mish",
    "Clip": "clamp",
    "Softmax": "softmax",
    "LogSoftmax": "log_softmax",
    "MaxPool": "maxpool",
    "GlobalMaxPool": "maxpool",
    "AveragePool": "avgpool",
    "GlobalAveragePool": "avgpool",
    "ReduceMean": "mean",
    "Add": "add",
    "Sub": "sub",
    "Mul": "mul",
    "Div": "div",
    "Concat": "cat",
    "Flatten": "reshape",
    "Reshape": "reshape",
    "Transpose": "reshape",
    "Squeeze": "reshape",
    "Unsqueeze": "reshape",
    "Expand": "reshape",
    "Dropout": "dropout",
    "Identity": "identity",
    "Split": "split",
    "Slice": "getitem",
    "Gather": "getitem",
    "LSTM": "rnn",
    "GRU": "rnn",
    "RNN": "rnn",
    "Constant": "param",
    "Pad": "pad",
    "Resize": "upsample",
    "Upsample": "upsample",
    "Exp": "exp",
    "Log": "log",
    "Sqrt": "sqrt",
    "Pow": "pow",
    "Neg": "neg",
    "Abs": "abs",
    "Shape": "size",
    "If": "control",
    "Loop": "control",
    "Scan": "control",
    "Einsum": "matmul",
}


def load_model(path: str) -> onnx.ModelProto:
    """Read and validate an ONNX file; refuse external data that points outside its folder."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    file = Path(path)
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(
            f"{path}: not a readable ONNX model ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'parse error'})"
        ) from None
    if not model.graph.node and not model.graph.input:
        raise UserError(f"{path}: not a readable ONNX model (empty graph)")
    base = file.resolve().parent
    external = [t for t in _all_initializers(model.graph) if uses_external_data(t)]
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise UserError(
                f"{path}: initializer {tensor.name!r} refers to external data "
                f"{location!r} outside the model's folder; refusing to read it"
            )
        if not target.is_file():
            raise UserError(
                f"{path}: external data file {location!r} for {tensor.name!r} is missing"
            )
    if external:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(base))
        except Exception as e:
            raise UserError(f"{path}: cannot read external data ({e})") from None
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shapes are a bonus; rules work without them
        pass
    return model


def _all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_initializers(attr.g)
            for g in attr.graphs:
                yield from _all_initializers(g)


def _param(array: np.ndarray) -> ParamInfo:
    flat = array.astype(np.float64).reshape(-1)
    n = flat.size
    return ParamInfo(
        shape=tuple(array.shape),
        numel=int(n),
        mean=float(flat.mean()) if n else 0.0,
        std=float(flat.std(ddof=1)) if n > 1 else 0.0,
        all_equal=bool(n > 1 and np.all(flat == flat[0])),
    )


def _shape(value_info) -> tuple[int, ...] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    return tuple(dims)


def build(path: str) -> Graph:
    from onnx import helper, numpy_helper

    model = load_model(path)
    shown = path
    graph = Graph(frontend="onnx")
    weights: dict[str, np.ndarray] = {}
    for t in _all_initializers(model.graph):
        try:
            weights[t.name] = numpy_helper.to_array(t)
        except Exception:
            continue
    shapes = {
        vi.name: _shape(vi)
        for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]
    }
    producer: dict[str, str] = {}
    for inp in model.graph.input:
        if inp.name in weights:
            continue
        node = graph.add(
            Node(name=f"input:{inp.name}", op="input", target="input", shape=_shape(inp))
        )
        producer[inp.name] = node.name

    def add_nodes(nodes, prefix: str = "") -> None:
        for i, proto in enumerate(nodes):
            name = prefix + (proto.name or f"{proto.op_type}_{i}")
            while name in graph.nodes:
                name += "_"
            attrs = {
                a.name: helper.get_attribute_value(a)
                for a in proto.attribute
                if a.type != a.GRAPH and a.type != a.GRAPHS
            }
            attrs = {
                k: (v.decode() if isinstance(v, bytes) else v)
                for k, v in attrs.items()
                if isinstance(v, (int, float, bytes, str, list))
            }
            attrs["type"] = proto.op_type
            node = Node(
                name=name,
                op=_OPS.get(proto.op_type, proto.op_type.lower()),
                target=f"onnx.{proto.op_type}",
                module=name,
                inputs=[producer[i] for i in proto.input if i in producer],
                attrs=attrs,
                location=Location(shown, None),
            )
            _weights_of(node, proto, weights)
            out = proto.output[0] if proto.output else None
            node.shape = shapes.get(out) if out else None
            graph.add(node)
            for o in proto.output:
                producer[o] = name
            fused = _folded_norm(proto) if from_pytorch else None
            if fused is not None:
                folded.append(name)
                norm = graph.add(_folded_batchnorm(node, fused))
                for o in proto.output:
                    producer[o] = norm.name
            for a in proto.attribute:  # If/Loop bodies: their nodes join the graph
                subgraphs = (
                    [a.g] if a.type == a.GRAPH else list(a.graphs) if a.type == a.GRAPHS else []
                )
                for sub in subgraphs:
                    add_nodes(sub.node, prefix=f"{name}/")
                    for o in sub.output:
                        if o.name in producer:
                            node.inputs.append(producer[o.name])

    from_pytorch = model.producer_name == "pytorch"
    folded: list[str] = []
    add_nodes(model.graph.node)
    if folded:
        graph.notes.append(
            f"{len(folded)} conv/linear layer(s) carry a BatchNorm folded in at export "
            "(torch.onnx.export fuses them for inference): they are judged as layer + "
            "BatchNorm."
        )
    graph.add(
        Node(
            name=graph.fresh_name("output"),  # a node of the file may be named `output`
            op="output",
            target="output",
            inputs=[producer[o.name] for o in model.graph.output if o.name in producer],
        )
    )
    return graph


# The dynamo exporter records the aten call each ONNX node came from; a folded BatchNorm keeps
# its momentum there: _no_training(input, w, b, mean, var, momentum, eps), the training variants
# (input, w, b, mean, var, training, momentum, eps).
_BN_CALL = re.compile(
    r"aten\._native_batch_norm_legit(_no_training|_functional)?\.default\]"
    r"\(args = \((.*)\), kwargs"
)


def _folded_norm(proto) -> dict | None:
    """The BatchNorm an export fused into this Conv, as IR attributes, or None.

    Both PyTorch exporters fold BatchNorm into the conv before it for inference. The TorchScript
    exporter (dynamo=False, eval mode) replaces the conv's weight and bias by new constants named
    'onnx::Conv_<n>' (a conv it leaves alone keeps 'features.0.weight'); the dynamo exporter's
    optimizer names the rewrite in the node's metadata (FuseBatchNormIntoConv) and keeps the
    original aten call, momentum included."""
    if proto.op_type not in ("Conv", "ConvTranspose", "Gemm"):
        return None
    meta = {p.key: p.value for p in proto.metadata_props}
    if "BatchNorm" in meta.get("pkg.onnxscript.rewriter.rule_name", ""):
        attrs: dict = {}
        call = _BN_CALL.search(meta.get("pkg.torch.onnx.fx_node", ""))
        if call:
            args = [a.strip() for a in call.group(2).split(",")]
            index = 5 if call.group(1) == "_no_training" else 6
            try:
                attrs["momentum"] = float(args[index])
                attrs["track_running_stats"] = True
            except (IndexError, ValueError):
                pass  # momentum=None: a cumulative average
        scopes = meta.get("pkg.torch.onnx.name_scopes", "")
        scope = re.findall(r"'([^']*)'", scopes)
        if len(scope) >= 2 and scope[-2]:
            attrs["torch_module"] = scope[-2]
        return attrs
    if (
        proto.op_type != "Gemm"
        and len(proto.input) >= 3
        and all(name.startswith("onnx::") for name in proto.input[1:3])
    ):
        return {}
    return None


def _folded_batchnorm(conv: Node, extra: dict) -> Node:
    """The BatchNorm the exporter folded into `conv`, made visible to the rules again. The conv's
    bias is the BatchNorm's shift, not a bias before a norm (ND109)."""
    conv.attrs["has_bias"] = False
    conv.attrs["folded_batchnorm"] = True
    channels = conv.attrs.get("out_channels") or conv.attrs.get("out_features")
    attrs = {"type": "BatchNormalization", "folded": True, **extra}
    if channels:
        attrs["num_features"] = channels
    torch_module = extra.get("torch_module")
    module = f"{torch_module} (folded into {conv.name})" if torch_module else conv.name
    return Node(
        name=f"{conv.name}/folded BatchNorm",
        op="batchnorm",
        target="onnx.folded",
        module=module,
        inputs=[conv.name],
        attrs=attrs,
        shape=conv.shape,
        location=conv.location,
    )


def _weights_of(node: Node, proto: onnx.NodeProto, weights: dict[str, np.ndarray]) -> None:
    """Attach parameter summaries and the constructor-like facts rules read."""
    ins = list(proto.input)

    def w(i: int) -> np.ndarray | None:
        return weights.get(ins[i]) if len(ins) > i else None

    w0, w1, w2 = w(0), w(1), w(2)
    matmul_w = w1 if w1 is not None else w0
    op = proto.op_type
    if op in ("Conv", "ConvTranspose") and w1 is not None:
        W = w1
        node.params["weight"] = _param(W)
        if w2 is not None:
            node.params["bias"] = _param(w2)
        group = int(node.attrs.get("group", 1))
        node.attrs.update(
            out_channels=int(W.shape[0]),
            in_channels=int(W.shape[1]) * group,
            kernel_size=tuple(int(k) for k in W.shape[2:]),
            stride=tuple(int(s) for s in node.attrs.get("strides", [1] * (W.ndim - 2))),
            groups=group,
            has_bias=w2 is not None,
            type=f"Conv{max(1, W.ndim - 2)}d",
        )
    elif op == "Gemm" and w1 is not None:
        W = w1
        W = W if node.attrs.get("transB", 0) else W.T
        node.params["weight"] = _param(W)
        if w2 is not None:
            node.params["bias"] = _param(w2)
        node.attrs.update(
            out_features=int(W.shape[0]),
            in_features=int(W.shape[1]),
            has_bias=w2 is not None,
            type="Linear",
        )
    elif op == "MatMul" and matmul_w is not None:
        W = matmul_w.T  # stored (in, out): report (out, in)
        node.op = "linear"
        node.params["weight"] = _param(W)
        node.attrs.update(
            out_features=int(W.shape[0]),
            in_features=int(W.shape[1]) if W.ndim > 1 else 1,
            has_bias=False,
            type="Linear",
        )
    elif op == "MatMul":
        node.op = "matmul"
    elif op == "BatchNormalization":
        onnx_momentum = float(node.attrs.get("momentum", 0.9))
        node.attrs.update(
            onnx_momentum=onnx_momentum,
            momentum=round(1.0 - onnx_momentum, 6),
            track_running_stats=True,
            type="BatchNormalization",
        )
        if w1 is not None:
            node.params["weight"] = _param(w1)
            node.attrs["num_features"] = int(w1.shape[0])
        if w2 is not None:
            node.params["bias"] = _param(w2)
    elif op == "Gather" and w0 is not None and w0.ndim == 2:
        node.op = "embedding"
        node.params["weight"] = _param(w0)
    elif op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization"):
        if w1 is not None:
            node.params["weight"] = _param(w1)
    elif op == "Add" and (w0 is not None or w1 is not None):
        node.attrs["bias_add"] = True
