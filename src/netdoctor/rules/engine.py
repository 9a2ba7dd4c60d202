"""The one engine that judges for `check`, `probe` and the watcher inside the user's training.

Every way in calls the same two functions:

* `run_rules(ctx, settings)` -- the selected rules of the context's stage, each with its options
  from the config, and the severity the user configured applied to what they find;
* `judge(report, findings, class_lines)` -- `# netdoctor: ignore[...]` comments (a note for each
  finding they suppress), then the kept findings join the report and every runtime symptom is
  linked to its root cause among all the report's findings (`link_causes`).

`RuleSettings` is the typed form of `select`, `ignore` and the `[tool.netdoctor.rules.*]`
tables. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from netdoctor.findings import Finding, Location, Report, Severity
from netdoctor.rules.base import Rule, RuleOptions
from netdoctor.rules.contexts import RuleContext
from netdoctor.rules.registry import all_rules, key_of
from netdoctor.rules.verification import Remedy, RemedyContext, Symptom


def matches(rule_id: str, patterns: Iterable[str]) -> bool:
    """True when a rule ID is selected by any pattern: 'ND1' selects ND1xx, 'ALL' selects all,
    a rule's name selects it."""
    rules = all_rules()
    for p in patterns:
        p = p.strip()
        if p.upper() == "ALL" or rule_id.startswith(p.upper()):
            return True
        found = rules.get(rule_id)
        if found is not None and found.name == p.lower():
            return True
    return False


@dataclass
class RuleSettings:
    """Which rules run, with which options and severities."""

    select: list[str] = field(default_factory=lambda: ["ALL"])
    ignore: list[str] = field(default_factory=list)
    options: dict[str, RuleOptions] = field(default_factory=dict)  # rule ID -> its options
    severities: dict[str, Severity] = field(default_factory=dict)  # configured, by rule ID

    @classmethod
    def from_tables(
        cls,
        select: Sequence[str] = ("ALL",),
        ignore: Sequence[str] = (),
        tables: Mapping[str, Mapping[str, Any]] | None = None,
        label: Callable[[str], str] = lambda key: f"[tool.netdoctor.rules.{key}]",
    ) -> RuleSettings:
        """Settings from option tables ({rule ID or name: {key: value}}): every key is checked
        against the rule's options; a UserError names the table (`label(key)`)."""
        from netdoctor.errors import UserError

        rules = all_rules()
        by_name = {r.name: r for r in rules.values()}
        settings = cls(select=list(select), ignore=list(ignore))
        for key, table in (tables or {}).items():
            rule = rules.get(key.strip().upper()) or by_name.get(key.strip().lower())
            if rule is None:
                raise UserError(f"{label(key)}: no such rule")
            if not isinstance(table, Mapping):
                raise UserError(f"{label(key)} must be a table")
            settings.options[rule.id] = rule.options.parse(table, label(key))
            if "severity" in table:
                try:
                    settings.severities[rule.id] = Severity.parse(str(table["severity"]))
                except ValueError as e:
                    raise UserError(f"{label(key)}: {e}") from None
        return settings

    def selected(self, rule_id: str) -> bool:
        return matches(rule_id, self.select) and not matches(rule_id, self.ignore)

    def options_of(self, rule: Rule[Any, Any]) -> Any:
        """The rule's options: configured, else its defaults."""
        return self.options.get(rule.id) or rule.options()

    def only(self, rule_ids: Collection[str]) -> RuleSettings:
        """The same settings, running only those of `rule_ids` that are selected."""
        keep = [r for r in sorted(rule_ids) if self.selected(r)] or ["NONE"]
        return RuleSettings(keep, [], self.options, self.severities)


def run_rules(
    ctx: RuleContext,
    settings: RuleSettings,
    on_error: Callable[[Exception], None] | None = None,
) -> list[Finding]:
    """Every selected rule whose stage reads this context, in ID order, with its options; the
    severity the user configured replaces the rule's own. `on_error`: a rule that raises is
    reported there and the others still run (the watcher: never an exception in the user's
    loop); without it the exception propagates."""
    findings: list[Finding] = []
    for rule in all_rules().values():
        if not ctx.runs(rule.stage) or not settings.selected(rule.id):
            continue
        try:
            found = list(rule.check(ctx, settings.options_of(rule)))
        except Exception as e:
            if on_error is None:
                raise
            on_error(e)
            continue
        configured = settings.severities.get(rule.id)
        for f in found:
            if configured is not None:
                f.severity = configured
        findings.extend(found)
    return findings


