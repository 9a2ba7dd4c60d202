"""ND202 constant-init: a hidden weight layer whose weights are all equal, so symmetry never
breaks (doc: rules/ND202.md)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from netdoctor.findings import Finding, Severity
from netdoctor.fixes.patch import diff_fix
from netdoctor.graph.init_values import live_at_init
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.verification import Remedy, RemedyContext

_CONSTANT_INIT_CALLS = ("zeros_", "ones_", "constant_", "fill_(", "zero_()", "ones_like")


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
    """A hidden conv/linear layer whose weights are all equal: its units stay identical."""
    from netdoctor.graph.ir import WEIGHT_OPS

    graph = ctx.graph
    seen: set[str] = set()
    live = live_at_init(graph)
    for node in graph.of_op(*WEIGHT_OPS):
        key = node.module or node.name
        info = node.params.get("weight")
        if key in seen or info is None or not info.all_equal or info.numel < 2:
            continue
        seen.add(key)
        if not _feeds_weight_layer(graph, node.name, live):
            continue  # the last layer may start at zero (a common, harmless choice)
        value = info.mean
        units = info.shape[0] if info.shape else "?"
        message = (
            f"{key}: all {info.numel} weights equal {value:g}, so its {units} units "
            "compute the same value, get the same gradient and stay identical forever "
            "(symmetry never breaks)"
            + (
                "; with zeros and a ReLU after it, no gradient flows back at all"
                if value == 0
                else ""
            )
            + ". Only the last layer may start constant."
        )
        loc = node.location
        attr = key.rsplit(".", 1)[-1]
        summary = (
            f"initialise {key} randomly: remove the constant init (PyTorch's default "
            "breaks symmetry) or use nn.init.kaiming_normal_"
        )
        snippet = f"nn.init.kaiming_normal_(self.{attr}.weight, nonlinearity='relu')\n"
        fix = diff_fix(
            summary,
            loc.path if loc else None,
            partial(_replace_constant_init, attr=attr),
            snippet,
        )
        yield RULE.finding(
            message,
            module=node.module,
            location=loc,
            fix=fix,
            evidence={"value": value, "numel": info.numel, "shape": list(info.shape)},
            impact=8.0,
        )


def _feeds_weight_layer(graph, name: str, live: set[str]) -> bool:
    """Whether another conv/linear layer lies downstream of this node (it is hidden). A path
    that reaches an addition first is the end of a residual branch (Fixup, ReZero and zero-conv
    initialise that layer to zero on purpose): not followed further. Nor do layers count whose
    output does not reach the model's output at init (`live`): a squeeze-excitation computed
    from the zero branch and multiplied back into it is part of that branch."""
    from netdoctor.graph.ir import WEIGHT_OPS

    stack, seen = [s.name for s in graph.successors(name)], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        node = graph.nodes[n]
        if node.op in WEIGHT_OPS and n in live:
            return True
        if node.op in ("add", "sub"):
            continue  # the end of a residual branch: zero-init there is a known technique
        stack.extend(s.name for s in graph.successors(n))
    return False


def _replace_constant_init(source: str, attr: str) -> str | None:
    """Swap a line like `nn.init.zeros_(self.fc2.weight)` for a Kaiming init of the same weight."""
    import re

    lines = source.splitlines(keepends=True)
    pattern = re.compile(rf"\b{re.escape(attr)}\.weight\b")
    for i, line in enumerate(lines):
        target = pattern.search(line)
        if target is not None and any(c in line for c in _CONSTANT_INIT_CALLS):
            indent = line[: len(line) - len(line.lstrip())]
            prefix = (
                "nn."
                if re.search(r"\bnn\.init\.", line)
                else ("torch.nn." if "torch.nn.init." in line else "nn.")
            )
            start = line.rfind("(", 0, target.start()) + 1
            expr = line[start : target.end()].strip() if start > 0 else f"self.{attr}.weight"
            lines[i] = f"{indent}{prefix}init.kaiming_normal_({expr}, nonlinearity='relu')" + (
                "\n" if line.endswith("\n") else ""
            )
            return "".join(lines)
    return None


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """Every constant-initialised layer of the report re-initialised (Kaiming normal), in a copy
    of the model."""
    from netdoctor.fixes.memory import kaiming

    names = sorted({f.module for f in context.report.findings if f.rule == RULE.id and f.module})
    return (
        Remedy(
            RULE.id,
            f"{', '.join(names)} re-initialised (Kaiming normal)",
            "model",
            model_fn=kaiming(names),
        )
        if names
        else None
    )


RULE = Rule(
    "ND202",
    "constant-init",
    Severity.ERROR,
    Stage.PARAMS,
    summary="a hidden weight layer whose weights are all equal: symmetry never breaks",
    check=check,
    options=NoOptions,
    consequence="ND404",
    remedy=remedy,
    fixture=Fixture("check", ("fixtures/sick/zero_init.py:ZeroHiddenMLP",)),
    healthy=Fixture("check", ("fixtures/healthy/zero_head.py:ZeroHeadMLP",)),
)
