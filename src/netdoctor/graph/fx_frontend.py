"""torch.fx frontend: symbolic trace (train mode) -> IR; every node's shape from a replay of the
traced graph on what its leaf modules returned in the check's one eager forward (or, when that
is not possible, from a run of the traced graph)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch.autograd.function import FunctionCtx

from netdoctor.graph.ir import NORM_OPS, WEIGHT_OPS, Graph, Node, UnregisteredHolder
from netdoctor.graph.ops import (
    function_op,
    module_attrs,
    module_op,
    module_params,
    param_info,
    target_name,
    weight_arguments,
)
from netdoctor.graph.torch_common import (
    integral,
    record_modules,
    record_unregistered,
    user_frame_location,
)
from netdoctor.loading.forward import preserved_modes
from netdoctor.loading.provenance import Provenance


class _Tracer(fx.Tracer):
    """Records, per node, the innermost user-code line (cheaper than fx's full stack traces)."""

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        if kind in ("call_function", "call_method", "call_module"):
            proxy.node.meta["netdoctor_location"] = user_frame_location(2)
        # Inside a `with torch.no_grad():` block in forward; not inside the forward of a custom
        # autograd.Function, which runs without grad while its backward supplies the gradient.
        if not torch.is_grad_enabled() and not _in_function_forward():
            proxy.node.meta["netdoctor_no_grad"] = True
        return proxy


def _in_function_forward() -> bool:
    """Whether the caller runs inside a torch.autograd.Function's forward (whose first argument,
    ctx, is a FunctionCtx)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and code.co_argcount:
            if isinstance(frame.f_locals.get(code.co_varnames[0]), FunctionCtx):
                return True
        frame = frame.f_back
    return False


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
        self.integral: set[fx.Node] = set()  # nodes whose value is integers or booleans
        self.completed = False

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
        if integral(result):
            self.integral.add(n)
        return result

    def run_quietly(self, *args: Any) -> Any:
        """fx.Interpreter.run without its progress bar (making one, even disabled, imports
        multiprocessing's locks: a third of a second on a small machine)."""
        self.completed = False
        self.shapes = {}
        self.integral = set()
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
        for node in self.graph.nodes:  # the module's graph
            node.meta.pop("netdoctor_shape", None)
            node.meta.pop("netdoctor_integral", None)
            if self.completed and node in self.shapes:
                node.meta["netdoctor_shape"] = self.shapes[node]
            if self.completed and node in self.integral:
                node.meta["netdoctor_integral"] = True


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Run the traced graph in eval mode without grad and record node.meta["netdoctor_shape"];
    raises what the run raises (and then records nothing)."""
    _record(_ShapeRecorder(gm), gm, example)


class _Stub(NamedTuple):
    """A tensor the replay stands in: no values, only what shapes need."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


_OPAQUE = object()  # an output the replay cannot stand in (the leaf itself is run then)


def _stub(value: Any) -> Any:
    if type(value) is torch.Tensor or type(value) is nn.Parameter:
        return _Stub(tuple(value.shape), value.dtype, value.device)
    if type(value) in (tuple, list):  # not namedtuples (a PackedSequence's values matter)
        parts = [_stub(v) for v in value]
        return _OPAQUE if any(p is _OPAQUE for p in parts) else type(value)(parts)
    if value is None or type(value) in (bool, int, float, str):
        return value
    return _OPAQUE


def _stand_in(stub: Any) -> Any:
    if isinstance(stub, _Stub):
        return torch.zeros(stub.shape, dtype=stub.dtype, device=stub.device)
    if type(stub) in (tuple, list):
        return type(stub)(_stand_in(s) for s in stub)
    return stub


class LeafOutputs:
    """What each leaf module the traced graph calls returned in an eager forward, in call order
    (structure, shapes and dtypes; no values): hooks for that forward to fill."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.calls: dict[nn.Module, list] = {}
        self.nodes: dict[nn.Module, int] = {}  # how many nodes of the traced graph call each
        for node in gm.graph.nodes:
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                self.nodes[module] = self.nodes.get(module, 0) + 1

    def hooks(self) -> list[tuple[nn.Module, Callable]]:
        return [(module, self._record) for module in self.nodes]

    def _record(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.calls.setdefault(module, []).append(_stub(output))

    def replayable(self, module: nn.Module) -> list | None:
        """The module's outputs, when the eager forward called it as often as the traced graph
        does (so the i-th call of one is the i-th of the other)."""
        calls = self.calls.get(module, [])
        return calls if len(calls) == self.nodes.get(module) else None


class _Replay(_ShapeRecorder):
    """The traced graph with its leaf modules' work skipped: each call returns zeros shaped as
    the eager forward's output of that call, and the functional ops between them run on those
    (a fraction of the cost, the convolutions and matmuls being in the leaves)."""

    def __init__(self, gm: fx.GraphModule, outputs: LeafOutputs) -> None:
        super().__init__(gm)
        self.outputs = outputs
        self.pending: dict[nn.Module, Iterator] = {}

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = self.fetch_attr(target)
        if module not in self.pending:
            self.pending[module] = iter(self.outputs.replayable(module) or ())
        stub = next(self.pending[module], _OPAQUE)
        if stub is _OPAQUE:
            return super().call_module(target, args, kwargs)
        return _stand_in(stub)


def replay_shapes(gm: fx.GraphModule, example: torch.Tensor, outputs: LeafOutputs) -> None:
    """node.meta["netdoctor_shape"] for every node from a replay (see _Replay) on `example`, the
    eager forward's input; raises what the replay raises (and then records nothing)."""
    _record(_Replay(gm, outputs), gm, example)


def _record(recorder: _ShapeRecorder, gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Run `recorder` (an interpreter of `gm`) in eval mode without grad, then commit what it
    recorded (nothing when the run raised)."""
    try:
        with preserved_modes(gm), torch.no_grad():
            gm.eval()
            recorder.run_quietly(example)
    finally:
        recorder.commit()


def copy_shapes(gm: fx.GraphModule, graph: Graph) -> None:
    """The recorded shapes onto the IR's nodes (built before the shapes were known)."""
    for fxn in gm.graph.nodes:
        if fxn.name in graph.nodes:
            graph.nodes[fxn.name].shape = fxn.meta.get("netdoctor_shape")
            if fxn.meta.get("netdoctor_integral"):
                graph.nodes[fxn.name].attrs["integral"] = True


def build(
    model: nn.Module,
    prov: Provenance,
    gm: fx.GraphModule,
    unregistered: list[UnregisteredHolder] | None = None,
) -> Graph:
    """The IR of the traced graph (shapes where they are already recorded; copy_shapes adds
    them later). `unregistered`: the plain-container modules when the caller found them."""
    graph = Graph(frontend="fx")
    record_modules(graph, model, prov)
    if unregistered is None:
        record_unregistered(graph, model, prov)
    else:
        graph.unregistered = list(unregistered)
    for fxn in gm.graph.nodes:
        node = Node(
            name=fxn.name,
            op="other",
            target=str(fxn.target),
            inputs=[a.name for a in fxn.all_input_nodes],
        )
        if fxn.meta.get("netdoctor_shape") is not None:
            node.shape = fxn.meta["netdoctor_shape"]
        if fxn.meta.get("netdoctor_integral"):
            node.attrs["integral"] = True
        stack = fxn.meta.get("nn_module_stack")
        if stack:
            node.attrs["scope"] = (
                list(stack.values())[-1][0] if isinstance(list(stack.values())[-1], tuple) else None
            )
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
    if node.op == "cat" and not node.target.endswith("stack"):
        dim = fxn.kwargs.get("dim", fxn.args[1] if len(fxn.args) > 1 else 0)
        if isinstance(dim, int) and not isinstance(dim, bool):
            node.attrs["cat_dim"] = dim
    if node.op == "getitem" and len(fxn.args) == 2:
        index = basic_index(fxn.args[1])
        if index is not None:
            node.attrs["index"] = index
    consts = [a for a in fxn.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if consts:
        node.attrs["constants"] = consts
    if node.op in WEIGHT_OPS or node.op in NORM_OPS:
        # Which inputs a functional conv/linear or normalization takes as its weight and bias
        # (None: a value that is no node); the walks judge what the call outputs at init.
        roles = weight_arguments(fxn.target, fxn.args, fxn.kwargs)
        node.attrs["weight_args"] = {
            role: value.name if isinstance(value, fx.Node) else None
            for role, value in roles.items()
        }


def basic_index(index: Any) -> tuple[Any, ...] | None:
    """An indexing argument made of integers, slices with integer bounds, None and Ellipsis,
    as a tuple: an int, (start, stop, step) for a slice, None, or "..." for each entry; None
    for anything else (a tensor index, a computed bound)."""
    entries = index if isinstance(index, tuple) else (index,)
    out: list[Any] = []
    for e in entries:
        if e is None or (isinstance(e, int) and not isinstance(e, bool)):
            out.append(e)
        elif e is Ellipsis:
            out.append("...")
        elif isinstance(e, slice) and all(
            b is None or (isinstance(b, int) and not isinstance(b, bool))
            for b in (e.start, e.stop, e.step)
        ):
            out.append((e.start, e.stop, e.step))
        else:
            return None
    return tuple(out)


def _original_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
