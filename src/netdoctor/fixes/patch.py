"""Edits of the user's source made with libcst (formatting and comments kept), shown as diffs.

Each edit function takes the file's text and returns the new text, or None when the code could
not be located (the rule then falls back to a paste-ready snippet).
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from netdoctor.findings import Fix
from netdoctor.loading.target import display_path


def _lazy_import(name: str):
    """The standard library's lazy-import recipe (importlib.util.LazyLoader): the module loads
    on first attribute access, so a check without findings never pays for importing libcst."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


cst = _lazy_import("libcst")
Positions = Any  # an instance of _positions_class(): calls and assignments with their lines


def read(path: str) -> str | None:
    """The text of a Python source file, or None (ONNX files and unreadable paths get snippets)."""
    if not str(path).endswith(".py"):
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def unified_diff(path: str, old: str, new: str) -> str:
    shown = display_path(path)
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"a/{shown}",
            tofile=f"b/{shown}",
        )
    )


def diff_fix(
    summary: str,
    path: str | None,
    edit: Callable[[str], str | None],
    snippet: str,
    safe: bool = True,
) -> Fix:
    """A Fix carrying a diff when `edit` locates the code in `path`, else the snippet."""
    if path:
        old = read(path)
        if old is not None:
            try:
                new = edit(old)
            except cst.ParserSyntaxError:
                new = None
            if new is not None and new != old:
                return Fix(
                    summary, unified_diff(path, old, new), "diff", path, safe, new_source=new
                )
    return Fix(summary, snippet, "snippet", None, safe)


def nn_prefix(source: str) -> str:
    """How this file spells torch.nn: 'nn.' or 'torch.nn.'."""
    if re.search(r"^\s*(from torch import .*\bnn\b|import torch\.nn as nn)", source, re.M):
        return "nn."
    return "torch.nn."


def _call_name(node: cst.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, cst.Attribute):
        parts.append(f.attr.value)
        f = f.value
    if isinstance(f, cst.Name):
        parts.append(f.value)
    return ".".join(reversed(parts))


@cache
def _positions_class():
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


def _index(source: str) -> tuple[cst.Module, Positions]:
    wrapper = cst.metadata.MetadataWrapper(cst.parse_module(source))
    visitor = _positions_class()()
    wrapper.visit(visitor)
    return wrapper.module, visitor


def call_at(calls, line: int, name_suffix: tuple[str, ...] = ()) -> cst.Call | None:
    """The innermost call starting on `line` (optionally whose name ends with one of the
    suffixes)."""
    best = None
    for node, start, end in calls:
        if start == line or (start <= line <= end and best is None):
            name = _call_name(node)
            if name_suffix and name.split(".")[-1] not in name_suffix:
                continue
            if best is None or start == line:
                best = node
    return best


def set_keyword(
    source: str, line: int, type_names: tuple[str, ...], key: str, value: str
) -> str | None:
    """Set `key=value` in the constructor call on `line` (adding the keyword if missing)."""
    module, pos = _index(source)
    target = call_at(pos.calls, line, type_names)
    if target is None:
        return None
    new_value = cst.parse_expression(value)

    class T(cst.CSTTransformer):
        def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
            if original is not target:
                return updated
            args = list(updated.args)
            for i, a in enumerate(args):
                if a.keyword is not None and a.keyword.value == key:
                    args[i] = a.with_changes(value=new_value)
                    return updated.with_changes(args=args)
            if args and args[-1].comma is cst.MaybeSentinel.DEFAULT:
                args[-1] = args[-1].with_changes(
                    comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
                )
            args.append(
                cst.Arg(
                    value=new_value,
                    keyword=cst.Name(key),
                    equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")),
                )
            )
            return updated.with_changes(args=args)

    return module.visit(T()).code


def arg_code(call: cst.Call, index: int, keyword: str) -> str | None:
    """The source text of a call's argument, by keyword or position (e.g. a Linear's `width`)."""
    for a in call.args:
        if a.keyword is not None and a.keyword.value == keyword:
            return cst.Module([]).code_for_node(a.value)
    positional = [a for a in call.args if a.keyword is None and a.star == ""]
    if len(positional) > index:
        return cst.Module([]).code_for_node(positional[index].value)
    return None


