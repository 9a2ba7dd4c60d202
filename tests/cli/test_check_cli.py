"""`netdoctor check` as a user runs it: exit codes, the output formats (JSON contract, text,
SARIF, GitHub annotations, -o), suppression comments, the configuration, discovery, --diff.
(What each fixture reports is pinned by tests/snapshots; the rules' own behaviour is tested in
tests/rules/.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import SICK, check_json, findings_of, invoke, line_of

ALEXNET = SICK / "alexnet.py"
ALEXNET_TARGET = "fixtures/sick/alexnet.py:AlexNet"
ALEX = (ALEXNET_TARGET, "--input-shape", "1,224,224")
LENET_SIGMOID = "fixtures/sick/lenet_sigmoid.py:LeNet"
MNIST = ("--input-shape", "1,28,28")


def rules_of(report: dict) -> list[str]:
    return [f["rule"] for f in findings_of(report)]


@pytest.fixture(scope="module")
def alexnet() -> dict:
    report, result = check_json(*ALEX)
    assert result.exit_code == 0
    return report


# ------------------------------------------------------------------------ text report


def test_alexnet_text_report():
    result = invoke("check", *ALEX, "--no-color")
    assert result.exit_code == 0
    out = result.stdout
    where = f"fixtures/sick/alexnet.py:{line_of(ALEXNET, 'nn.Conv2d(')}"
    assert f"ND101 deep-plain-stack [info] {where}" in out  # 8 ReLU layers: fragile, trains
    assert "Fix first" not in out  # an info finding is no priority
    assert "+            nn.BatchNorm2d(96)" in out
    assert "0 errors, 0 warnings, 1 info" in out
    assert "\x1b[" not in out


def test_warning_text_report():
    result = invoke("check", LENET_SIGMOID, "--no-color")
    assert result.exit_code == 0
    out = result.stdout
    where = f"fixtures/sick/lenet_sigmoid.py:{line_of(SICK / 'lenet_sigmoid.py', 'nn.Sigmoid(')}"
    assert f"ND102 saturating-activation-chain [warning] {where}" in out
    assert "Fix first: ND102" in out
    assert "0 errors, 1 warning" in out


# ------------------------------------------------------------------------ exit codes


def test_exit_codes():
    assert invoke("check", "fixtures/healthy/lenet_relu.py:LeNet", *MNIST).exit_code == 0
    assert invoke("check", "fixtures/sick/forward_error.py:ShapeBug", *MNIST).exit_code == 1
    assert invoke("check", LENET_SIGMOID).exit_code == 0  # a warning does not fail by default
    assert invoke("check", LENET_SIGMOID, "--fail-on", "warning").exit_code == 1
    assert invoke("check", *ALEX, "--fail-on", "warning").exit_code == 0  # info only
    assert invoke("check", *ALEX, "--fail-on", "info").exit_code == 1
    assert (
        invoke(
            "check", "fixtures/sick/forward_error.py:ShapeBug", *MNIST, "--fail-on", "never"
        ).exit_code
        == 0
    )


# ------------------------------------------------------------------------ output formats


def test_json_contract(alexnet):
    assert set(alexnet) >= {"version", "target", "findings", "summary"}
    assert alexnet["target"] == ALEXNET_TARGET
    assert {"error", "warning", "info", "total"} <= set(alexnet["summary"])
    for f in alexnet["findings"]:
        assert set(f) >= {
            "rule",
            "name",
            "severity",
            "message",
            "module",
            "location",
            "fix",
            "evidence",
        }
        assert f["severity"] in ("error", "warning", "info")
        assert f["location"] is None or set(f["location"]) >= {"path", "line"}
        assert f["fix"] is None or set(f["fix"]) >= {"summary", "patch"}
        assert isinstance(f["evidence"], dict)


def test_json_several_targets():
    report, _ = check_json(
        "fixtures/healthy/lenet_relu.py:LeNet", "fixtures/sick/lenet_sigmoid.py:LeNet", *MNIST
    )
    assert [r["target"] for r in report["reports"]] == [
        "fixtures/healthy/lenet_relu.py:LeNet",
        "fixtures/sick/lenet_sigmoid.py:LeNet",
    ]
    assert report["summary"]["warning"] == 1 and report["summary"]["targets"] == 2


def test_sarif():
    result = invoke("check", *ALEX, "--format", "sarif")
    sarif = json.loads(result.stdout)
    assert sarif["version"] == "2.1.0"
    run = sarif["runs"][0]
    assert [r["id"] for r in run["tool"]["driver"]["rules"]] == ["ND101"]
    (res,) = run["results"]
    assert res["ruleId"] == "ND101" and res["level"] == "note"  # info
    assert "8 weight layers" in res["message"]["text"]
    phys = res["locations"][0]["physicalLocation"]
    assert phys["artifactLocation"]["uri"] == "fixtures/sick/alexnet.py"  # relative
    assert phys["region"]["startLine"] == line_of(ALEXNET, "nn.Conv2d(")


def test_github_annotations():
    result = invoke("check", *ALEX, "--format", "github")
    line = line_of(ALEXNET, "nn.Conv2d(")
    assert result.stdout.startswith(f"::notice file=fixtures/sick/alexnet.py,line={line},")
    assert len(result.stdout.splitlines()) == 1
    result = invoke("check", LENET_SIGMOID, "--format", "github")
    line = line_of(SICK / "lenet_sigmoid.py", "nn.Sigmoid(")
    assert result.stdout.startswith(f"::warning file=fixtures/sick/lenet_sigmoid.py,line={line},")


def test_output_file(tmp_path):
    out = tmp_path / "report.json"
    result = invoke("check", *ALEX, "--format", "json", "-o", out)
    assert result.exit_code == 0
    assert result.stdout == ""
    assert rules_of(json.loads(out.read_text())) == ["ND101"]
    text_out = tmp_path / "report.txt"
    invoke("check", *ALEX, "-o", text_out)
    assert "ND101" in text_out.read_text() and "\x1b[" not in text_out.read_text()


# ------------------------------------------------------------------------ suppression


def _alexnet_copy(tmp_path: Path, edit) -> Path:
    lines = ALEXNET.read_text().splitlines()
    edit(lines)
    copy = tmp_path / "alexnet.py"
    copy.write_text("\n".join(lines) + "\n")
    return copy


def _conv_index(lines: list[str]) -> int:
    return next(i for i, text in enumerate(lines) if "nn.Conv2d(" in text)


def _class_index(lines: list[str]) -> int:
    return next(i for i, text in enumerate(lines) if text.startswith("class AlexNet"))


@pytest.mark.parametrize(
    "where, ids, suppressed",
    [
        ("layer", "ND101", True),
        ("class", "ND101", True),
        ("layer", "ND102", False),
        ("layer", "ND102, nd101", True),
    ],
)
def test_suppression_comment(tmp_path, where, ids, suppressed):
    def edit(lines):
        i = _conv_index(lines) if where == "layer" else _class_index(lines)
        lines[i] += f"  # netdoctor: ignore[{ids}]"

    copy = _alexnet_copy(tmp_path, edit)
    report, result = check_json(f"{copy}:AlexNet", "--input-shape", "1,224,224", cwd=tmp_path)
    assert bool(findings_of(report, "ND101")) is not suppressed
    if suppressed:
        assert any("suppressed" in n for n in report["notes"])
    assert result.exit_code == 0


# ------------------------------------------------------------------------ configuration


def _project(tmp_path: Path, toml: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pyproject.toml").write_text(toml)
    (tmp_path / "fixtures" / "sick").mkdir(parents=True)
    shutil.copy(ALEXNET, tmp_path / "fixtures" / "sick" / "alexnet.py")
    return tmp_path


def test_config_ignore(tmp_path):
    root = _project(tmp_path, '[tool.netdoctor]\nignore = ["ND101"]\n')
    report, _ = check_json(*ALEX, cwd=root)
    assert findings_of(report) == []
    # The CLI's --select overrides the config's select, and --ignore adds to its ignore list.
    root2 = _project(tmp_path / "p2", '[tool.netdoctor]\nselect = ["ND2"]\n')
    report, _ = check_json(*ALEX, cwd=root2)
    assert findings_of(report) == []
    report, _ = check_json(*ALEX, "--select", "ND1", cwd=root2)
    assert rules_of(report) == ["ND101"]
    report, _ = check_json(*ALEX, "--select", "deep-plain-stack", cwd=root2)
    assert rules_of(report) == ["ND101"]


def test_config_rule_option(tmp_path):
    root = _project(tmp_path, "[tool.netdoctor.rules.ND101]\nmin-depth = 9\n")
    report, _ = check_json(*ALEX, cwd=root)
    assert findings_of(report, "ND101") == []
    root = _project(tmp_path / "p2", '[tool.netdoctor.rules.ND101]\nseverity = "error"\n')
    report, result = check_json(*ALEX, cwd=root)
    assert [f["severity"] for f in findings_of(report)] == ["error"]
    assert result.exit_code == 1


def test_config_fail_on(tmp_path):
    root = _project(tmp_path, '[tool.netdoctor]\nfail-on = "info"\n')
    assert invoke("check", *ALEX, cwd=root).exit_code == 1
    assert invoke("check", *ALEX, "--fail-on", "error", cwd=root).exit_code == 0


def test_config_input_shape_and_targets(tmp_path):
    root = _project(
        tmp_path,
        '[tool.netdoctor]\ntargets = ["fixtures/sick/alexnet.py:AlexNet"]\n'
        "input-shape = [1, 224, 224]\n",
    )
    report, _ = check_json(cwd=root)
    assert rules_of(report) == ["ND101"]
    assert not any("inferred" in n for n in report["notes"])


def test_config_unknown_key(tmp_path):
    root = _project(tmp_path, '[tool.netdoctor]\nfail_on = "warning"\n')
    result = invoke("check", *ALEX, cwd=root)
    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("netdoctor: error:") and "fail_on" in line and "fail-on" in line


def test_config_unknown_rule_table(tmp_path):
    root = _project(tmp_path, "[tool.netdoctor.rules.ND999]\nmin-depth = 3\n")
    result = invoke("check", *ALEX, cwd=root)
    assert result.exit_code == 2 and "ND999" in result.stderr


# ------------------------------------------------------------------------ discovery


def test_file_without_name_checks_buildable_classes():
    report, result = check_json("fixtures/sick/broken_residual.py", *MNIST)
    assert report["target"] == "fixtures/sick/broken_residual.py:Net"
    assert sorted(f["module"] for f in findings_of(report, "ND103")) == [
        "resi1.conv1",
        "resi1.conv2",
        "resi2.conv1",
        "resi2.conv2",
    ]
    skipped = [n for n in report["notes"] if "ResidualBlock" in n]
    assert skipped and "constructor arguments" in skipped[0] and "channels" in skipped[0]
    text = invoke("check", "fixtures/sick/broken_residual.py", *MNIST).stdout
    assert "ResidualBlock" in text and "constructor arguments" in text


def test_discovery_infers_the_input_shape_with_a_note():
    report, _ = check_json("fixtures/healthy/lenet_relu.py")
    assert any("inferred" in n and "--input-shape" in n for n in report["notes"])


# ------------------------------------------------------------------------ --diff


def test_diff_applies_cleanly_with_git(tmp_path):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git not installed")
    result = invoke("check", *ALEX, "--diff")
    assert result.exit_code == 0
    patch = result.stdout
    assert patch.startswith("--- a/fixtures/sick/alexnet.py\n+++ b/fixtures/sick/alexnet.py\n")
    work = tmp_path / "work"
    (work / "fixtures" / "sick").mkdir(parents=True)
    shutil.copy(ALEXNET, work / "fixtures" / "sick" / "alexnet.py")
    subprocess.run([git, "init", "-q"], cwd=work, check=True)
    (tmp_path / "fix.patch").write_text(patch)
    applied = subprocess.run(
        [git, "apply", "--check", str(tmp_path / "fix.patch")],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert applied.returncode == 0, applied.stderr
    subprocess.run([git, "apply", str(tmp_path / "fix.patch")], cwd=work, check=True)
    # The patched model is the fix: no more deep plain stack.
    report, _ = check_json(
        "fixtures/sick/alexnet.py:AlexNet", "--input-shape", "1,224,224", cwd=work
    )
    assert findings_of(report, "ND101") == []
    assert findings_of(report) == [] or all(f["severity"] == "info" for f in findings_of(report))


def test_diff_is_empty_for_a_healthy_model():
    result = invoke("check", "fixtures/healthy/lenet_relu.py:LeNet", *MNIST, "--diff")
    assert result.exit_code == 0 and result.stdout == ""
