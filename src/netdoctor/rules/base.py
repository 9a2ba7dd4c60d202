"""What a rule is: one unit holding its ID, name, severity and stage, its options, its check, what
it can be caused by, the symptom a verified fix measures, and its remedy.

Every rule lives in one module under `netdoctor/rules/<stage>/` and ends with

    RULE = Rule("ND404", "dead-relu", Severity.WARNING, Stage.RUNTIME,
                summary="...", check=check, options=Options, ...)

The registry (`netdoctor.rules.registry`) collects those; the catalogue, the cause links, the
symptom and remedy tables and the documented options are all read off them. Rule modules import
no torch at module level (`netdoctor rules` and `explain` import every one of them); what needs
torch imports it inside the function that does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from netdoctor.findings import Finding, Fix, Location, Severity
from netdoctor.rules.contexts import RuleContext
from netdoctor.rules.options import NoOptions, RuleOptions
from netdoctor.rules.stage import Stage
from netdoctor.rules.verification import Remedy, RemedyContext, SymptomSpec

__all__ = ["Fixture", "NoOptions", "Rule", "RuleOptions", "Stage"]


@dataclass(frozen=True)
class Fixture:
    """A model or script of the repository's fixtures/ that shows a rule, and the command that
    shows it: `netdoctor COMMAND ARGS... --format json`, whose report is a committed snapshot
    (tests/snapshots/COMMAND/NAME.json; NAME defaults to one derived from the target)."""

    command: str  # "check" | "probe" | "run"
    args: tuple[str, ...]  # the target first, then its flags
    name: str = ""


ContextT = TypeVar("ContextT", bound=RuleContext)
OptionsT = TypeVar("OptionsT", bound=RuleOptions)


@dataclass(frozen=True, eq=False)
class Rule(Generic[ContextT, OptionsT]):
    """One rule (see the module docstring). Fields after `options` are optional:

    causes: for a runtime symptom, the findings it most likely follows from, tried in order
        (rule IDs, or keys such as "ND406+"); a function of the finding when that depends on it.
    variant: the suffix of a finding's key when the rule reports distinct symptoms ("+" and
        "-" for too-large and too-small update ratios).
    symptoms: what a verified fix measures before and after (one per variant).
    consequence: for a static or data rule, the runtime rule whose symptom shows its effect
        when no runtime finding names it as a cause (a sigmoid chain -> vanishing gradients).
    remedy: the in-memory version of the fix, for the verified fix (None: a code change).
    revise: a finding reconsidered once the probe's run is known (before severities apply).
    fixture, healthy: a fixture the rule reports, and a healthy counterpart it must not (the
        tests compare both reports with their snapshots).
    """

    id: str
    name: str
    severity: Severity
    stage: Stage
    summary: str
    check: Callable[[ContextT, OptionsT], Iterable[Finding]]
    options: type[OptionsT]
    causes: tuple[str, ...] | Callable[[Finding], tuple[str, ...]] = ()
    variant: Callable[[Finding], str] | None = None
    symptoms: tuple[SymptomSpec[OptionsT], ...] = ()
    consequence: str | None = None
    remedy: Callable[[Finding, RemedyContext], Remedy | None] | None = None
    revise: Callable[[Finding, list[Finding], Any], None] | None = None
    fixture: Fixture | None = None
    healthy: Fixture | None = None

    def __post_init__(self) -> None:
        if not (len(self.id) == 5 and self.id.startswith("ND") and self.id[2:].isdigit()):
            raise ValueError(f"rule ID {self.id!r} is not NDnnn")

    def finding(
        self,
        message: str,
        *,
        module: str | None = None,
        location: Location | None = None,
        fix: Fix | None = None,
        evidence: dict[str, Any] | None = None,
        impact: float = 0.0,
        severity: Severity | None = None,
    ) -> Finding:
        """A finding of this rule. `severity` replaces the rule's default for this finding (a
        severity the user configured replaces both; the engine applies it).

        A `location` in library code (a file of an installed package: the user cannot patch it)
        becomes the finding's `library_location`, named as library code at the end of the
        message; `judge` then points the finding at the user's own line that built or called
        the model. A user line that carries the library line it built or called through
        (`Location.library`) stays the location, and names that library line the same way."""
        library = None
        if location is not None and not location.path.startswith("onnx:"):
            from netdoctor.loading.library import in_installed_package, package_name, package_path
            from netdoctor.loading.target import display_path

            if in_installed_package(location.path):
                library, location = location, None
            elif location.library is not None and in_installed_package(location.library.path):
                library = location.library
            if location is not None:
                location = Location(display_path(location.path), location.line)
            if library is not None:
                where = package_path(library.path) or library.path
                where += f":{library.line}" if library.line else ""
                message = (
                    f"{message} (The flagged line, {where}, is library code in the installed "
                    f"package {package_name(library.path)}, not yours to patch.)"
                )
        return Finding(
            rule=self.id,
            name=self.name,
            severity=severity or self.severity,
            message=message,
            module=module,
            location=location,
            fix=fix,
            evidence=evidence or {},
            impact=impact,
            library_location=library,
        )

    def key(self, finding: Finding) -> str:
        """The finding's key in cause lists and symptom tables: the ID, plus its variant."""
        return self.id + (self.variant(finding) if self.variant else "")

    def causes_of(self, finding: Finding) -> tuple[str, ...]:
        return self.causes(finding) if callable(self.causes) else self.causes
