"""`check --statistics`: one line per rule with how often it fired, most frequent first (as
`ruff --statistics` prints), to size the work before adopting the gate."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from netdoctor.findings import Finding, Report


def counts(reports: list[Report]) -> list[dict[str, Any]]:
    """[{"count", "rule", "name", "severity"}], by count (descending), then rule ID."""
    tally: Counter[str] = Counter()
    first: dict[str, Finding] = {}
    for report in reports:
        for f in report.findings:
            tally[f.rule] += 1
            first.setdefault(f.rule, f)
    return [
        {"count": n, "rule": rule, "name": first[rule].name, "severity": first[rule].severity.label}
        for rule, n in sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))
    ]


def render(reports: list[Report], fmt: str = "text") -> str:
    rows = counts(reports)
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if not rows:
        return "no findings\n"
    width = max(3, len(str(rows[0]["count"])))
    return "".join(f"{r['count']:>{width}}  {r['rule']}  {r['name']}\n" for r in rows)