def judge(
    report: Report,
    findings: Iterable[Finding],
    class_lines: Sequence[Location | None] = (),
    anchor: Location | None = None,
) -> None:
    """Add `findings` to the report, except those a `# netdoctor: ignore` comment suppresses
    (on the flagged line, its class line, or one of `class_lines`: a note says so), then link
    every runtime symptom in the report to its root cause.

    `anchor`: the user's own line that built or called the model (`LoadedModel.user_site()`);
    a finding whose flagged line is library code (`Finding.library_location`, set by
    `Rule.finding`) points there first, so it is suppressed, annotated and fixed in the
    user's code."""
    from netdoctor.suppress import is_suppressed

    lines = [c for c in class_lines if c is not None]
    if anchor is not None:
        from netdoctor.loading.library import in_installed_package
        from netdoctor.loading.target import display_path

        shown = Location(display_path(anchor.path), anchor.line)
        anchor = None if in_installed_package(anchor.path) else shown
    for f in findings:
        if f.library_location is not None and f.location is None and anchor is not None:
            f.location = anchor
        if is_suppressed(f, lines):
            at = f" at {f.location}" if f.location is not None else ""
            report.notes.append(f"{f.rule}{at} suppressed by a netdoctor: ignore comment")
        else:
            report.findings.append(f)
    link_causes(report.findings)


def link_causes(findings: list[Finding]) -> None:
    """Set `cause` on every finding of a rule with causes (the runtime symptoms) that follows
    from another finding present -- transitively, to the root: raw 0..255 inputs ND301 -> dead
    ReLUs ND404 -> a flat loss ND407 gives both ND404 and ND407 the cause "ND301", so
    `Report.fix_first()` picks the root's fix. Candidates are tried in each rule's order; only
    findings present count. A symptom's "if nothing else explains it" fix is dropped once
    something does."""
    rules = all_rules()
    present: dict[str, Finding] = {}
    for f in findings:
        present.setdefault(key_of(f), f)

    def candidates(f: Finding) -> tuple[str, ...]:
        rule = rules.get(f.rule)
        return rule.causes_of(f) if rule is not None else ()

    def direct(f: Finding) -> Finding | None:
        for key in candidates(f):
            other = present.get(key)
            if other is not None and other is not f and key_of(other) != key_of(f):
                return other
        return None

    def root(f: Finding, seen: set[int]) -> Finding:
        if id(f) in seen or not _has_causes(f):
            return f
        seen.add(id(f))
        parent = direct(f)
        return f if parent is None else root(parent, seen)

    for f in findings:
        if not _has_causes(f) or f.cause is not None:
            continue
        r = root(f, set())
        if r is not f:
            f.cause = r.rule
            if (f.evidence or {}).get("fallback_fix"):
                f.fix = None  # "if nothing else explains it" -- something else does


def _has_causes(f: Finding) -> bool:
    rule = all_rules().get(f.rule)
    return rule is not None and bool(rule.causes)


# -- the verified fix's lookups -----------------------------------------------------------------


def symptoms(settings: RuleSettings) -> dict[str, Symptom]:
    """{finding key: its symptom, with the threshold of the options in force}."""
    out: dict[str, Symptom] = {}
    for rule in all_rules().values():
        options = settings.options_of(rule)
        for spec in rule.symptoms:
            out[rule.id + spec.variant] = spec.bind(rule.id, options)
    return out


def symptom_for(top: Finding, findings: list[Finding], settings: RuleSettings) -> Symptom | None:
    """The measurement that shows whether `top`'s fix works: its own when its rule measures
    one, else that of the first runtime finding it causes, else that of the runtime rule its
    rule is known to lead to (a sigmoid chain -> the gradient ratio)."""
    table = symptoms(settings)
    if key_of(top) in table:
        return table[key_of(top)]
    for f in findings:
        if f.cause == top.rule and key_of(f) in table:
            return table[key_of(f)]
    rule = all_rules().get(top.rule)
    consequence = rule.consequence if rule is not None else None
    return table.get(consequence) if consequence else None


def remedy_for(finding: Finding, context: RemedyContext) -> Remedy | None:
    """The in-memory version of a finding's fix, or None when it needs a code change."""
    rule = all_rules().get(finding.rule)
    if rule is None or rule.remedy is None:
        return None
    return rule.remedy(finding, context)


def revise_after_training(findings: list[Finding], run: Any, settings: RuleSettings) -> None:
    """Let each rule reconsider its findings once the probe's run is known (a data scale
    finding that training survived becomes info), unless the user configured its severity."""
    for f in findings:
        rule = all_rules().get(f.rule)
        if rule is not None and rule.revise is not None and f.rule not in settings.severities:
            rule.revise(f, findings, run)
