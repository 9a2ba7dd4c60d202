"""Fallback frontend for models torch.fx cannot trace (data-dependent control flow, modules kept
in plain lists, ...): run one real forward on an example input and build the IR from what executed.

Leaf modules are seen through forward hooks; functional ops between them (F.relu, +, torch.cat,
.detach()) through a TorchFunctionMode. Dataflow edges follow tensor identity. Hooks and the mode
are always removed and module modes restored.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode

from netdoctor.graph.ir import NORM_OPS, WEIGHT_OPS, Graph, Node
from netdoctor.graph.ops import (
    OPAQUE_LEAVES,
    TRANSPARENT,
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
from netdoctor.loading.forward import ForwardFailure, preserved_modes, tensor_shapes, tensors_in
from netdoctor.loading.provenance import Provenance

# Functions that never carry data flow worth a node.
_IGNORED = {
    "size",
    "dim",
    "numel",
    "__get__",
    "__len__",
    "__format__",
    "__repr__",
    "__bool__",
    "__contains__",
    "__iter__",
    "__hash__",
    "is_floating_point",
    "stride",
    "__setstate__",
    "data_ptr",
    "element_size",
    "get_device",
    "__index__",
    "__int__",
    "__float__",
}
_FLOW_BREAKERS = {"item", "numpy", "tolist", "__bool__"}
# Tensor attributes read through a property that are tensors made from the tensor's values (a
# transposed view, the real part), by the op kind they are recorded as; other attributes (.shape,
# .dtype, .device, .grad) carry none of its values.
_VALUE_ATTRIBUTES = {"T": "reshape", "mT": "reshape", "H": "reshape", "mH": "reshape"}
_VALUE_ATTRIBUTES |= {"real": "real", "imag": "imag"}


def is_leaf(module: nn.Module) -> bool:
    """Like fx: torch.nn's own modules are leaves (except containers); user modules are looked
    into."""
    if isinstance(module, OPAQUE_LEAVES):
        return True
    if isinstance(module, TRANSPARENT):
        return False
    return type(module).__module__.startswith("torch.nn") or not any(
        True for _ in module.children()
    )


def normalizes(mod: nn.Module, args: tuple[Any, ...], out: Any) -> bool:
    """Whether a user-defined leaf module is a normalization (a library's own LayerNorm or
    RMSNorm class, opaque to the graph): its output is the same when its input is scaled
    (f(2x) = f(x), what normalizing by the input's own statistics does, and no other layer).
    Only asked of a module with one floating-point tensor input, an output of the same shape,
    no buffers (no running statistics to disturb) and no parameters but per-feature ones (a
    gain and bias over the last dimension); it is run once more, on 2x its input."""
    if module_op(mod) != "module" or any(True for _ in mod.buffers()):
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if len(args) != 1 or len(tensors) != 1 or not isinstance(out, torch.Tensor):
        return False
    x = tensors[0]
    if not x.is_floating_point() or out.shape != x.shape or x.dim() < 2 or x.numel() < 2:
        return False
    if any(p.dim() != 1 or p.shape[0] != x.shape[-1] for p in mod.parameters()):
        return False
    with torch.no_grad():
        base = out.detach().float()
        spread = float(base.std())
        if not spread > 0 or not torch.isfinite(base).all():
            return False
        try:
            again = mod.forward(x.detach() * 2.0)
        except Exception:
            return False
        if not isinstance(again, torch.Tensor) or again.shape != out.shape:
            return False
        return bool(torch.allclose(again.float(), base, rtol=1e-2, atol=1e-2 * spread))


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: Graph, model: nn.Module, names: dict[nn.Module, str]) -> None:
        super().__init__()
        self.graph = graph
        self.names = names
        self.producer: dict[int, str] = {}  # by id() of a live tensor (`_track`)
        self.tracked: dict[int, weakref.ref] = {}
        # autograd nodes of the recorded tensors (held, so their ids stay theirs): which
        # recorded op a custom Function's input came from, once that input is gone
        self.grad_fns: dict[int, tuple[Any, str]] = {}
        self.leaf_depth = 0
        self.calls: dict[str, int] = {}
        self.params = {id(p): n for n, p in model.named_parameters()}
        self.pending_inputs: list[str] = []  # the producers of the open leaf call's inputs
        # Parameters of other modules that the open leaf call reads (a function wrapped in a
        # module, handed the module whose weights it uses): inputs of its node as well.
        self.own: set[int] = set()  # the open leaf's own parameters
        self.foreign: list[str] = []
        self.inside: _Recorder | None = None  # records the open user-defined leaf's own ops
        self.functions: dict[int, str] = {}  # custom autograd.Function calls: grad_fn id -> node

    # -- bookkeeping -------------------------------------------------------------------
    def unique(self, base: str) -> str:
        base = base.replace(".", "_") if base else "node"
        while True:
            n = self.calls.get(base, 0)
            self.calls[base] = n + 1
            name = base if n == 0 else f"{base}_{n}"
            if name not in self.graph.nodes:  # taken: the input `x`, or a module named `x_1`
                return name

    def inputs_of(self, value: Any) -> list[str]:
        names: list[str] = []
        for t in tensors_in(value):
            name = self.producer.get(id(t))
            if name is None and id(t) in self.params:
                name = self._param_node(t)
            if name is not None and isinstance(t.grad_fn, BackwardCFunction):
                name = self._function_call(t, name)
            if name is not None and name not in names:
                names.append(name)
        return names

    def _param_node(self, t: torch.Tensor) -> str:
        full = self.params[id(t)]
        owner, _, leaf = full.rpartition(".")
        node = self.graph.add(
            Node(
                name=self.unique("param_" + full),
                op="param",
                target=full,
                module=owner or None,
                params={leaf: param_info(t)},
            )
        )
        self._track(t, node.name)
        return node.name

    def _function_call(self, t: torch.Tensor, inner: str) -> str:
        """The node of a custom torch.autograd.Function call that returned `t`. Its forward runs
        with grad disabled, so its ops were recorded as a no_grad region ending in `inner`; but
        its backward sends the output's gradient to the Function's inputs. One node stands for
        the call, fed by those inputs (found through the autograd graph), so the gradient is
        seen to pass."""
        fn = t.grad_fn
        if fn is None or not self.graph.nodes[inner].attrs.get("no_grad"):
            return inner
        if id(fn) in self.functions:
            return self.functions[id(fn)]
        by_grad_fn = {key: name for key, (_, name) in self.grad_fns.items()}
        inputs: list[str] = []
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)  # AccumulateGrad: a leaf tensor, e.g. a weight
            if var is not None:
                name = self.producer.get(id(var))
                if name is None and id(var) in self.params:
                    name = self._param_node(var)
            else:
                name = by_grad_fn.get(id(nxt))
            if name is not None and name not in inputs:
                inputs.append(name)
        if not inputs:
            return inner
        cls = getattr(fn, "_forward_cls", type(fn))
        done = self.graph.nodes[inner]
        node = self.graph.add(
            Node(
                name=self.unique(cls.__name__),
                op="autograd_function",
                target=f"{cls.__module__}.{cls.__qualname__}",
                inputs=inputs,
                shape=done.shape,
                location=done.location,
            )
        )
        self.functions[id(fn)] = node.name
        self._track(t, node.name)
        return node.name

    def produced(self, value: Any, node_name: str) -> None:
        for t in tensors_in(value):
            self._track(t, node_name)

    def _track(self, t: torch.Tensor, node_name: str) -> None:
        """`t` came from `node_name`, for as long as it lives: its id is forgotten when it dies
        (before another tensor can take that id), so the forward's activations are not kept
        alive by the recording."""
        key = id(t)
        self.producer[key] = node_name
        if t.grad_fn is not None and id(t.grad_fn) not in self.grad_fns:
            self.grad_fns[id(t.grad_fn)] = (t.grad_fn, node_name)
        if key not in self.tracked:
            self.tracked[key] = weakref.ref(t, functools.partial(self._forget, key))

    def _forget(self, key: int, _ref: weakref.ref) -> None:
        self.producer.pop(key, None)
        self.tracked.pop(key, None)

    # -- functional ops ----------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.leaf_depth:
            self.record(func, args, kwargs, out)
            return out
        if self.leaf_depth == 1 and self.inside is not None:
            self.inside.record(func, args, kwargs, out)
        for t in tensors_in((args, kwargs)):
            if id(t) in self.params and id(t) not in self.own:
                name = self.producer.get(id(t)) or self._param_node(t)
                if name not in self.foreign:
                    self.foreign.append(name)
        return out

    def record(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        """Add the node of one functional op (when it carries data flow)."""
        name = getattr(func, "__name__", "")
        attribute = None
        if name == "__get__":
            attribute = getattr(getattr(func, "__self__", None), "__name__", "")
            if attribute == "data":
                name = "data"  # `x.data`: a detached alias, recorded like x.detach()
            elif attribute in _VALUE_ATTRIBUTES:
                name = attribute  # `w.T`: a view of w's values (static taps w.T + dynamic ones)
        if name in _IGNORED:
            return
        inputs = self.inputs_of((args, kwargs))
        if not inputs:
            return
        # `x[i] = v` writes into x and returns None: from here on x holds the written value,
        # which depends on v (a bias written into attention scores reaches the output via x).
        result = args[0] if name == "__setitem__" and args else out
        if not tensors_in(result) and name not in _FLOW_BREAKERS:
            return
        op = "detach" if name == "data" else _VALUE_ATTRIBUTES.get(name) or function_op(func)
        node = Node(
            name=self.unique(name or "call"),
            op=op,
            target=target_name(func),
            inputs=inputs,
            location=user_frame_location(3),
        )
        if name == "data":
            node.target, node.attrs["via"] = "Tensor.data", ".data"
        elif attribute is not None:
            node.target = f"Tensor.{attribute}"
        shapes = tensor_shapes(result)
        node.shape = shapes[0] if shapes else None
        if integral(result):
            node.attrs["integral"] = True
        if op in ("softmax", "log_softmax"):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(dim, int):
                node.attrs["dim"] = dim
        consts = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if consts:  # as the fx frontend records them (`x * 0`, `v ** -0.5`)
            node.attrs["constants"] = consts
        if op in WEIGHT_OPS or op in NORM_OPS:  # as the fx frontend records them
            node.attrs["weight_args"] = {
                role: next(iter(self.inputs_of(value)), None)
                for role, value in weight_arguments(func, args, kwargs).items()
            }
        if not torch.is_grad_enabled():
            node.attrs["no_grad"] = True
        self.graph.add(node)
        self.produced(result, node.name)


def _inside(module: nn.Module, args: tuple[Any, ...]) -> _Recorder:
    """A recorder for the ops of one call of a user-defined leaf, its inputs as input nodes."""
    inside = _Recorder(Graph(frontend="hooks"), module, {})
    for i, t in enumerate(tensors_in(args)):
        inside.graph.add(Node(name=f"x{i}", op="input", target="input"))
        inside.produced(t, f"x{i}")
    return inside


def _normalizes(inside: _Recorder, out: Any) -> bool:
    """Whether the leaf's output was normalized inside it: by a functional normalization
    (`F.rms_norm`, `F.layer_norm`, `F.group_norm`, ...), by the activation's own statistics, or
    through a weight standardized in forward (see walks)."""
    from netdoctor.graph.walks import self_normalized, standardized_weight

    graph = inside.graph
    graph.add(
        Node(
            name=graph.fresh_name("output"),
            op="output",
            target="output",
            inputs=inside.inputs_of(out),
        )
    )
    live = graph.reaching_output()
    memo: dict[str, bool] = {}
    return any(
        node.name in live and (node.op in NORM_OPS or standardized_weight(graph, node, memo))
        for node in graph
    ) or bool(self_normalized(graph) & live)


def build(
    model: nn.Module,
    prov: Provenance,
    example: torch.Tensor,
    observers: Iterable[tuple[nn.Module, Callable[..., None]]] = (),
) -> Graph:
    """Run one forward of `example` and record it. Raises ForwardFailure if forward raises.
    `observers`, (module, forward hook) pairs, see the same forward; they run before the
    recording's own hooks close a module's call, so their tensor ops go unrecorded."""
    graph = Graph(frontend="hooks")
    record_modules(graph, model, prov)
    extra = record_unregistered(graph, model, prov)
    names = {m: n for n, m in model.named_modules()}
    for n, m in extra.items():
        names.setdefault(m, n)
    rec = _Recorder(graph, model, names)
    stack: list[tuple[nn.Module, list[tuple[int, ...]]]] = []
    failed: list[tuple[nn.Module, list[tuple[int, ...]]]] = []
    seen_leaf: list[int] = []

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        stack.append((mod, tensor_shapes(args)))
        if mod in leaves:
            if rec.leaf_depth == 0:
                seen_leaf.append(len(stack))
                rec.pending_inputs = rec.inputs_of((args, kwargs))  # `f(x, beta=b)`: b too
                rec.own = {id(p) for p in mod.parameters()}
                rec.foreign = []
                if mod in inspected:
                    rec.inside = _inside(mod, (args, kwargs))
            rec.leaf_depth += 1

    def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if stack:
            stack.pop()
        if mod not in leaves and rec.leaf_depth == 0:
            # A submodule returning several values (a backbone's sequence output and pooled
            # output): which nodes it returned, so rules can tell an output the caller ignores.
            returned = rec.inputs_of(out)
            if len(returned) > 1:
                for name in returned:
                    graph.nodes[name].attrs.setdefault("returned_by", []).append(names[mod])
        if mod in leaves:
            if rec.leaf_depth == 1:  # still > 0: netdoctor's own tensor ops here go unrecorded
                inside, rec.inside = rec.inside, None
                path = names.get(mod, "")
                node = Node(
                    name=rec.unique(path or type(mod).__name__),
                    op=module_op(mod),
                    target=f"{type(mod).__module__}.{type(mod).__name__}",
                    module=path,
                    inputs=rec.pending_inputs
                    + [n for n in rec.foreign if n not in rec.pending_inputs],
                    params=module_params(mod),
                    attrs=module_attrs(mod),
                    location=prov.site(mod),
                )
                call = user_frame_location(2)
                if call is not None:
                    node.attrs["call_location"] = call
                if node.op == "module" and normalizes(mod, args, out):
                    node.attrs["normalizes"] = True
                if not torch.is_grad_enabled():
                    node.attrs["no_grad"] = True
                shapes = tensor_shapes(out)
                node.shape = shapes[0] if shapes else None
                if integral(out):
                    node.attrs["integral"] = True
                if inside is not None and _normalizes(inside, out):
                    node.attrs["normalizes"] = True
                graph.add(node)
                rec.produced(out, node.name)
            rec.leaf_depth -= 1

    leaves = {m for m in names if m is not model and is_leaf(m)}
    # User-defined leaves (modules without children) are one node each, but what they compute
    # decides whether they normalize: their own ops are recorded aside, for that question only.
    inspected = {
        m
        for m in leaves
        if not isinstance(m, OPAQUE_LEAVES) and not type(m).__module__.startswith("torch.nn")
    }
    handles = []
    try:
        for module, hook in observers:
            handles.append(module.register_forward_hook(hook))
        for m in names:
            if m is model:
                continue
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post))
        inp = graph.add(Node(name="x", op="input", target="input", shape=tuple(example.shape)))
        rec.produced(example, inp.name)
        # Eval mode so BatchNorm running statistics are left untouched; grad stays enabled so
        # a no_grad block inside forward is visible.
        with preserved_modes(model):
            model.eval()
            try:
                with rec, torch.enable_grad():
                    out = model(example)
            except Exception as e:
                failed = list(stack)
                inner = failed[-1][0] if failed else None
                raise ForwardFailure(
                    error=e,
                    module=names.get(inner) if inner is not None else None,
                    module_type=type(inner).__name__ if inner is not None else None,
                    input_shapes=failed[-1][1] if failed else tensor_shapes(example),
                    param_shapes={
                        k: tuple(p.shape) for k, p in inner.named_parameters(recurse=False)
                    }
                    if inner is not None
                    else {},
                ) from e
        graph.add(
            Node(
                name=graph.fresh_name("output"),  # a module may be named `output`
                op="output",
                target="output",
                inputs=rec.inputs_of(out),
            )
        )
    finally:
        for h in handles:
            h.remove()
    graph.input_shape = tuple(example.shape[1:])
    return graph