def insert_args_after(
    source: str, inserts: dict[int, str | Callable[[cst.Call], str]], types: tuple[str, ...] = ()
) -> str | None:
    """Insert a new layer right after the layer whose call starts on each given line, wherever
    that call sits: an argument of a container call (`nn.Sequential(...)`), an element of a list
    (`layers += [...]`), or the argument of a `layers.append(...)` statement (a new `append`
    statement follows it; in a loop, once per iteration). An insert may be a function of that
    call (to reuse its arguments' source text); `types` (e.g. ("Conv2d", "Linear")) picks the
    layer among several calls on one line. Returns None unless every insert found its place."""
    module, pos = _index(source)
    calls = {line: call_at(pos.calls, line, types) for line in inserts}
    if any(call is None for call in calls.values()):
        return None
    texts = {line: text(calls[line]) if callable(text) else text for line, text in inserts.items()}
    by_node = {id(calls[line]): text for line, text in texts.items()}
    # `x.append(<layer>)`: the layer gets a statement of its own, not a second argument.
    in_append = {
        id(c.args[0])
        for c, _, _ in pos.calls
        if len(c.args) == 1 and isinstance(c.func, cst.Attribute) and c.func.attr.value == "append"
    }
    placed: set[int] = set()

    def with_inserts(originals, updated, make):
        """The items with a new one after each whose value is a target (commas kept); keyed by
        the original nodes, as libcst rebuilds the updated ones."""
        out, changed = [], False
        for i, (orig, item) in enumerate(zip(originals, updated)):
            out.append(item)
            key = id(orig.value)
            if (
                key not in by_node
                or id(orig) in in_append
                or getattr(orig, "keyword", None) is not None
                or getattr(orig, "star", "")
            ):
                continue
            comma = item.comma
            if comma is cst.MaybeSentinel.DEFAULT:
                comma = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
                out[-1] = item.with_changes(comma=comma)
            last = i == len(originals) - 1
            out.append(make(cst.parse_expression(by_node[key]), item.comma if last else comma))
            placed.add(key)
            changed = True
        return out, changed

    def appended_layer(statement) -> cst.BaseExpression | None:
        """The layer of a `x.append(<layer call>)` statement line, else None."""
        if not (
            isinstance(statement, cst.SimpleStatementLine)
            and len(statement.body) == 1
            and isinstance(statement.body[0], cst.Expr)
        ):
            return None
        call = statement.body[0].value
        if (
            isinstance(call, cst.Call)
            and isinstance(call.func, cst.Attribute)
            and call.func.attr.value == "append"
            and len(call.args) == 1
        ):
            return call.args[0].value
        return None

    class T(cst.CSTTransformer):
        def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
            args, changed = with_inserts(
                original.args, updated.args, lambda v, c: cst.Arg(value=v, comma=c)
            )
            return updated.with_changes(args=args) if changed else updated

        def leave_List(self, original: cst.List, updated: cst.List) -> cst.List:
            items, changed = with_inserts(
                original.elements, updated.elements, lambda v, c: cst.Element(value=v, comma=c)
            )
            return updated.with_changes(elements=items) if changed else updated

        def leave_IndentedBlock(
            self, original: cst.IndentedBlock, updated: cst.IndentedBlock
        ) -> cst.IndentedBlock:
            body, changed = [], False
            for orig, stmt in zip(original.body, updated.body):
                body.append(stmt)
                layer = appended_layer(orig)
                if layer is None or id(layer) not in by_node:
                    continue
                expr = stmt.body[0]
                call = expr.value.with_changes(
                    args=[cst.Arg(value=cst.parse_expression(by_node[id(layer)]))]
                )
                body.append(
                    stmt.with_changes(body=[expr.with_changes(value=call)], leading_lines=[])
                )
                placed.add(id(layer))
                changed = True
            return updated.with_changes(body=body) if changed else updated

    new = module.visit(T()).code
    return new if placed >= set(by_node) else None


def _self_assignment(pos: Positions, attr: str, near_line: int | None):
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
    found = _self_assignment(_index(source)[1], attr, near_line)
    return found[1] if found else None


def wrap_attribute(
    source: str, attr: str, wrapper: str, near_line: int | None = None
) -> str | None:
    """Rewrite `self.<attr> = <value>` as `self.<attr> = <wrapper>(<value>)` (the assignment
    nearest `near_line`)."""
    module, pos = _index(source)
    found = _self_assignment(pos, attr, near_line)
    if found is None:
        return None
    target = found[0]

    class T(cst.CSTTransformer):
        def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
            if original is not target:
                return updated
            value = updated.value
            if isinstance(value, cst.Tuple):
                value = cst.List(elements=value.elements)
            call = cst.Call(func=cst.parse_expression(wrapper), args=[cst.Arg(value)])
            return updated.with_changes(value=call)

    return module.visit(T()).code


