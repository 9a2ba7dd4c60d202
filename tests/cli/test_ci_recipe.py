"""The CI recipe (docs/ci.md, "The CI gate"): every `netdoctor` command of its GitHub Actions
and GitLab jobs is run here, as written, on a folder of models, and what it writes is what code
scanning and a JSON consumer expect (SARIF 2.1.0 results with ruleId and a line; the JSON
contract)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import REPO, SICK, invoke


def doc_section(title: str) -> str:
    text = (REPO / "docs" / "ci.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def ci_commands() -> list[list[str]]:
    """The `netdoctor ...` commands of the CI section's jobs, split as a shell would."""
    commands = []
    for line in doc_section("The CI gate").splitlines():
        m = re.search(r"(?:run:|-)\s+(netdoctor\s.*)$", line.strip())
        if m:
            commands.append(shlex.split(m.group(1), comments=True))
    return commands


def test_the_recipe_has_a_sarif_job_with_the_upload_and_a_json_job():
    commands = ci_commands()
    assert [c[:2] for c in commands] == [["netdoctor", "check"]] * 2
    sarif, gitlab = commands
    assert sarif[-4:] == ["--format", "sarif", "-o", "netdoctor.sarif"]
    assert gitlab[-4:] == ["--format", "json", "-o", "netdoctor.json"]
    section = doc_section("The CI gate")
    assert "uses: github/codeql-action/upload-sarif@" in section
    assert "sarif_file: netdoctor.sarif" in section and "security-events: write" in section
    assert "- netdoctor.json" in section


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A repository with a models/ folder: one error, one warning, one clean model."""
    root = tmp_path_factory.mktemp("repo")
    (root / "models").mkdir()
    for name in ("zero_init.py", "mlp.py"):
        shutil.copy(SICK / name, root / "models" / name)
    shutil.copy(REPO / "fixtures" / "healthy" / "lenet_relu.py", root / "models" / "lenet.py")
    return root


@pytest.fixture(scope="module")
def ran(project) -> dict[str, tuple[int, str]]:
    """Each CI command, run as written in the repository root: {output file: (exit, stderr)}."""
    results = {}
    for argv in ci_commands():
        result = invoke(*argv[1:], cwd=project)
        results[argv[argv.index("-o") + 1]] = (result.exit_code, result.stderr)
    return results


def test_the_gate_fails_on_the_error_and_still_writes_the_report(project, ran):
    for name, (code, stderr) in ran.items():
        assert code == 1, stderr  # ND202 is an error: the job fails...
        assert (project / name).stat().st_size > 0  # ...and the report is there to upload


def test_the_sarif_file_is_what_code_scanning_takes(project, ran):
    log = json.loads((project / "netdoctor.sarif").read_text())
    assert log["version"] == "2.1.0"
    assert log["$schema"].endswith("sarif-2.1.0.json")
    (run,) = log["runs"]
    rules = [r["id"] for r in run["tool"]["driver"]["rules"]]
    results = run["results"]
    assert sorted(r["ruleId"] for r in results) == ["ND201", "ND202"]
    for res in results:
        assert res["ruleId"] in rules and rules[res["ruleIndex"]] == res["ruleId"]
        assert res["level"] in ("error", "warning", "note") and res["message"]["text"]
        (loc,) = res["locations"]
        phys = loc["physicalLocation"]
        uri = phys["artifactLocation"]["uri"]
        assert uri.startswith("models/") and not Path(uri).is_absolute()
        line = phys["region"]["startLine"]
        source = (project / uri).read_text().splitlines()[line - 1]
        assert "nn.Linear(" in source  # the line that built the flagged layer
    assert {r["ruleId"]: r["level"] for r in results} == {"ND202": "error", "ND201": "warning"}


def test_the_json_report_keeps_the_contract(project, ran):
    report = json.loads((project / "netdoctor.json").read_text())
    assert set(report) >= {"version", "reports", "summary"}
    targets = sorted(r["target"] for r in report["reports"])
    assert targets == [
        "models/lenet.py:LeNet",
        "models/mlp.py:MLP",
        "models/zero_init.py:ZeroHiddenMLP",
    ]
    found = {f["rule"]: f for r in report["reports"] for f in r["findings"]}
    assert sorted(found) == ["ND201", "ND202"]
    for f in found.values():
        assert {
            "rule",
            "name",
            "severity",
            "message",
            "module",
            "location",
            "fix",
            "evidence",
        } <= set(f)
        assert f["location"]["path"].startswith("models/") and f["location"]["line"] > 0
    assert report["summary"]["error"] == 1 and report["summary"]["warning"] == 1
