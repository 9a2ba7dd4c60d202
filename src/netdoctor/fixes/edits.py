"""Edits that add or change code in the user's source (a keyword, an argument, a new layer, a
wrapper call, statements): each takes the file's text and returns the new text, or None when the
code could not be located. libcst keeps the formatting and comments."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from netdoctor.fixes.locate import (
    call_at,
    calls_on_line,
    cst,
    index_source,
    self_assignment,
    statement_spanning,
)

# An argument of a container call or an element of a list (what `insert_args_after` adds to).
_Item = TypeVar("_Item", "cst.Arg", "cst.BaseElement")


def set_keyword(
    source: str, line: int, type_names: tuple[str, ...], key: str, value: str
) -> str | None:
    """Set `key=value` in the constructor call on `line` (adding the keyword if missing)."""
    module, pos = index_source(source)
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


def insert_args_after(
    source: str, inserts: dict[int, str | Callable[[cst.Call], str]], types: tuple[str, ...] = ()
) -> str | None:
    """Insert a new layer right after the layer whose call starts on each given line, wherever
    that call sits: an argument of a container call (`nn.Sequential(...)`), an element of a list
    (`layers += [...]`), or the argument of a `layers.append(...)` statement (a new `append`
    statement follows it; in a loop, once per iteration). An insert may be a function of that
    call (to reuse its arguments' source text); `types` (e.g. ("Conv2d", "Linear")) picks the
    layer among several calls on one line. Returns None unless every insert found its place."""
    module, pos = index_source(source)
    calls: dict[int, cst.Call] = {}
    for line in inserts:
        call = call_at(pos.calls, line, types)
        if call is None:
            return None
        calls[line] = call
    texts = {line: text(calls[line]) if callable(text) else text for line, text in inserts.items()}
    by_node = {id(calls[line]): text for line, text in texts.items()}
    # `x.append(<layer>)`: the layer gets a statement of its own, not a second argument.
    in_append = {
        id(c.args[0])
        for c, _, _ in pos.calls
        if len(c.args) == 1 and isinstance(c.func, cst.Attribute) and c.func.attr.value == "append"
    }
    placed: set[int] = set()

    def with_inserts(
        originals: Sequence[_Item],
        updated: Sequence[_Item],
        make: Callable[[cst.BaseExpression, cst.Comma | cst.MaybeSentinel], _Item],
    ) -> tuple[list[_Item], bool]:
        """The items with a new one after each whose value is a target (commas kept); keyed by
        the original nodes, as libcst rebuilds the updated ones."""
        out: list[_Item] = []
        changed = False
        for i, (orig, item) in enumerate(zip(originals, updated)):
            out.append(item)
            key = id(orig.value)
            if (
                key not in by_node
                or id(orig) in in_append
                or getattr(orig, "keyword", None) is not None
                or getattr(orig, "star", "") != ""
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

    def appended_layer(statement: cst.BaseStatement) -> cst.BaseExpression | None:
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
            body: list[cst.BaseStatement] = []
            changed = False
            for orig, stmt in zip(original.body, updated.body):
                body.append(stmt)
                layer = appended_layer(orig)
                if layer is None or id(layer) not in by_node:
                    continue
                # `stmt` is `orig` rebuilt: a statement line holding one `x.append(...)` call
                if not isinstance(stmt, cst.SimpleStatementLine):
                    continue
                expr = stmt.body[0]
                if not (isinstance(expr, cst.Expr) and isinstance(expr.value, cst.Call)):
                    continue
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


def wrap_attribute(
    source: str, attr: str, wrapper: str, near_line: int | None = None
) -> str | None:
    """Rewrite `self.<attr> = <value>` as `self.<attr> = <wrapper>(<value>)` (the assignment
    nearest `near_line`)."""
    module, pos = index_source(source)
    found = self_assignment(pos, attr, near_line)
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
    module, pos = index_source(source)
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
    module, pos = index_source(source)
    victims: set[int] = set()
    for line in lines:
        node = call_at(pos.calls, line, type_names)
        if node is None:
            return None
        victims.add(id(node))
    replacement = cst.parse_expression(new_call)

    class T(cst.CSTTransformer):
        def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
            return replacement if id(original) in victims else updated

    return module.visit(T()).code


def wrap_call(source: str, line: int, names: tuple[str, ...], wrapper_func: str) -> str | None:
    """Wrap the one call on `line` whose name ends with one of `names` (e.g. `self.fc1(x)`) in
    `wrapper_func(...)` (e.g. `torch.relu(self.fc1(x))`)."""
    module, pos = index_source(source)
    found = calls_on_line(pos, line, names)
    if len(found) != 1:
        return None
    target = found[0]
    func = cst.parse_expression(wrapper_func)

    class T(cst.CSTTransformer):
        def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
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
        def leave_FunctionDef(
            self, original: cst.FunctionDef, updated: cst.FunctionDef
        ) -> cst.FunctionDef:
            if original is not target:
                return updated
            return updated.with_changes(
                body=updated.body.with_changes(body=[*updated.body.body, *new_statements])
            )

    return wrapper.module.visit(T()).code


def insert_statement_after(source: str, line: int, statement: str) -> str | None:
    """Insert `statement` as a new line after the statement spanning `line`, in the same
    block (same indentation)."""
    return _insert_statement(source, line, statement, before=False)


def insert_statement_before(source: str, line: int, statement: str) -> str | None:
    """Insert `statement` as a new line before the statement spanning `line`, in the same
    block (same indentation)."""
    return _insert_statement(source, line, statement, before=True)


def _insert_statement(source: str, line: int, statement: str, before: bool) -> str | None:
    found = statement_spanning(source, line)
    if found is None:
        return None
    module, target = found
    new = cst.parse_statement(statement)
    placed: list[bool] = []

    def around(body: Sequence[cst.BaseStatement]) -> list[cst.BaseStatement]:
        out: list[cst.BaseStatement] = []
        for stmt in body:
            if stmt is target and before:
                out.append(new.with_changes(leading_lines=stmt.leading_lines))
                out.append(stmt.with_changes(leading_lines=()))
                placed.append(True)
                continue
            out.append(stmt)
            if stmt is target:
                out.append(new)
                placed.append(True)
        return out

    class T(cst.CSTTransformer):
        def leave_IndentedBlock(
            self, original: cst.IndentedBlock, updated: cst.IndentedBlock
        ) -> cst.IndentedBlock:
            if any(s is target for s in original.body):
                return updated.with_changes(body=around(original.body))
            return updated

        def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
            if any(s is target for s in original.body):
                return updated.with_changes(body=around(original.body))
            return updated

    code = module.visit(T()).code
    return code if placed else None


def wrap_receiver(source: str, line: int, method: str, wrapper: str) -> str | None:
    """Rewrite the one `<x>.<method>(...)` call on `line` as `<wrapper>(<x>).<method>(...)`
    (`loss.backward()` -> `scaler.scale(loss).backward()`)."""
    module, pos = index_source(source)
    target = call_at(pos.calls, line, (method,))
    if target is None or not isinstance(target.func, cst.Attribute):
        return None

    class T(cst.CSTTransformer):
        def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
            if original is not target or not isinstance(updated.func, cst.Attribute):
                return updated
            receiver = cst.Call(
                func=cst.parse_expression(wrapper), args=[cst.Arg(updated.func.value)]
            )
            return updated.with_changes(func=updated.func.with_changes(value=receiver))

    return module.visit(T()).code


def wrap_call_argument(
    source: str, line: int, index: int, suffix: str, min_args: int = 2
) -> str | None:
    """Append `suffix` (e.g. `.squeeze(-1)`) to the `index`-th positional argument of the one
    call on `line` that takes at least `min_args` positional arguments (`criterion(out, y)`,
    `F.mse_loss(out, y)`); None when there is not exactly one such call."""
    module, pos = index_source(source)
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
