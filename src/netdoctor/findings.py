"""The one findings model every rule produces and every reporter formats.

Torch-free on purpose: reporters, `rules` and `explain` must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from netdoctor.curves import Curves


class Severity(IntEnum):
    INFO = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown severity {text!r} (expected error, warning or info)"
            ) from None


@dataclass(frozen=True)
class Location:
    """Where the user wrote the flagged thing: a source file and line, or an ONNX node."""

    path: str
    line: int | None = None

    @property
    def library(self) -> Location | None:
        """When the flagged layer or op itself is library code (a file of an installed package)
        that this user line built or called: that library line (`Rule.finding` names it as the
        finding's `library_location`). Not a field: no part of the location's identity, nor of
        what `to_dict` or `dataclasses.asdict` write."""
        return self.__dict__.get("_library")

    def through(self, library: Location | None) -> Location:
        """This line, carrying the library line it built or called (`library`)."""
        if library is None:
            return self
        out = Location(self.path, self.line)
        object.__setattr__(out, "_library", library)
        return out

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "line": self.line}


@dataclass
class Fix:
    """How to fix a finding: a one-line summary plus a unified diff or a paste-ready snippet.

    `safe` fixes keep the model's behaviour apart from the fix itself and may be applied by
    `--fix`; unsafe ones (like removing a final softmax) need `--unsafe-fixes`.
    """

    summary: str
    patch: str | None = None
    kind: str = "snippet"  # "diff" (applies to `path`) or "snippet"
    path: str | None = None
    safe: bool = True
    new_source: str | None = field(default=None, repr=False)  # full patched file, for --fix

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "patch": self.patch, "kind": self.kind, "safe": self.safe}


@dataclass
class Finding:
    rule: str
    name: str
    severity: Severity
    message: str
    module: str | None = None
    location: Location | None = None
    fix: Fix | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    # Ranking helpers: a higher impact is fixed first; `cause` names the rule this finding is a
    # symptom of (e.g. ND404 dead ReLUs caused by ND301 raw inputs).
    impact: float = 0.0
    cause: str | None = None
    # When the flagged line is library code (a file of an installed package, which the user
    # cannot patch): that line, and `location` is the user's own line that built or called the
    # model (None when no user code did). Serialized only when set.
    library_location: Location | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "rule": self.rule,
            "name": self.name,
            "severity": self.severity.label,
            "message": self.message,
            "module": self.module,
            "location": self.location.to_dict() if self.location else None,
            "fix": self.fix.to_dict() if self.fix else None,
            "evidence": self.evidence,
            "cause": self.cause,
        }
        if self.library_location is not None:
            out["library_location"] = self.library_location.to_dict()
        return out


@dataclass
class Report:
    """Everything one run of `check` or `probe` found for one target."""

    target: str
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measurements: dict[str, Any] = field(default_factory=dict)
    command: str = "check"
    # probe and run: the measured curves per step (the html report's charts); None for check
    curves: Curves | None = None

    def sorted_findings(self) -> list[Finding]:
        """Priority order: severity, then impact, root causes before their symptoms."""
        return sorted(
            self.findings,
            key=lambda f: (
                -int(f.severity),
                f.cause is not None,
                -f.impact,
                f.rule,
                f.module or "",
            ),
        )

    def fix_first(self) -> Finding | None:
        """The single change most likely to make the model train."""
        ranked = [f for f in self.sorted_findings() if f.severity >= Severity.WARNING and f.fix]
        roots = [f for f in ranked if f.cause is None]
        first = roots or ranked
        return first[0] if first else None

    def summary(self) -> dict[str, int]:
        counts = {"error": 0, "warning": 0, "info": 0}
        for f in self.findings:
            counts[f.severity.label] += 1
        counts["total"] = len(self.findings)
        return counts

    def to_dict(self) -> dict[str, Any]:
        from netdoctor.version import __version__

        out: dict[str, Any] = {
            "version": __version__,
            "target": self.target,
            "command": self.command,
            "findings": [f.to_dict() for f in self.sorted_findings()],
            "summary": self.summary(),
            "notes": list(self.notes),
        }
        first = self.fix_first()
        out["summary"]["fix_first"] = first.rule if first else None
        if self.measurements:
            out["measurements"] = self.measurements
        if self.curves is not None:
            out["curves"] = self.curves.to_dict()
        return out
