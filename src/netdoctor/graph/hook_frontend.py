"""Fallback frontend for models torch.fx cannot trace (data-dependent control flow, modules kept
in plain lists, ...): run one real forward on an example input and build the IR from what executed.

Leaf modules are seen through forward hooks; functional ops between them (F.relu, +, torch.cat,
.detach()) through a TorchFunctionMode. Dataflow edges follow tensor identity. Hooks and the mode
are always removed and module modes restored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
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
from netdoctor.graph.torch_common import record_modules, record_unregistered, user_frame_location
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


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: Graph, model: nn.Module, names: dict[nn.Module, str]) -> None:
        super().__init__()
        self.graph = graph
        self.names = names
        self.producer: dict[int, str] = {}
        self.keep: list[Any] = []  # keeps tensors alive so ids stay unique
        self.leaf_depth = 0
        self.calls: dict[str, int] = {}
        self.params = {id(p): n for n, p in model.named_parameters()}
        self.pending_inputs: list[str] = []  # the producers of the open leaf call's inputs
        self.inside: _Recorder | None = None  # records the open user-defined leaf's own ops

    # -- bookkeeping -------------------------------------------------------------------
    def unique(self, base: str) -> str:
        base = base.replace(".", "_") if base else "node"
        n = self.calls.get(base, 0)
        self.calls[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def inputs_of(self, value: Any) -> list[str]:
        names: list[str] = []
        for t in tensors_in(value):
            name = self.producer.get(id(t))
            if name is None and id(t) in self.params:
                name = self._param_node(t)
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
        self.producer[id(t)] = node.name
        self.keep.append(t)
        return node.name

    def produced(self, value: Any, node_name: str) -> None:
        for t in tensors_in(value):
            self.producer[id(t)] = node_name
            self.keep.append(t)

    # -- functional ops ----------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.leaf_depth:
            self.record(func, args, kwargs, out)
        elif self.leaf_depth == 1 and self.inside is not None:
            self.inside.record(func, args, kwargs, out)
        return out

    def record(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        """Add the node of one functional op (when it carries data flow)."""
        name = getattr(func, "__name__", "")
        if name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") == "data":
            name = "data"  # `x.data`: a detached alias, recorded like x.detach()
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
        op = "detach" if name == "data" else function_op(func)
        node = Node(
            name=self.unique(name or "call"),
            op=op,
            target=target_name(func),
            inputs=inputs,
            location=user_frame_location(3),
        )
        if name == "data":
            node.target, node.attrs["via"] = "Tensor.data", ".data"
        shapes = tensor_shapes(result)
        node.shape = shapes[0] if shapes else None
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
    graph.add(Node(name="output", op="output", target="output", inputs=inside.inputs_of(out)))
    live = graph.reaching_output()
    memo: dict[str, bool] = {}
    return any(
        node.name in live and (node.op in NORM_OPS or standardized_weight(graph, node, memo))
        for node in graph
    ) or bool(self_normalized(graph) & live)


def build(model: nn.Module, prov: Provenance, example: torch.Tensor) -> Graph:
    """Run one forward of `example` and record it. Raises ForwardFailure if forward raises."""
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

    def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
        stack.append((mod, tensor_shapes(args)))
        if mod in leaves:
            if rec.leaf_depth == 0:
                seen_leaf.append(len(stack))
                rec.pending_inputs = rec.inputs_of(args)
                if mod in inspected:
                    rec.inside = _inside(mod, args)
            rec.leaf_depth += 1

    def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if stack:
            stack.pop()
        if mod in leaves:
            if rec.leaf_depth == 1:  # still > 0: netdoctor's own tensor ops here go unrecorded
                inside, rec.inside = rec.inside, None
                path = names.get(mod, "")
                node = Node(
                    name=rec.unique(path or type(mod).__name__),
                    op=module_op(mod),
                    target=f"{type(mod).__module__}.{type(mod).__name__}",
                    module=path,
                    inputs=rec.pending_inputs,
                    params=module_params(mod),
                    attrs=module_attrs(mod),
                    location=prov.site(mod),
                )
                call = user_frame_location(2)
                if call is not None:
                    node.attrs["call_location"] = call
                if not torch.is_grad_enabled():
                    node.attrs["no_grad"] = True
                shapes = tensor_shapes(out)
                node.shape = shapes[0] if shapes else None
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
        for m in names:
            if m is model:
                continue
            handles.append(m.register_forward_pre_hook(pre))
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
        graph.add(Node(name="output", op="output", target="output", inputs=rec.inputs_of(out)))
    finally:
        for h in handles:
            h.remove()
    graph.input_shape = tuple(example.shape[1:])
    return graph
