"""Putting fixes into the user's files.

Every diff fix of one check run was computed against the same text of its file, so the fixes of a
file are merged line-wise into one new text: `check --diff` prints that as one patch per file
(`git apply` takes it whole), and `check --fix` writes it, re-imports the model, checks again and
repeats, because one fix can enable the next (BatchNorm inserted by ND101 makes the conv bias
redundant, ND109). A round whose result no longer loads or runs is rolled back.
"""

from __future__ import annotations

import difflib
import importlib.util
import linecache
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from netdoctor.errors import UserError
from netdoctor.findings import Finding, Report
from netdoctor.fixes.patch import unified_diff
from netdoctor.loading.library import in_installed_package

MAX_ROUNDS = 10
# A round that introduces a forward failure (the model no longer runs) is undone.
BROKEN = {"ND002"}


@dataclass
class FilePlan:
    """The merged fixes of one file: `merged` went in, `skipped` overlapped an earlier fix."""

    path: str
    old: str
    new: str
    merged: list[Finding] = field(default_factory=list)
    skipped: list[Finding] = field(default_factory=list)


def fixable(finding: Finding, unsafe: bool) -> bool:
    fix = finding.fix
    return bool(
        fix
        and fix.kind == "diff"
        and fix.path
        and not in_installed_package(fix.path)  # diff_fix never makes one; never written there
        and fix.new_source is not None
        and (fix.safe or unsafe)
    )


def _patched(finding: Finding) -> tuple[str, str]:
    """The path and new text of a `fixable` finding's diff fix."""
    fix = finding.fix
    if fix is None or fix.path is None or fix.new_source is None:
        raise ValueError(f"{finding.rule}: no diff fix to apply")
    return fix.path, fix.new_source


