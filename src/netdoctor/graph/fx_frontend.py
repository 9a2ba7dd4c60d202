"""torch.fx frontend: symbolic trace (train mode) -> IR, shapes from shape propagation."""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from netdoctor.graph.ir import Graph, Node
from netdoctor.graph.ops import (
    function_op,
    module_attrs,
    module_op,
    module_params,
    param_info,
    target_name,
)
from netdoctor.graph.torch_common import record_modules, record_unregistered, user_frame_location
from netdoctor.loading.forward import preserved_modes
from netdoctor.loading.provenance import Provenance


class _Tracer(fx.Tracer):
    """Records, per node, the innermost user-code line (cheaper than fx's full stack traces)."""

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        if kind in ("call_function", "call_method", "call_module"):
            proxy.node.meta["netdoctor_location"] = user_frame_location(2)
        if not torch.is_grad_enabled():  # inside a `with torch.no_grad():` block in forward
            proxy.node.meta["netdoctor_no_grad"] = True
        return proxy


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace in train mode (modes restored); raises whatever fx raises."""
    with preserved_modes(model):
        model.train()
        tracer = _Tracer()
        with torch.enable_grad():  # so only the model's own no_grad blocks are recorded
            graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    with preserved_modes(gm), torch.no_grad():
        gm.eval()
        ShapeProp(gm).propagate(example)


def build(model: nn.Module, prov: Provenance, gm: fx.GraphModule) -> Graph:
    graph = Graph(frontend="fx")
    record_modules(graph, model, prov)
    record_unregistered(graph, model, prov)
    for fxn in gm.graph.nodes:
        node = Node(name=fxn.name, op="other", target=str(fxn.target),
                    inputs=[a.name for a in fxn.all_input_nodes])
        meta = fxn.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            node.shape = tuple(meta.shape)
        stack = fxn.meta.get("nn_module_stack")
        if stack:
            node.attrs["scope"] = list(stack.values())[-1][0] if isinstance(
                list(stack.values())[-1], tuple) else None
        if fxn.op == "placeholder":
            node.op = "input"
        elif fxn.op == "output":
            node.op = "output"
        elif fxn.op == "get_attr":
            node.op = "param"
            owner, _, _ = fxn.target.rpartition(".")
            node.module = owner or None
            try:
                value = gm.get_parameter(fxn.target)
                node.params = {fxn.target.rpartition(".")[2]: param_info(value)}
            except AttributeError:
                pass
        elif fxn.op == "call_module":
            sub = gm.get_submodule(fxn.target)
            orig = _original_submodule(model, fxn.target) or sub
            node.op = module_op(sub)
            node.target = f"{type(sub).__module__}.{type(sub).__name__}"
            node.module = fxn.target
            node.params = module_params(sub)
            node.attrs.update(module_attrs(sub))
            node.location = prov.site(orig)
            if fxn.meta.get("netdoctor_location") is not None:  # the line in forward that calls it
                node.attrs["call_location"] = fxn.meta["netdoctor_location"]
        else:  # call_function / call_method
            node.op = function_op(fxn.target)
            node.target = target_name(fxn.target)
            node.location = fxn.meta.get("netdoctor_location")
            _function_attrs(node, fxn)
        if fxn.meta.get("netdoctor_no_grad"):
            node.attrs["no_grad"] = True
        graph.add(node)
    return graph


def _function_attrs(node: Node, fxn: fx.Node) -> None:
    if node.op == "getattr" and len(fxn.args) > 1 and isinstance(fxn.args[1], str):
        node.attrs["attr"] = fxn.args[1]
        if fxn.args[1] == "data":  # `x.data`: a detached view, like x.detach()
            node.op = "detach"
            node.attrs["via"] = ".data"
    if node.op in ("softmax", "log_softmax"):
        dim = fxn.kwargs.get("dim", fxn.args[1] if len(fxn.args) > 1 else None)
        if isinstance(dim, int):
            node.attrs["dim"] = dim
    consts = [a for a in fxn.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if consts:
        node.attrs["constants"] = consts


def _original_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
