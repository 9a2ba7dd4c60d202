"""Edits that take something out of the user's source (softmax heads, detaches, redundant
activations, a `no_grad` block, a DDP wrapper's `.module`): each takes the file's text and returns
the new text, or None when the code could not be located."""

from __future__ import annotations

from netdoctor.fixes.locate import (
    FUNCTION_ROOTS,
    call_at,
    call_name,
    calls_on_line,
    cst,
    index_source,
    root_name,
)


def remove_arg(source: str, line: int, type_names: tuple[str, ...]) -> str | None:
    """Drop the constructor call on `line` (e.g. nn.Softmax(dim=1)) from the container call
    (nn.Sequential(...)) it is an argument of. None when it is not a container argument."""
    module, pos = index_source(source)
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
    module, pos = index_source(source)
    found = calls_on_line(pos, line, names)
    if len(found) != 1:
        return None
    target = found[0]
    func = target.func
    positional = [a for a in target.args if a.keyword is None and a.star == ""]
    if isinstance(func, cst.Name) or (
        isinstance(func, cst.Attribute)
        and root_name(func.value) in FUNCTION_ROOTS
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
        def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
            return inner if original is target else updated

        def leave_SimpleStatementLine(
            self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine
        ) -> cst.SimpleStatementLine | cst.RemovalSentinel:
            # `x = F.relu(x)` became `x = x`: drop the statement.
            only = updated.body[0] if len(updated.body) == 1 else None
            assigned = (
                only.targets[0].target
                if isinstance(only, cst.Assign) and len(only.targets) == 1
                else None
            )
            if (
                updated is not original
                and isinstance(only, cst.Assign)
                and isinstance(assigned, cst.Name)
                and isinstance(only.value, cst.Name)
                and assigned.value == only.value.value
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
        def leave_Attribute(
            self, original: cst.Attribute, updated: cst.Attribute
        ) -> cst.BaseExpression:
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
                and call_name(item).split(".")[-1] in names
                and node.items[0].asname is None
            ):
                found.append((pos.start.line, node))

    wrapper.visit(V())
    if not found or not isinstance(max(found, key=lambda f: f[0])[1].body, cst.IndentedBlock):
        return None
    target = max(found, key=lambda f: f[0])[1]

    class T(cst.CSTTransformer):
        def leave_With(
            self, original: cst.With, updated: cst.With
        ) -> cst.BaseStatement | cst.FlattenSentinel[cst.BaseStatement]:
            if original is not target or not isinstance(updated.body, cst.IndentedBlock):
                return updated
            body = list(updated.body.body)
            first = body[0] if body else None
            if (
                isinstance(first, (cst.SimpleStatementLine, cst.BaseCompoundStatement))
                and updated.leading_lines
            ):
                body[0] = first.with_changes(
                    leading_lines=[*updated.leading_lines, *first.leading_lines]
                )
            return cst.FlattenSentinel(body)

    return wrapper.module.visit(T()).code


def call_wrapper_not_module(source: str, line: int) -> str | None:
    """`ddp.module(x)` on `line` -> `ddp(x)`: call the DistributedDataParallel wrapper instead
    of the module inside it. None unless there is exactly one such call on the line."""
    module, pos = index_source(source)
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
            if original is target and isinstance(updated.func, cst.Attribute):
                return updated.with_changes(func=updated.func.value)
            return updated

    return module.visit(T()).code
