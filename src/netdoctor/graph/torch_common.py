"""Facts both torch frontends record the same way: registered modules, plain-container modules,
source locations of user code lines."""

from __future__ import annotations

import functools
import os
import sys
from types import CodeType, FrameType
from typing import Any

from torch import nn

from netdoctor.findings import Location
from netdoctor.graph.ir import Graph, ModuleInfo, UnregisteredHolder
from netdoctor.loading.forward import tensors_in
from netdoctor.loading.provenance import Provenance, _is_internal, _is_library, class_location

_MODULE_INTERNALS = {
    "_parameters",
    "_buffers",
    "_modules",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
}


def integral(value: Any) -> bool:
    """Whether every tensor in `value` holds integers or booleans (indices, masks, hash codes):
    values no gradient flows through."""
    tensors = tensors_in(value)
    return bool(tensors) and not any(t.is_floating_point() or t.is_complex() for t in tensors)


def record_modules(graph: Graph, model: nn.Module, prov: Provenance) -> None:
    owners: dict[int, set[int]] = {}  # parameter id -> ids of the modules that hold it
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    for path, m in model.named_modules():
        if not path:
            continue
        own = list(m.parameters(recurse=False))
        trainable = sum(p.numel() for p in own if p.requires_grad)
        graph.modules[path] = ModuleInfo(
            path=path,
            type=type(m).__name__,
            trainable=trainable,
            location=prov.site(m),
            is_leaf=not any(True for _ in m.children()),
            shares_parameters=any(len(owners[id(p)]) > 1 for p in own),
        )
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    graph.tied = [tuple(group) for group in names.values() if len(group) > 1]


def unregistered_modules(
    model: nn.Module,
) -> list[tuple[str, str, str, list[tuple[str, nn.Module]], nn.Module]]:
    """(owner path, attribute, container kind, [(display name, module)], owner) for every
    nn.Module kept in a plain list/tuple/dict attribute of a registered module."""
    found = []
    for owner_path, owner in model.named_modules():
        for attr, value in vars(owner).items():
            if attr in _MODULE_INTERNALS or attr.startswith("__"):
                continue
            held: list[tuple[str, nn.Module]] = []
            if isinstance(value, (list, tuple)):
                held = [
                    (f"{attr}[{i}]", v) for i, v in enumerate(value) if isinstance(v, nn.Module)
                ]
                kind = "list" if isinstance(value, list) else "tuple"
            elif isinstance(value, dict):
                held = [(f"{attr}[{k!r}]", v) for k, v in value.items() if isinstance(v, nn.Module)]
                kind = "dict"
            if held:
                prefix = f"{owner_path}." if owner_path else ""
                found.append((owner_path, attr, kind, [(prefix + n, m) for n, m in held], owner))
    return found


def _reads_training(code: CodeType) -> bool:
    """The code (or a function nested in it) reads or writes an attribute named `training`."""
    return "training" in code.co_names or any(
        isinstance(c, CodeType) and _reads_training(c) for c in code.co_consts
    )


@functools.lru_cache(maxsize=1024)
def depends_on_mode(cls: type) -> bool:
    """Whether instances of this module class behave differently in train and eval mode: the
    class overrides `train`, or a method of its own (of a class in its MRO below nn.Module)
    reads `self.training` -- Dropout, BatchNorm, MultiheadAttention, RNNs, a user's module
    calling `F.dropout(x, training=self.training)`. Activations and kernels do neither."""
    if getattr(cls, "train", nn.Module.train) is not nn.Module.train:
        return True
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            continue
        for value in vars(klass).values():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            elif isinstance(value, property):
                value = value.fget
            code = getattr(value, "__code__", None)
            if isinstance(code, CodeType) and _reads_training(code):
                return True
    return False


def _what_is_lost(held: list[nn.Module]) -> tuple[int, int, list[str]]:
    """(parameter tensors, buffer tensors, train/eval-dependent types) inside the held modules
    and their registered submodules."""
    subs = [sub for m in held for sub in m.modules()]
    params = sum(1 for sub in subs for _ in sub.parameters(recurse=False))
    buffers = sum(1 for sub in subs for _ in sub.buffers(recurse=False))
    classes: set[type] = {type(sub) for sub in subs}  # as `type`: mypy misreads Module's hash
    modes = sorted(cls.__name__ for cls in classes if depends_on_mode(cls))
    return params, buffers, modes


def record_unregistered(graph: Graph, model: nn.Module, prov: Provenance) -> dict[str, nn.Module]:
    """Fill graph.unregistered; return {display path: module} so frontends can hook them too."""
    extra: dict[str, nn.Module] = {}
    for owner_path, attr, kind, held, owner in unregistered_modules(model):
        first = held[0][1]
        params, buffers, modes = _what_is_lost([m for _, m in held])
        graph.unregistered.append(
            UnregisteredHolder(
                owner=owner_path,
                attr=attr,
                container=kind,
                count=len(held),
                module_types=sorted({type(m).__name__ for _, m in held}),
                location=prov.site(first),
                owner_class=type(owner).__name__,
                owner_location=class_location(type(owner)),
                parameters=params,
                buffers=buffers,
                mode_dependent=modes,
            )
        )
        for name, m in held:
            extra[name] = m
            for sub_name, sub in m.named_modules():
                if sub_name:
                    extra[f"{name}.{sub_name}"] = sub
    return extra


def user_frame_location(depth: int = 2) -> Location | None:
    """The innermost line of user code on the current stack (for functional ops in forward),
    carrying the innermost library line when library code called the op on the user's behalf
    (a library model's forward called from the user's); when no user code is on the stack,
    that library line itself (findings name it as library code: `Rule.finding`)."""
    frame: FrameType | None = sys._getframe(depth)
    library: Location | None = None
    while frame is not None:
        name = frame.f_code.co_filename
        if not _is_internal(name):
            return Location(os.path.abspath(name), frame.f_lineno).through(library)
        if library is None and _is_library(name):
            library = Location(os.path.abspath(name), frame.f_lineno)
        frame = frame.f_back
    return library