def set_positional(
    source: str, line: int, type_names: tuple[str, ...], index: int, value: str
) -> str | None:
    """Replace the index-th positional argument of the constructor call on `line`."""
    module, pos = _index(source)
    target = call_at(pos.calls, line, type_names)
    if target is None:
        return None
    positional = [a for a in target.args if a.keyword is None and a.star == ""]
    if len(positional) <= index:
        return None
    victim = positional[index]

    class T(cst.CSTTransformer):
        def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
            if original is victim:
                return updated.with_changes(value=cst.parse_expression(value))
            return updated

    return module.visit(T()).code


def replace_calls(
    source: str, lines: list[int], type_names: tuple[str, ...], new_call: str
) -> str | None:
    """Replace the constructor calls (e.g. nn.Sigmoid()) on the given lines with `new_call`."""
    module, pos = _index(source)
    victims = set()
    for line in lines:
        node = call_at(pos.calls, line, type_names)
        if node is None:
            return None
        victims.add(id(node))
    replacement = cst.parse_expression(new_call)

    class T(cst.CSTTransformer):
        def leave_Call(self, original: cst.Call, updated: cst.Call):
            return replacement if id(original) in victims else updated

    return module.visit(T()).code


# -- edits that take something out (softmax heads, detaches, redundant activations) ----------

_FUNCTION_ROOTS = {"self", "torch", "F", "nn", "functional", "fn"}


def _root_name(node: cst.BaseExpression) -> str | None:
    while isinstance(node, (cst.Attribute, cst.Call, cst.Subscript)):
        node = node.func if isinstance(node, cst.Call) else node.value
    return node.value if isinstance(node, cst.Name) else None


def _calls_on_line(pos: Positions, line: int, names: tuple[str, ...]) -> list[cst.Call]:
    return [
        node
        for node, start, _end in pos.calls
        if start <= line <= _end and _call_name(node).split(".")[-1] in names
    ]


def remove_arg(source: str, line: int, type_names: tuple[str, ...]) -> str | None:
    """Drop the constructor call on `line` (e.g. nn.Softmax(dim=1)) from the container call
    (nn.Sequential(...)) it is an argument of. None when it is not a container argument."""
    module, pos = _index(source)
    target = call_at(pos.calls, line, type_names)
    if target is None:
        return None
    removed: list[bool] = []

    class T(cst.CSTTransformer):
        def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
            for i, arg in enumerate(original.args):
                if arg.value is target and arg.keyword is None and arg.star == "":
                    args = list(updated.args)
                    victim = args.pop(i)
                    if i == len(args) and args:  # it was the last one: keep its trailing comma
                        args[-1] = args[-1].with_changes(comma=victim.comma)
                    removed.append(True)
                    return updated.with_changes(args=args)
            return updated

    new = module.visit(T()).code
    return new if removed else None


def unwrap_call(source: str, line: int, names: tuple[str, ...]) -> str | None:
    """Replace the one call on `line` whose name ends with one of `names` by what it was applied
    to: `F.softmax(x, dim=1)` / `self.softmax(x)` -> `x`, `x.detach()` / `x.softmax(1)` -> `x`.
    None unless exactly one such call is found."""
    module, pos = _index(source)
    found = _calls_on_line(pos, line, names)
    if len(found) != 1:
        return None
    target = found[0]
    func = target.func
    positional = [a for a in target.args if a.keyword is None and a.star == ""]
    if isinstance(func, cst.Name) or (
        isinstance(func, cst.Attribute)
        and _root_name(func.value) in _FUNCTION_ROOTS
        and isinstance(func.value, (cst.Name, cst.Attribute))
    ):
        if not positional:
            return None
        inner = positional[0].value
    elif isinstance(func, cst.Attribute):
        inner = func.value
    else:
        return None

    class T(cst.CSTTransformer):
        def leave_Call(self, original: cst.Call, updated: cst.Call):
            return inner if original is target else updated

        def leave_SimpleStatementLine(self, original, updated):
            # `x = F.relu(x)` became `x = x`: drop the statement.
            if (
                updated is not original
                and len(updated.body) == 1
                and isinstance(updated.body[0], cst.Assign)
                and len(updated.body[0].targets) == 1
                and isinstance(updated.body[0].targets[0].target, cst.Name)
                and isinstance(updated.body[0].value, cst.Name)
                and updated.body[0].targets[0].target.value == updated.body[0].value.value
            ):
                return cst.RemoveFromParent()
            return updated

    return module.visit(T()).code


