"""`check --add-ignore`: accept today's findings by writing `# netdoctor: ignore[...]` comments
onto the lines that constructed the flagged layers, so a gate fails only on new problems (what
`ruff --add-noqa` does for lint findings).

The comment goes where `netdoctor.suppress` reads it (one module decides both), merged into an
existing netdoctor comment on that line; nothing else in the file changes. Files outside the
project are never written, as for --fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from netdoctor.errors import UserError
from netdoctor.findings import Finding, Report
from netdoctor.fixes.apply import forget, writable
from netdoctor.loading.target import display_path
from netdoctor.suppress import is_suppressed, with_ignores


@dataclass
class IgnoreOutcome:
    """What --add-ignore wrote, and the findings it could not suppress (with the reason)."""

    comments: int = 0  # lines that got a new comment or new IDs in an existing one
    files: list[str] = field(default_factory=list)
    left: list[tuple[Finding, str]] = field(default_factory=list)


def add_ignores(reports: list[Report], allowed_roots: list[Path]) -> IgnoreOutcome:
    outcome = IgnoreOutcome()
    wanted: dict[str, dict[int, set[str]]] = {}  # path -> {line: rule IDs}
    placed: list[Finding] = []
    for report in reports:
        for finding in report.findings:
            reason = _unsuppressible(finding, allowed_roots)
            if reason:
                outcome.left.append((finding, reason))
                continue
            loc = finding.location
            assert loc is not None and loc.line is not None  # else _unsuppressible says why
            path = str(Path(loc.path).resolve())
            wanted.setdefault(path, {}).setdefault(loc.line, set()).add(finding.rule)
            placed.append(finding)
    for path, lines in sorted(wanted.items()):
        try:
            with open(path, encoding="utf-8", newline="") as f:  # keep \r\n line endings
                old = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {display_path(path)}: {e}") from None
        new, changed = with_ignores(old, lines)
        if changed:
            try:
                Path(path).write_text(new, encoding="utf-8", newline="")
            except OSError as e:
                raise UserError(f"cannot write {display_path(path)}: {e.strerror}") from None
            forget(path)  # the next import and the suppression reader see the new text
            outcome.comments += changed
            outcome.files.append(path)
    for finding in placed:  # the reader must agree with the writer
        if not is_suppressed(finding):
            outcome.left.append((finding, "the comment written for it does not suppress it"))
    return outcome


def _unsuppressible(finding: Finding, allowed_roots: list[Path]) -> str | None:
    loc = finding.location
    if loc is None or not loc.line:
        return "no source line to put a comment on"
    if not str(loc.path).endswith(".py") or not Path(loc.path).is_file():
        return f"{display_path(loc.path)} is not a Python source file"
    if not writable(loc.path, allowed_roots):
        return f"{display_path(loc.path)} is outside the project"
    return None