def _edits(old: list[str], new: list[str]) -> list[tuple[int, int, list[str]]]:
    """(start, end, replacement) line edits, in old-text coordinates."""
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    return [(i1, i2, new[j1:j2]) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"]


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Two edits collide when they touch the same old lines, or insert at the same point, or one
    inserts inside the other's replaced range."""
    (a1, a2), (b1, b2) = a, b
    if a1 == a2 and b1 == b2:
        return a1 == b1
    if a1 == a2:
        return b1 < a1 < b2
    if b1 == b2:
        return a1 < b1 < a2
    return a1 < b2 and b1 < a2


def merge(path: str, old: str, findings: list[Finding]) -> FilePlan:
    """Merge the fixes of one file, in the given (priority) order; a fix whose edits collide with
    an already merged one is skipped whole (it is offered again after the file is re-checked)."""
    old_lines = old.splitlines(keepends=True)
    plan = FilePlan(path, old, old)
    taken: list[tuple[int, int, list[str]]] = []
    seen: set[str] = set()
    for finding in findings:
        new_source = _patched(finding)[1]
        if new_source in seen:  # the same patch offered by two findings (or two models)
            plan.merged.append(finding)
            continue
        edits = _edits(old_lines, new_source.splitlines(keepends=True))
        if any(_overlap(e[:2], t[:2]) for e in edits for t in taken):
            plan.skipped.append(finding)
            continue
        seen.add(new_source)
        taken.extend(edits)
        plan.merged.append(finding)
    lines = list(old_lines)
    for start, end, replacement in sorted(taken, key=lambda e: (e[0], e[1]), reverse=True):
        lines[start:end] = replacement
    plan.new = "".join(lines)
    return plan


def plan_fixes(reports: list[Report], unsafe: bool) -> list[FilePlan]:
    """One FilePlan per file that has applicable fixes, findings in priority order."""
    by_path: dict[str, list[Finding]] = {}
    for report in reports:
        for finding in report.sorted_findings():
            if fixable(finding, unsafe):
                path = _patched(finding)[0]
                by_path.setdefault(str(Path(path).resolve()), []).append(finding)
    plans = []
    for path, findings in by_path.items():
        try:
            old = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        plans.append(merge(path, old, findings))
    return plans


def plan_diff(plan: FilePlan) -> str:
    """The plan as one unified diff of its file."""
    return unified_diff(plan.path, plan.old, plan.new)


# -- writing ------------------------------------------------------------------------------------


def writable(path: str, allowed_roots: list[Path]) -> bool:
    """Only the user's own files: under the cwd or a target's folder, never an installed package
    or a virtual environment."""
    p = Path(path).resolve()
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        if p.is_relative_to(Path(prefix).resolve()):
            return False
    if in_installed_package(p):
        return False
    return any(p.is_relative_to(root) for root in allowed_roots)


def write(path: str, text: str) -> None:
    """Write the file (keeping its mode) and make the next import read the new text: drop the
    module from sys.modules, its bytecode cache and linecache (construction sites are read from
    source lines)."""
    p = Path(path)
    try:
        p.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    forget(path)


def forget(path: str) -> None:
    resolved = Path(path).resolve()
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == resolved:
            del sys.modules[name]
    try:
        os.remove(importlib.util.cache_from_source(str(resolved)))
    except (OSError, NotImplementedError, ValueError):
        pass
    importlib.invalidate_caches()
    linecache.checkcache(str(resolved))


@dataclass
class FixOutcome:
    """What `check --fix` did: the final re-check, the fixes written, the ones it had to leave."""

    reports: list[Report]
    applied: list[tuple[str, Finding]] = field(default_factory=list)  # (path, finding)
    messages: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return sorted({path for path, _ in self.applied})


def fix_until_clean(
    run_check: Callable[[], list[Report]], unsafe: bool, allowed_roots: list[Path]
) -> FixOutcome:
    """Check, write the merged fixes, re-check; stop when nothing applicable is left (a finding
    whose fix was written once is not fixed again: its fix did not cure it), or after MAX_ROUNDS."""
    reports = run_check()
    outcome = FixOutcome(reports)
    refused: set[str] = set()
    tried: set[tuple[str, str, str | None]] = set()  # findings whose fix was written once
    for _ in range(MAX_ROUNDS):
        plans = []
        fresh = [
            Report(
                r.target,
                findings=[f for f in r.findings if (r.target, f.rule, f.module) not in tried],
            )
            for r in reports
        ]
        for plan in plan_fixes(fresh, unsafe):
            if not writable(plan.path, allowed_roots):
                if plan.path not in refused:
                    refused.add(plan.path)
                    outcome.messages.append(
                        f"not fixing {plan.path}: outside the project (fix it by hand, see --diff)"
                    )
                continue
            if plan.new != plan.old:
                plans.append(plan)
        if not plans:
            break
        broken_before = _broken(reports)
        for plan in plans:
            write(plan.path, plan.new)
        try:
            after = run_check()
        except UserError as e:
            _undo(plans)
            outcome.messages.append(
                f"undid {_names(plans)}: the model no longer loads after it ({e})"
            )
            break
        if _broken(after) - broken_before:
            _undo(plans)
            outcome.messages.append(f"undid {_names(plans)}: the model no longer runs after it")
            break
        outcome.applied.extend((plan.path, f) for plan in plans for f in plan.merged)
        tried.update(
            (r.target, f.rule, f.module)
            for r in reports
            for f in r.findings
            if any(f is g for p in plans for g in p.merged)
        )
        reports = after
    outcome.reports = reports
    return outcome


def _broken(reports: list[Report]) -> set[tuple[str, str]]:
    return {(r.target, f.rule) for r in reports for f in r.findings if f.rule in BROKEN}


def _undo(plans: list[FilePlan]) -> None:
    for plan in plans:
        write(plan.path, plan.old)


def _names(plans: list[FilePlan]) -> str:
    return ", ".join(sorted({f.rule for p in plans for f in p.merged}))
