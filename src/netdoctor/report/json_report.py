"""JSON reporter: the machine contract (SPEC "Output, exit codes, configuration")."""

from __future__ import annotations

import json
from typing import Any

from netdoctor.findings import Report
from netdoctor.report._common import aggregate_summary, json_safe


def to_data(reports: list[Report]) -> dict[str, Any]:
    """One report -> `Report.to_dict()`; several -> {"version", "reports", "summary"}."""
    if len(reports) == 1:
        return json_safe(reports[0].to_dict())
    from netdoctor.version import __version__

    return json_safe(
        {
            "version": __version__,
            "reports": [r.to_dict() for r in reports],
            "summary": aggregate_summary(reports),
        }
    )


def render(reports: list[Report]) -> str:
    return json.dumps(to_data(reports), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
