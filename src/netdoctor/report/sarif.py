"""SARIF 2.1.0 reporter, for code scanning (e.g. GitHub's upload-sarif)."""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import quote

from netdoctor.catalogue import RULES
from netdoctor.findings import Finding, Report, Severity
from netdoctor.loading.library import in_installed_package, package_name
from netdoctor.report._common import is_relative, json_safe, rel_path, target_file

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
INFORMATION_URI = "https://pypi.org/project/netdoctor/"
_LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}


def level(severity: Severity) -> str:
    return _LEVEL[severity]


def _artifact(path: str) -> dict[str, Any]:
    rel = rel_path(path)
    if is_relative(rel):
        return {"uri": quote(rel, safe="/"), "uriBaseId": "%SRCROOT%"}
    from pathlib import Path

    try:
        return {"uri": Path(rel).as_uri()}
    except ValueError:
        return {"uri": quote(rel, safe="/:")}


def _rule_descriptor(rule_id: str, example: Finding) -> dict[str, Any]:
    info = RULES.get(rule_id)
    if info is not None:
        name, summary, sev, stage = info.name, info.summary, info.severity, info.stage
    else:
        name, summary, sev, stage = example.name, example.name, example.severity, None
    desc: dict[str, Any] = {
        "id": rule_id,
        "name": name,
        "shortDescription": {"text": summary},
        "fullDescription": {
            "text": f"{rule_id} {name}: {summary}. See `netdoctor explain {rule_id}`."
        },
        "defaultConfiguration": {"level": level(sev)},
    }
    if stage:
        desc["properties"] = {"tags": [stage]}
    return desc


def _result(finding: Finding, report: Report, rule_index: int) -> dict[str, Any]:
    text = finding.message
    if finding.fix is not None:
        text = f"{text} Fix: {finding.fix.summary}"
    result: dict[str, Any] = {
        "ruleId": finding.rule,
        "ruleIndex": rule_index,
        "level": level(finding.severity),
        "message": {"text": text},
    }
    if finding.location is not None and finding.location.path:
        phys: dict[str, Any] = {"artifactLocation": _artifact(finding.location.path)}
        if finding.location.line and finding.location.line >= 1:
            phys["region"] = {"startLine": int(finding.location.line)}
        result["locations"] = [{"physicalLocation": phys}]
    else:
        fallback = target_file(report.target)
        if fallback and not in_installed_package(fallback):
            result["locations"] = [{"physicalLocation": {"artifactLocation": _artifact(fallback)}}]
    library = finding.library_location
    if library is not None and library.path:
        lib: dict[str, Any] = {"artifactLocation": _artifact(library.path)}
        if library.line and library.line >= 1:
            lib["region"] = {"startLine": int(library.line)}
        result["relatedLocations"] = [
            {
                "id": 1,
                "physicalLocation": lib,
                "message": {
                    "text": f"the flagged line: library code in the installed package "
                    f"{package_name(library.path)}"
                },
            }
        ]
    key = "\x00".join([finding.rule, report.target, finding.module or "", finding.name])
    result["partialFingerprints"] = {"netdoctor/v1": hashlib.sha256(key.encode()).hexdigest()[:32]}
    props: dict[str, Any] = {"target": report.target}
    if finding.module:
        props["module"] = finding.module
    if finding.cause:
        props["cause"] = finding.cause
    if finding.evidence:
        props["evidence"] = json_safe(finding.evidence)
    if finding.fix is not None:
        props["fix"] = {
            "summary": finding.fix.summary,
            "patch": finding.fix.patch,
            "kind": finding.fix.kind,
            "safe": finding.fix.safe,
        }
    result["properties"] = props
    return result


def to_data(reports: list[Report]) -> dict[str, Any]:
    from netdoctor.version import __version__

    pairs = [(f, r) for r in reports for f in r.sorted_findings()]
    examples: dict[str, Finding] = {}
    for f, _ in pairs:
        examples.setdefault(f.rule, f)
    rule_ids = sorted(examples)
    index = {rid: i for i, rid in enumerate(rule_ids)}
    notes = [n for r in reports for n in r.notes]
    invocation: dict[str, Any] = {"executionSuccessful": True}
    if notes:
        invocation["toolExecutionNotifications"] = [
            {"level": "note", "message": {"text": n}} for n in notes
        ]
    run = {
        "tool": {
            "driver": {
                "name": "netdoctor",
                "version": __version__,
                "semanticVersion": __version__,
                "informationUri": INFORMATION_URI,
                "rules": [_rule_descriptor(rid, examples[rid]) for rid in rule_ids],
            }
        },
        "invocations": [invocation],
        "results": [_result(f, r, index[f.rule]) for f, r in pairs],
    }
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": [run]}


def render(reports: list[Report]) -> str:
    return json.dumps(to_data(reports), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