def unwrap_attribute(source: str, line: int, attr: str) -> str | None:
    """Replace `expr.<attr>` on `line` (e.g. `x.data`) by `expr` (exactly one occurrence)."""
    wrapper = cst.metadata.MetadataWrapper(cst.parse_module(source))
    found: list[cst.Attribute] = []

    class V(cst.CSTVisitor):
        METADATA_DEPENDENCIES = (cst.metadata.PositionProvider,)

        def visit_Attribute(self, node: cst.Attribute) -> None:
            pos = self.get_metadata(cst.metadata.PositionProvider, node)
            if node.attr.value == attr and pos.start.line <= line <= pos.end.line:
                found.append(node)

    wrapper.visit(V())
    if len(found) != 1:
        return None
    target = found[0]

    class T(cst.CSTTransformer):
        def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute):
            return updated.value if original is target else updated

    return wrapper.module.visit(T()).code


def unwrap_with(source: str, line: int, names: tuple[str, ...]) -> str | None:
    """Replace the innermost `with torch.no_grad():` (a context manager whose name ends with one
    of `names`) enclosing `line` by its body."""
    wrapper = cst.metadata.MetadataWrapper(cst.parse_module(source))
    found: list[tuple[int, cst.With]] = []

    class V(cst.CSTVisitor):
        METADATA_DEPENDENCIES = (cst.metadata.PositionProvider,)

        def visit_With(self, node: cst.With) -> None:
            pos = self.get_metadata(cst.metadata.PositionProvider, node)
            if not pos.start.line <= line <= pos.end.line or len(node.items) != 1:
                return
            item = node.items[0].item
            if (
                isinstance(item, cst.Call)
                and _call_name(item).split(".")[-1] in names
                and node.items[0].asname is None
            ):
                found.append((pos.start.line, node))

    wrapper.visit(V())
    if not found or not isinstance(max(found, key=lambda f: f[0])[1].body, cst.IndentedBlock):
        return None
    target = max(found, key=lambda f: f[0])[1]

    class T(cst.CSTTransformer):
        def leave_With(self, original: cst.With, updated: cst.With):
            if original is not target:
                return updated
            body = list(updated.body.body)
            if body and updated.leading_lines:
                body[0] = body[0].with_changes(
                    leading_lines=[*updated.leading_lines, *body[0].leading_lines]
                )
            return cst.FlattenSentinel(body)

    return wrapper.module.visit(T()).code


def wrap_call(source: str, line: int, names: tuple[str, ...], wrapper_func: str) -> str | None:
    """Wrap the one call on `line` whose name ends with one of `names` (e.g. `self.fc1(x)`) in
    `wrapper_func(...)` (e.g. `torch.relu(self.fc1(x))`)."""
    module, pos = _index(source)
    found = _calls_on_line(pos, line, names)
    if len(found) != 1:
        return None
    target = found[0]
    func = cst.parse_expression(wrapper_func)

    class T(cst.CSTTransformer):
        def leave_Call(self, original: cst.Call, updated: cst.Call):
            if original is target:
                return cst.Call(func=func, args=[cst.Arg(updated)])
            return updated

    return module.visit(T()).code


def append_to_init(source: str, class_line: int, code: str) -> str | None:
    """Append statements (`code`, written at indentation 0) to the end of the `__init__` of the
    class defined on `class_line`."""
    wrapper = cst.metadata.MetadataWrapper(cst.parse_module(source))
    found: list[cst.FunctionDef] = []

    class V(cst.CSTVisitor):
        METADATA_DEPENDENCIES = (cst.metadata.PositionProvider,)

        def visit_ClassDef(self, node: cst.ClassDef) -> None:
            pos = self.get_metadata(cst.metadata.PositionProvider, node)
            start = pos.start.line
            decorators = len(node.decorators)
            if not (start <= class_line <= start + decorators + 1):
                return
            if not isinstance(node.body, cst.IndentedBlock):
                return
            for stmt in node.body.body:
                if isinstance(stmt, cst.FunctionDef) and stmt.name.value == "__init__":
                    found.append(stmt)

    wrapper.visit(V())
    if len(found) != 1 or not isinstance(found[0].body, cst.IndentedBlock):
        return None
    target = found[0]
    new_statements = list(cst.parse_module(code).body)

    class T(cst.CSTTransformer):
        def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
            if original is not target:
                return updated
            return updated.with_changes(
                body=updated.body.with_changes(body=[*updated.body.body, *new_statements])
            )

    return wrapper.module.visit(T()).code


