"""GitHub Actions workflow commands (annotations), one per finding."""

from __future__ import annotations

from netdoctor.findings import Finding, Report, Severity
from netdoctor.report._common import rel_path

_COMMAND = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(finding: Finding) -> str:
    props: list[str] = []
    if finding.location is not None and finding.location.path:
        props.append(f"file={escape_property(rel_path(finding.location.path))}")
        if finding.location.line:
            props.append(f"line={int(finding.location.line)}")
    props.append(f"title={escape_property(f'{finding.rule} {finding.name}')}")
    message = finding.message
    if finding.fix is not None:
        message = f"{message} Fix: {finding.fix.summary}"
    return f"::{_COMMAND[finding.severity]} {','.join(props)}::{escape_data(message)}"


def render(reports: list[Report]) -> str:
    lines = [annotation(f) for r in reports for f in r.sorted_findings()]
    return "".join(line + "\n" for line in lines)
