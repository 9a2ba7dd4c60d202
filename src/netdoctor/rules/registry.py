"""Every rule, collected from its module: `netdoctor/rules/<stage>/ndNNN_<name>.py` defines
`RULE` (see `netdoctor.rules.base`). A new rule needs no line here.

Torch-free: rule modules import torch only inside the functions that use it, so listing the
catalogue (`netdoctor rules`, `explain`, `--help`) never imports it.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Any

from netdoctor.rules.base import Rule, Stage

STAGE_PACKAGES = {
    Stage.META: "meta",
    Stage.GRAPH: "graph",
    Stage.PARAMS: "params",
    Stage.DATA: "data",
    Stage.RUNTIME: "runtime",
    Stage.LOOP: "loop",
}


@cache
def all_rules() -> dict[str, Rule[Any, Any]]:
    """{rule ID: Rule}, in ID order."""
    found: dict[str, Rule[Any, Any]] = {}
    for stage, package in STAGE_PACKAGES.items():
        pkg = importlib.import_module(f"netdoctor.rules.{package}")
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("nd"):
                continue  # shared helpers of the stage's rules (_common, ...)
            module = importlib.import_module(f"{pkg.__name__}.{info.name}")
            rule = getattr(module, "RULE", None)
            if not isinstance(rule, Rule):
                raise TypeError(f"{module.__name__} defines no RULE")
            if rule.stage is not stage or not info.name.startswith(rule.id.lower() + "_"):
                raise TypeError(f"{module.__name__}: {rule.id} ({rule.stage}) is misplaced")
            if rule.id in found:
                raise TypeError(f"{rule.id} is defined twice")
            found[rule.id] = rule
    return dict(sorted(found.items()))


def rule(rule_id: str) -> Rule[Any, Any]:
    return all_rules()[rule_id]


def key_of(finding: Any) -> str:
    """A finding's key in cause lists and symptom tables ("ND406+", or its rule ID)."""
    found = all_rules().get(finding.rule)
    return found.key(finding) if found is not None else finding.rule