def torch_function_prefix(source: str) -> str | None:
    """How this file can call a torch function: 'torch.' or 'F.' (None if neither is imported)."""
    if re.search(r"^\s*import torch\b(?!\.)", source, re.M) or re.search(
        r"^\s*import torch\s*$", source, re.M
    ):
        return "torch."
    if re.search(
        r"^\s*import torch\.nn\.functional as F\b"
        r"|^\s*from torch\.nn import functional as F\b",
        source,
        re.M,
    ):
        return "F."
    return None


def _statement_spanning(source: str, line: int):
    """The simple statement line (`x = f(...)`, `opt.step()`) that spans `line`, with the
    module and its position index: (module, statement, positions) or None."""
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
    _, pos = _index(source)
    call = call_at(pos.calls, line, (method,))
    if call is None or not isinstance(call.func, cst.Attribute):
        return None
    receiver = cst.Module([]).code_for_node(call.func.value)
    if call.args and receiver.split(".")[-1].lower().endswith("scaler"):
        return cst.Module([]).code_for_node(call.args[0].value)
    return receiver


def insert_statement_after(source: str, line: int, statement: str) -> str | None:
    """Insert `statement` as a new line after the statement spanning `line`, in the same
    block (same indentation)."""
    found = _statement_spanning(source, line)
    if found is None:
        return None
    module, target = found
    new = cst.parse_statement(statement)
    placed = []

    def after(body):
        out = []
        for stmt in body:
            out.append(stmt)
            if stmt is target:
                out.append(new)
                placed.append(True)
        return out

    class T(cst.CSTTransformer):
        def leave_IndentedBlock(self, original, updated):
            if any(s is target for s in original.body):
                return updated.with_changes(body=after(list(original.body)))
            return updated

        def leave_Module(self, original, updated):
            if any(s is target for s in original.body):
                return updated.with_changes(body=after(list(original.body)))
            return updated

    code = module.visit(T()).code
    return code if placed else None


def wrap_call_argument(
    source: str, line: int, index: int, suffix: str, min_args: int = 2
) -> str | None:
    """Append `suffix` (e.g. `.squeeze(-1)`) to the `index`-th positional argument of the one
    call on `line` that takes at least `min_args` positional arguments (`criterion(out, y)`,
    `F.mse_loss(out, y)`); None when there is not exactly one such call."""
    module, pos = _index(source)
    calls = [
        c
        for c, start, _ in pos.calls
        if start == line
        and len([a for a in c.args if a.keyword is None and a.star == ""]) >= min_args
    ]
    if len(calls) != 1:
        return None
    target = calls[0]
    victim = [a for a in target.args if a.keyword is None and a.star == ""][index]
    code = cst.Module([]).code_for_node(victim.value)
    simple = isinstance(victim.value, (cst.Name, cst.Attribute, cst.Call, cst.Subscript))
    new_value = cst.parse_expression(f"{code}{suffix}" if simple else f"({code}){suffix}")

    class T(cst.CSTTransformer):
        def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
            return updated.with_changes(value=new_value) if original is victim else updated

    return module.visit(T()).code


def call_wrapper_not_module(source: str, line: int) -> str | None:
    """`ddp.module(x)` on `line` -> `ddp(x)`: call the DistributedDataParallel wrapper instead
    of the module inside it. None unless there is exactly one such call on the line."""
    module, pos = _index(source)
    calls = [
        c
        for c, start, _ in pos.calls
        if start == line and isinstance(c.func, cst.Attribute) and c.func.attr.value == "module"
    ]
    if len(calls) != 1:
        return None
    target = calls[0]

    class T(cst.CSTTransformer):
        def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
            if original is target:
                return updated.with_changes(func=updated.func.value)
            return updated

    return module.visit(T()).code
