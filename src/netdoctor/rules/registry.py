"""The rule registry and the context every rule receives.

A rule is a function `(ctx) -> Iterable[Finding]`, registered with `@rule("ND101", needs=...)`.
Its name, severity and summary come from netdoctor.catalogue; its options from the
`[tool.netdoctor.rules.ND101]` config table via `ctx.option`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from netdoctor.catalogue import RULES
from netdoctor.findings import Finding, Fix, Location
from netdoctor.loading.target import display_path

RuleFn = Callable[["Context"], Iterable[Finding]]


@dataclass
class RuleImpl:
    id: str
    fn: RuleFn
    needs: str  # "outcome" (ND0xx), "graph", "data", "runtime", "loop" (ND5xx)


REGISTRY: dict[str, RuleImpl] = {}


def rule(rule_id: str, needs: str = "graph") -> Callable[[RuleFn], RuleFn]:
    if rule_id not in RULES:
        raise KeyError(f"{rule_id} is not in the catalogue")

    def register(fn: RuleFn) -> RuleFn:
        REGISTRY[rule_id] = RuleImpl(rule_id, fn, needs)
        return fn

    return register


@dataclass
class Context:
    """What a rule may read. Static rules read `graph`; ND0xx read `outcome`; data and runtime
    rules read `data` / `run` (measurements); the training-loop rules (ND5xx) read `loop`, the
    facts only the watcher sees inside the user's own loop; none of them touch the user's
    files."""

    target: str
    graph: Any = None  # netdoctor.graph.Graph
    outcome: Any = None  # netdoctor.graph.build.BuildOutcome
    data: Any = None  # data sample for ND3xx
    run: Any = None  # probe measurements for ND4xx
    loop: Any = None  # netdoctor.watcher.facts.LoopFacts for ND5xx
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # A draft judgement (the watcher's live announcement): rules may skip building patches,
    # which read and parse the user's files.
    draft: bool = False

    def option(self, rule_id: str, key: str, default: Any) -> Any:
        return self.options.get(rule_id, {}).get(key, default)

    def finding(
        self,
        rule_id: str,
        message: str,
        *,
        module: str | None = None,
        location: Location | None = None,
        fix: Fix | None = None,
        evidence: dict[str, Any] | None = None,
        impact: float = 0.0,
        cause: str | None = None,
    ) -> Finding:
        info = RULES[rule_id]
        severity = self.options.get(rule_id, {}).get("severity")
        if location is not None:
            location = (
                Location(display_path(location.path), location.line)
                if not location.path.startswith("onnx:")
                else location
            )
        from netdoctor.findings import Severity

        return Finding(
            rule=rule_id,
            name=info.name,
            severity=Severity.parse(severity) if severity else info.severity,
            message=message,
            module=module,
            location=location,
            fix=fix,
            evidence=evidence or {},
            impact=impact,
            cause=cause,
        )
