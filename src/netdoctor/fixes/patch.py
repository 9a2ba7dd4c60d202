"""Edits of the user's source made with libcst (formatting and comments kept), shown as diffs.

Each edit function takes the file's text and returns the new text, or None when the code could
not be located (the rule then falls back to a paste-ready snippet).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Callable

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from netdoctor.findings import Fix
from netdoctor.loading.target import display_path


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
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"a/{shown}", tofile=f"b/{shown}"))


def diff_fix(summary: str, path: str | None, edit: Callable[[str], str | None], snippet: str,
             safe: bool = True) -> Fix:
    """A Fix carrying a diff when `edit` locates the code in `path`, else the snippet."""
    if path:
        old = read(path)
        if old is not None:
            try:
                new = edit(old)
            except cst.ParserSyntaxError:
                new = None
            if new is not None and new != old:
                return Fix(summary, unified_diff(path, old, new), "diff", path, safe, new_source=new)
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


class _Positions(cst.CSTVisitor):
    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self) -> None:
        self.calls: list[tuple[cst.Call, int, int]] = []
        self.assigns: list[tuple[cst.Assign, int, int]] = []

    def visit_Call(self, node: cst.Call) -> None:
        pos = self.get_metadata(PositionProvider, node)
        self.calls.append((node, pos.start.line, pos.end.line))

    def visit_Assign(self, node: cst.Assign) -> None:
        pos = self.get_metadata(PositionProvider, node)
        self.assigns.append((node, pos.start.line, pos.end.line))


def _index(source: str) -> tuple[cst.Module, _Positions]:
    wrapper = MetadataWrapper(cst.parse_module(source))
    visitor = _Positions()
    wrapper.visit(visitor)
    return wrapper.module, visitor


def call_at(calls, line: int, name_suffix: tuple[str, ...] = ()) -> cst.Call | None:
    """The innermost call starting on `line` (optionally whose name ends with one of the suffixes)."""
    best = None
    for node, start, end in calls:
        if start == line or (start <= line <= end and best is None):
            name = _call_name(node)
            if name_suffix and not name.split(".")[-1] in name_suffix:
                continue
            if best is None or start == line:
                best = node
    return best


def set_keyword(source: str, line: int, type_names: tuple[str, ...], key: str, value: str) -> str | None:
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
                args[-1] = args[-1].with_changes(comma=cst.Comma(
                    whitespace_after=cst.SimpleWhitespace(" ")))
            args.append(cst.Arg(value=new_value, keyword=cst.Name(key),
                                equal=cst.AssignEqual(cst.SimpleWhitespace(""),
                                                      cst.SimpleWhitespace(""))))
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


def insert_args_after(source: str, inserts: dict[int, str | Callable[[cst.Call], str]]
                      ) -> str | None:
    """In container calls like nn.Sequential(...), insert a new argument after the argument whose
    call starts on each given line. An insert may be a function of that call (to reuse its
    arguments' source text). Returns None unless every insert found its place."""
    module, pos = _index(source)
    inserts = {line: (text(call_at(pos.calls, line)) if callable(text) and
                      call_at(pos.calls, line) is not None else text)
               for line, text in inserts.items()}
    if any(callable(t) for t in inserts.values()):
        return None
    targets: dict[int, cst.Call] = {}
    for line in inserts:
        node = call_at(pos.calls, line)
        if node is None:
            return None
        targets[id(node)] = node
    by_node = {id(call_at(pos.calls, line)): text for line, text in inserts.items()}
    placed: set[int] = set()

    class T(cst.CSTTransformer):
        def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
            new_args: list[cst.Arg] = []
            changed = False
            for orig_arg, arg in zip(original.args, updated.args):
                new_args.append(arg)
                key = id(orig_arg.value)
                if key in by_node and arg.keyword is None and arg.star == "":
                    comma = arg.comma
                    if comma is cst.MaybeSentinel.DEFAULT:
                        comma = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
                        new_args[-1] = arg.with_changes(comma=comma)
                    new_args.append(cst.Arg(value=cst.parse_expression(by_node[key]),
                                            comma=comma if orig_arg is not original.args[-1]
                                            else arg.comma))
                    placed.add(key)
                    changed = True
            return updated.with_changes(args=new_args) if changed else updated

    new = module.visit(T()).code
    return new if len(placed) == len(by_node) else None


def wrap_attribute(source: str, attr: str, wrapper: str, near_line: int | None = None) -> str | None:
    """Rewrite `self.<attr> = <value>` as `self.<attr> = <wrapper>(<value>)` (the assignment
    nearest `near_line`)."""
    module, pos = _index(source)
    candidates = []
    for node, start, _end in pos.assigns:
        for t in node.targets:
            tgt = t.target
            if isinstance(tgt, cst.Attribute) and tgt.attr.value == attr and \
                    isinstance(tgt.value, cst.Name) and tgt.value.value == "self":
                candidates.append((abs(start - (near_line or start)), start, node))
    if not candidates:
        return None
    target = min(candidates, key=lambda c: (c[0], c[1]))[2]

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


def set_positional(source: str, line: int, type_names: tuple[str, ...], index: int,
                   value: str) -> str | None:
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


def replace_calls(source: str, lines: list[int], type_names: tuple[str, ...],
                  new_call: str) -> str | None:
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
