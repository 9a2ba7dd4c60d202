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

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from netdoctor.errors import UserError
from netdoctor.findings import Finding, Fix, Location, Severity

if TYPE_CHECKING:
    from netdoctor.rules.contexts import RuleContext
    from netdoctor.rules.verification import Remedy, RemedyContext, SymptomSpec


class Stage(str, Enum):
    """When a rule can judge, and so which context it reads (`netdoctor.rules.contexts`)."""

    META = "meta"  # how the graph was built (ND0xx): GraphContext, also without a graph
    GRAPH = "graph"  # the model's structure (ND1xx): GraphContext
    PARAMS = "params"  # parameters and signal at init (ND2xx): GraphContext
    DATA = "data"  # a sample of the data (ND3xx): DataContext
    RUNTIME = "runtime"  # a measured training run (ND4xx): RuntimeContext
    LOOP = "loop"  # the user's own training loop (ND5xx): LoopContext

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RuleOptions:
    """Base of every rule's options: a frozen dataclass whose fields are the keys of its
    `[tool.netdoctor.rules.NDxxx]` table (`dead_fraction` is `dead-fraction`), with their
    defaults. `severity` is every rule's key and not a field (the engine applies it)."""

    SEVERITY: ClassVar[str] = "severity"

    @classmethod
    def keys(cls) -> dict[str, Any]:
        """{TOML key: default} of the options."""
        return {f.name.replace("_", "-"): f.default for f in dataclasses.fields(cls)}

    @classmethod
    def parse(cls, table: Mapping[str, Any], where: str) -> RuleOptions:
        """Options from a config table: known keys only, each converted to its field's type
        (a TOML integer is a valid float); a bad key or value is a UserError naming `where`."""
        known = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key == cls.SEVERITY:
                continue
            field = known.get(key)
            if field is None:
                names = ", ".join(sorted([*known, cls.SEVERITY]))
                raise UserError(f"{where}: unknown option {key!r} (known: {names})")
            kind: type = type(field.default)  # every option has a default
            try:
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise ValueError
                values[field.name] = kind(value)
            except (TypeError, ValueError):
                raise UserError(
                    f"{where}: {key} must be a {kind.__name__}, got {value!r}"
                ) from None
        return cls(**values)


@dataclass(frozen=True)
class NoOptions(RuleOptions):
    """A rule with nothing to configure but its severity."""


@dataclass(frozen=True)
class Fixture:
    """A model or script of the repository's fixtures/ that shows a rule, and the command that
    shows it: `netdoctor COMMAND ARGS... --format json`, whose report is a committed snapshot
    (tests/snapshots/COMMAND/NAME.json; NAME defaults to one derived from the target)."""

    command: str  # "check" | "probe" | "run"
    args: tuple[str, ...]  # the target first, then its flags
    name: str = ""


ContextT = TypeVar("ContextT", bound="RuleContext")
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
        severity the user configured replaces both; the engine applies it)."""
        if location is not None and not location.path.startswith("onnx:"):
            from netdoctor.loading.target import display_path

            location = Location(display_path(location.path), location.line)
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
        )

    def key(self, finding: Finding) -> str:
        """The finding's key in cause lists and symptom tables: the ID, plus its variant."""
        return self.id + (self.variant(finding) if self.variant else "")

    def causes_of(self, finding: Finding) -> tuple[str, ...]:
        return self.causes(finding) if callable(self.causes) else self.causes
