"""ND103 dead-submodule: a submodule with trainable parameters whose output never reaches the
output (doc: rules/ND103.md)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.graph.ir import Node
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
    graph = ctx.graph
    if not graph.outputs:
        return
    live = graph.reaching_output()
    called: dict[str, list[Node]] = defaultdict(list)
    for node in graph:
        if node.module:
            called[node.module].append(node)

    def covered(path: str, names: set[str]) -> bool:
        """True when the module or one of its ancestors is in names."""
        parts = path.split(".")
        return any(".".join(parts[:i]) in names for i in range(len(parts), 0, -1))

    # Submodules that returned several values, some used by their caller: {path: returned
    # node names} (recorded forward only).
    partly_used: dict[str, set[str]] = defaultdict(set)
    for node in graph:
        for owner in node.attrs.get("returned_by", ()):
            partly_used[owner].add(node.name)
    partly_used = {owner: names - live for owner, names in partly_used.items() if names & live}

    def ignored_output(path: str) -> str | None:
        """The enclosing submodule whose unused extra output this module computes (the pooled
        output of a backbone whose caller reads only its sequence output), if any."""
        owners = [o for o in partly_used if path.startswith(o + ".")]
        if not owners:
            return None
        todo = [n.name for n in called.get(path, [])] + [
            n.name for n in graph if n.module and n.module.startswith(path + ".")
        ]
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for owner in owners:
                if name in partly_used[owner]:
                    return owner
            todo.extend(s.name for s in graph.successors(name))
        return None

    live_modules = {n.module for n in graph if n.module and n.name in live}
    live_leaf_calls = {n.module for n in graph if n.module and n.name in live and n.op != "param"}
    # A module ran when it was called as one op (or inside an ancestor called as one op, e.g. an
    # LSTM's cells) or when its own parameters were read; an ancestor that only read its own
    # parameters ran, but that says nothing about the module (a branch it skipped holds it).
    leaf_calls = {n.module for n in graph if n.module and n.op != "param"}

    def empty_use(path: str) -> bool:
        """True when the module's result flows, on the way it is dropped, into an empty tensor
        (a slice of length 0): a length-dependent use (a window longer than this input's
        sequence) that this input does not exercise."""
        todo = [n.name for n in graph if n.module and covered(n.module, {path})]
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            node = graph.node(name)
            if node.shape is not None and 0 in node.shape:
                return True
            todo.extend(s.name for s in graph.successors(name))
        return False

    for path, info in graph.modules.items():
        if info.trainable == 0:
            continue
        if path in live_modules or covered(path, live_leaf_calls):
            continue
        ran = path in called or covered(path, leaf_calls)
        if not ran and graph.frontend == "hooks":
            continue  # a recorded forward only shows the branches this input took
        owner = ignored_output(path) if ran else None
        empty = ran and owner is None and empty_use(path)
        if owner is not None:
            how = (
                f"computes an output that {owner} returns alongside others, and its caller "
                "uses only the others"
            )
        elif empty:
            how = (
                "is called in forward, but this input uses its result only as an empty tensor (a "
                "slice of length 0, as when a window is longer than the sequence)"
            )
        elif ran:
            how = (
                "is called in forward but its result never reaches the model output "
                "(computed, then unused)"
            )
        else:
            how = "is never called in forward"
        effect = (
            "its parameters get no gradient from this input, which does not exercise it"
            if empty
            else "its parameters get no gradient and never train"
        )
        message = f"{path} ({info.type}, {info.trainable:,} trainable parameters) {how}: {effect}."
        parent = path.rpartition(".")[0]
        hint = (
            "use its output (a residual block returns F.relu(x + y), not F.relu(x))"
            if parent
            else "use its output in forward"
        )
        yield RULE.finding(
            message,
            module=path,
            location=info.location,
            fix=Fix(f"{hint}, or delete {path}"),
            evidence={"type": info.type, "trainable_parameters": info.trainable, "called": ran}
            | ({"ignored_output_of": owner} if owner is not None else {})
            | ({"empty_use": True} if empty else {}),
            impact=float(info.trainable) / 1e6,
            # An extra output of a reusable component that this model does not need (a
            # backbone's pooler under a head that reads the sequence): a design, not a mistake.
            # A result that this input cuts to nothing (a window longer than its sequence): the
            # input's limit, not a dead module.
            severity=Severity.INFO if owner is not None or empty else None,
        )


RULE = Rule(
    "ND103",
    "dead-submodule",
    Severity.WARNING,
    Stage.GRAPH,
    summary="a submodule with trainable parameters whose output never reaches the output",
    check=check,
    options=NoOptions,
    consequence="ND410",
    fixture=Fixture("check", ("fixtures/sick/broken_residual.py:Net",)),
    healthy=Fixture("check", ("fixtures/healthy/se_resnet.py:SEResNet",)),
)
