"""The rule catalogue: IDs, names, default severities, stages and summaries, read off the rule
units (`netdoctor.rules.registry`). Torch-free: `netdoctor rules`, `explain` and `--help` read
only this and the docs."""

from __future__ import annotations

from typing import Any

from netdoctor.rules.base import Rule
from netdoctor.rules.engine import matches
from netdoctor.rules.registry import all_rules

__all__ = ["RULES", "lookup", "matches"]

RULES: dict[str, Rule[Any, Any]] = all_rules()


def lookup(key: str) -> Rule[Any, Any]:
    """Find a rule by ID (ND101, nd101) or by name (deep-plain-stack)."""
    k = key.strip()
    if k.upper() in RULES:
        return RULES[k.upper()]
    for rule in RULES.values():
        if rule.name == k.lower():
            return rule
    raise KeyError(key)
