"""torch.fx frontend: symbolic trace (train mode) -> IR, shapes from one run of the traced graph."""

from __future__ import annotations

import torch
from torch import fx, nn

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


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph and keeps each node's output shape: what fx's ShapeProp records,
    without its symbolic-shape machinery (importing that alone costs more than a whole check)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.completed = False

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
        return result

    def run(self, *args):
        """fx.Interpreter.run without its progress bar (making one, even disabled, imports
        multiprocessing's locks: a third of a second on a small machine)."""
        self.completed = False
        self.shapes = {}
        self.env = {}
        self.args_iter = iter(self.graph.process_inputs(*args))
        try:
            for node in self.graph.nodes:
                self.env[node] = self.run_node(node)
                if self.garbage_collect_values:
                    for done in self.user_to_last_uses.get(node, []):
                        del self.env[done]
                if node.op == "output":
                    self.completed = True
                    return self.graph.process_outputs(self.env[node])
        finally:
            self.env = {}

    def commit(self) -> None:
        """node.meta["netdoctor_shape"] from the last complete run (shapes of a failed run are
        never kept)."""
        for node in self.module.graph.nodes:
            node.meta.pop("netdoctor_shape", None)
            if self.completed and node in self.shapes:
                node.meta["netdoctor_shape"] = self.shapes[node]


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Run the traced graph in eval mode without grad and record node.meta["netdoctor_shape"];
    raises what the run raises (and then records nothing)."""
    recorder = _ShapeRecorder(gm)
    try:
        with preserved_modes(gm), torch.no_grad():
            gm.eval()
            recorder.run(example)
    finally:
        recorder.commit()


def build(model: nn.Module, prov: Provenance, gm: fx.GraphModule) -> Graph:
    graph = Graph(frontend="fx")
    record_modules(graph, model, prov)
    record_unregistered(graph, model, prov)
    for fxn in gm.graph.nodes:
        node = Node(name=fxn.name, op="other", target=str(fxn.target),
                    inputs=[a.name for a in fxn.all_input_nodes])
        if fxn.meta.get("netdoctor_shape") is not None:
            node.shape = fxn.meta["netdoctor_shape"]
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
