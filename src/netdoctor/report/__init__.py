"""Reporters: format finished Report objects as text, json, sarif, github annotations or a
self-contained html page.

Torch-free: nothing here (directly or indirectly) imports torch.
"""

from __future__ import annotations

from netdoctor.findings import Report

FORMATS = ("text", "json", "sarif", "github", "html")


def render(
    reports: list[Report] | Report,
    fmt: str,
    *,
    color: bool | None = None,
    width: int | None = None,
) -> str:
    """Render reports in `fmt` (text|json|sarif|github|html). `color`/`width` apply to text
    only; color=None means auto (a TTY on stdout, honouring NO_COLOR/FORCE_COLOR). html with
    charts (probe, run) needs plotly: UserError without it."""
    if isinstance(reports, Report):
        reports = [reports]
    reports = list(reports)
    if fmt == "text":
        from netdoctor.report import text

        return text.render(reports, color=color, width=width)
    if fmt == "json":
        from netdoctor.report import json_report

        return json_report.render(reports)
    if fmt == "sarif":
        from netdoctor.report import sarif

        return sarif.render(reports)
    if fmt == "github":
        from netdoctor.report import github

        return github.render(reports)
    if fmt == "html":
        from netdoctor.report import html

        return html.render(reports)
    raise ValueError(f"unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})")


__all__ = ["FORMATS", "render"]
