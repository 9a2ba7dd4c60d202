"""ND108 detached-forward: .detach()/.data/no_grad inside forward cuts parameters off from the
output (doc: rules/ND108.md)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.fixes.patch import diff_fix, read, unwrap_attribute, unwrap_call, unwrap_with
from netdoctor.graph.ir import Graph, Node
from netdoctor.graph.walks import call_site, source_line
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext

_GRAD_CONTEXTS = ("no_grad", "inference_mode", "set_grad_enabled")


def _cut(node: Node) -> bool:
    return node.op == "detach" or bool(node.attrs.get("no_grad"))


def _trainable(node: Node) -> int:
    return sum(p.numel for p in node.params.values() if p.trainable)


def _reached(graph: Graph, cuts: bool) -> set[str]:
    """Nodes the output's gradient reaches walking back from the outputs: never into an
    integral node (its value is integers or booleans, which carry no gradient) and, with
    `cuts`, not past a cut."""
    seen: set[str] = set()
    stack = [n.name for n in graph.outputs]
    while stack:
        name = stack.pop()
        if name in seen or name not in graph.nodes:
            continue
        node = graph.nodes[name]
        if node.attrs.get("integral"):
            continue
        seen.add(name)
        if not (cuts and _cut(node)):
            stack.extend(node.inputs)
    return seen


def starved_by_cuts(graph: Graph) -> dict[str, tuple[Node, list[Node]]]:
    """{cut node name: (cut node, [parameterized nodes it starves])}. A node is starved when its
    output reaches a model output, but only through a detach or a no_grad region."""
    live = _reached(graph, cuts=True)  # nodes the output's gradient reaches
    # Nodes the gradient would reach with no cut: a value that gets to the output only as
    # integers (top-k indices, a mask, hash codes) carries no gradient with or without a cut.
    reach = _reached(graph, cuts=False)

    def keys(node: Node) -> set[tuple[str | None, str]]:
        return {(node.module, name) for name, p in node.params.items() if p.trainable}

    # A parameter used in several places (a module call and a `self.fc.weight.detach()`
    # elsewhere) trains as long as one of its uses is live.
    live_params = set().union(
        *(keys(n) for n in graph if n.name in live and not n.attrs.get("no_grad"))
    )
    groups: dict[str, tuple[Node, list[Node]]] = {}
    for node in graph:
        if not _trainable(node) or node.name not in reach:
            continue
        if node.name in live and not node.attrs.get("no_grad"):
            continue
        if keys(node) <= live_params:
            continue
        # The cuts where the gradient stops on the way from this node to the output: the
        # first cut nodes downstream that the gradient still reaches.
        frontier, seen = [], set()
        todo = [node.name]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            cur = graph.nodes[n]
            if _cut(cur) and n in live:
                frontier.append(cur)
                continue
            todo.extend(s.name for s in graph.successors(n))
        for cut in frontier[:1] or [node]:
            groups.setdefault(cut.name, (cut, []))[1].append(node)
    return groups


def _cut_location(cut: Node):
    loc = call_site(cut) if cut.module else cut.location
    if cut.attrs.get("via") == ".data" and loc is not None and loc.line:
        loc = _data_access_line(loc)
    return loc


def _data_access_line(loc):
    """torch.fx creates the node for `x.data` lazily, when the attribute is first used, so its
    line may be the use (`return self.head(features)`) rather than `features = x.data`: take the
    nearest line at or above it that reads `.data`."""
    import re

    from netdoctor.findings import Location

    text = read(loc.path)
    if text is None:
        return loc
    lines = text.splitlines()
    for number in range(min(loc.line, len(lines)), max(0, loc.line - 30), -1):
        if re.search(r"\.data\b", lines[number - 1]):
            return Location(loc.path, number)
    return loc


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
    graph = ctx.graph
    for cut, starved in starved_by_cuts(graph).values():
        modules: dict[str, int] = defaultdict(int)
        for n in starved:
            modules[n.module or n.name] += _trainable(n)
        names = sorted(modules)
        count = sum(modules.values())
        loc = _cut_location(cut)
        text = source_line(loc)
        if cut.attrs.get("no_grad") and cut.op != "detach":
            how = "runs inside a torch.no_grad() block in forward"
            kind = "no_grad"
        else:
            via = cut.attrs.get("via") or f".{cut.target.rsplit('.', 1)[-1]}()"
            how = f"is cut from the autograd graph by {via}"
            kind = via
        shown = ", ".join(names) if len(names) <= 6 else ", ".join(names[:5] + ["..."])
        message = (
            f"the output of {shown} {how}"
            + (f" (`{text}`" + (f", line {loc.line})" if loc else ")") if text else "")
            + f": {len(names)} module(s) with {count:,} trainable parameters reach the "
            "output only through it, so they receive no gradient and never train "
            "(the optimizer leaves them at their initial values). If freezing them is "
            "intended, call .requires_grad_(False) on them instead."
        )
        common = ".".join(_common_prefix([n.split(".") for n in names]))
        yield RULE.finding(
            message,
            module=common or names[0],
            location=loc,
            fix=_detach_fix(cut, kind, loc),
            evidence={
                "cut": kind,
                "starved_modules": names,
                "trainable_parameters": count,
                "line": loc.line if loc else None,
            },
            impact=20.0 + count / 1e6,
        )


def _common_prefix(parts: list[list[str]]) -> list[str]:
    out: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return out


def _detach_fix(cut: Node, kind: str, loc) -> Fix:
    if kind == "no_grad":
        summary = "remove the torch.no_grad() block from forward (keep its body)"
        snippet = "# in forward, un-indent the body of `with torch.no_grad():` and drop the with"
        if loc is None:
            return Fix(summary, snippet, "snippet")
        return diff_fix(
            summary, loc.path, lambda src: unwrap_with(src, loc.line, _GRAD_CONTEXTS), snippet
        )
    if kind == ".data":
        summary = "use the tensor itself instead of its .data (which is detached)"
        snippet = "features = x  # not x.data"
        if loc is None:
            return Fix(summary, snippet, "snippet")
        return diff_fix(
            summary, loc.path, lambda src: unwrap_attribute(src, loc.line, "data"), snippet
        )
    if kind in (".detach()", ".detach_()"):
        summary = "remove the .detach() so the gradient reaches the layers before it"
        snippet = "features = x  # not x.detach()"
        if loc is None:
            return Fix(summary, snippet, "snippet")
        return diff_fix(
            summary,
            loc.path,
            lambda src: unwrap_call(src, loc.line, ("detach", "detach_")),
            snippet,
        )
    return Fix(
        f"keep the value a tensor in forward: {kind} turns it into a Python/NumPy value "
        "with no gradient (use torch operations instead)",
        f"# instead of t{kind}, use t itself (tensor operations keep the gradient)",
        "snippet",
        safe=False,
    )


RULE = Rule(
    "ND108",
    "detached-forward",
    Severity.ERROR,
    Stage.GRAPH,
    summary=".detach()/.data/no_grad inside forward cuts parameters off from the output",
    check=check,
    options=NoOptions,
    consequence="ND410",
    fixture=Fixture("check", ("fixtures/sick/detached.py:DetachedFeatures",)),
    healthy=Fixture("check", ("fixtures/healthy/frozen_backbone.py:FrozenBackbone",)),
)
