"""Finding code in the user's source with libcst: calls and assignments indexed by line, the
call or statement on a line, and the source text of what a call is made on.

libcst is imported lazily (on first use), so a check without findings never pays for it; the
edit functions (`netdoctor.fixes.edits`, `netdoctor.fixes.removals`) use `cst` from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, cast


class _LazyModule:
    """A module imported on first attribute access, so a check without findings never pays for
    importing libcst. Unlike importlib.util.LazyLoader's lazy module, it is no sys.modules entry
    until then: code that walks sys.modules (inspect.getmodule, which torch calls when it
    registers an op) would load that one."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


if TYPE_CHECKING:
    import libcst as cst
    import libcst.metadata  # noqa: F401  (so that mypy knows cst.metadata)
else:
    cst = _LazyModule("libcst")


class Positions(Protocol):
    """A module's calls and assignments with their lines (what `index_source` returns)."""

    calls: list[tuple[cst.Call, int, int]]
    assigns: list[tuple[cst.Assign, int, int]]


def call_name(node: cst.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, cst.Attribute):
        parts.append(f.attr.value)
        f = f.value
    if isinstance(f, cst.Name):
        parts.append(f.value)
    return ".".join(reversed(parts))


@cache
def positions_class() -> type[cst.CSTVisitor]:
    """The visitor class that indexes calls and assignments by line (made on first use, as it
    subclasses a libcst class)."""

    class _Positions(cst.CSTVisitor):
        METADATA_DEPENDENCIES = (cst.metadata.PositionProvider,)

        def __init__(self) -> None:
            self.calls: list[tuple[cst.Call, int, int]] = []
            self.assigns: list[tuple[cst.Assign, int, int]] = []

        def visit_Call(self, node: cst.Call) -> None:
            pos = self.get_metadata(cst.metadata.PositionProvider, node)
            self.calls.append((node, pos.start.line, pos.end.line))

        def visit_Assign(self, node: cst.Assign) -> None:
            pos = self.get_metadata(cst.metadata.PositionProvider, node)
            self.assigns.append((node, pos.start.line, pos.end.line))

    return _Positions


def index_source(source: str) -> tuple[cst.Module, Positions]:
    wrapper = cst.metadata.MetadataWrapper(cst.parse_module(source))
    visitor = positions_class()()
    wrapper.visit(visitor)
    return wrapper.module, cast(Positions, visitor)  # a _Positions: its class is made at run time


def call_at(
    calls: Iterable[tuple[cst.Call, int, int]], line: int, name_suffix: tuple[str, ...] = ()
) -> cst.Call | None:
    """The innermost call starting on `line` (optionally whose name ends with one of the
    suffixes)."""
    best = None
    for node, start, end in calls:
        if start == line or (start <= line <= end and best is None):
            name = call_name(node)
            if name_suffix and name.split(".")[-1] not in name_suffix:
                continue
            if best is None or start == line:
                best = node
    return best


def arg_code(call: cst.Call, index: int, keyword: str) -> str | None:
    """The source text of a call's argument, by keyword or position (e.g. a Linear's `width`)."""
    for a in call.args:
        if a.keyword is not None and a.keyword.value == keyword:
            return cst.Module([]).code_for_node(a.value)
    positional = [a for a in call.args if a.keyword is None and a.star == ""]
    if len(positional) > index:
        return cst.Module([]).code_for_node(positional[index].value)
    return None


def self_assignment(
    pos: Positions, attr: str, near_line: int | None
) -> tuple[cst.Assign, int] | None:
    """The `self.<attr> = ...` assignment spanning `near_line`, else the nearest one:
    (node, first line) or None."""
    candidates = []
    for node, start, end in pos.assigns:
        for t in node.targets:
            tgt = t.target
            if (
                isinstance(tgt, cst.Attribute)
                and tgt.attr.value == attr
                and isinstance(tgt.value, cst.Name)
                and tgt.value.value == "self"
            ):
                near = near_line or start
                candidates.append((not start <= near <= end, abs(start - near), start, node))
    if not candidates:
        return None
    best = min(candidates, key=lambda c: c[:3])
    return best[3], best[2]


def attribute_line(source: str, attr: str, near_line: int | None = None) -> int | None:
    """The line of the `self.<attr> = ...` assignment nearest `near_line` (where a list of
    layers is given its name, rather than where its first element is built)."""
    found = self_assignment(index_source(source)[1], attr, near_line)
    return found[1] if found else None


FUNCTION_ROOTS = {"self", "torch", "F", "nn", "functional", "fn"}


def root_name(node: cst.BaseExpression) -> str | None:
    while isinstance(node, (cst.Attribute, cst.Call, cst.Subscript)):
        node = node.func if isinstance(node, cst.Call) else node.value
    return node.value if isinstance(node, cst.Name) else None


def calls_on_line(pos: Positions, line: int, names: tuple[str, ...]) -> list[cst.Call]:
    return [
        node
        for node, start, _end in pos.calls
        if start <= line <= _end and call_name(node).split(".")[-1] in names
    ]


def statement_spanning(source: str, line: int) -> tuple[cst.Module, cst.SimpleStatementLine] | None:
    """The simple statement line (`x = f(...)`, `opt.step()`) that spans `line`, with its
    module: (module, statement) or None."""
    wrapper = cst.metadata.MetadataWrapper(cst.parse_module(source))
    found: list[cst.SimpleStatementLine] = []

    class V(cst.CSTVisitor):
        METADATA_DEPENDENCIES = (cst.metadata.PositionProvider,)

        def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> None:
            pos = self.get_metadata(cst.metadata.PositionProvider, node)
            if pos.start.line <= line <= pos.end.line:
                found.append(node)

    wrapper.visit(V())
    return (wrapper.module, found[-1]) if found else None


def method_receiver(source: str, line: int, method: str) -> str | None:
    """The object a `<x>.<method>(...)` call on `line` is made on, as source text (`opt` for
    `opt.step()`; for `scaler.step(opt)` the first argument, `opt`)."""
    _, pos = index_source(source)
    call = call_at(pos.calls, line, (method,))
    if call is None or not isinstance(call.func, cst.Attribute):
        return None
    receiver = cst.Module([]).code_for_node(call.func.value)
    if call.args and receiver.split(".")[-1].lower().endswith("scaler"):
        return cst.Module([]).code_for_node(call.args[0].value)
    return receiver
