"""Reporters: text, json, sarif, github. Reports are built by hand; no torch needed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from netdoctor.findings import Finding, Fix, Location, Report, Severity
from netdoctor.report import FORMATS, render

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

DIFF = (
    "--- a/fixtures/deep.py\n"
    "+++ b/fixtures/deep.py\n"
    "@@ -7,2 +7,3 @@\n"
    "     nn.Conv2d(3, 64, 3),\n"
    "+    nn.BatchNorm2d(64),\n"
    "     nn.ReLU(),\n"
)


def make_report(**kw) -> Report:
    r = Report(target="fixtures/x.py:Net", command=kw.pop("command", "check"))
    r.findings = [
        Finding(
            "ND404",
            "dead-relu",
            Severity.WARNING,
            "98% of relu1's units never fired over 200 steps",
            module="relu1",
            location=Location("fixtures/x.py", 14),
            evidence={"dead_fraction": 0.98, "per_unit": [0.0] * 100},
            cause="ND301",
            impact=0.5,
        ),
        Finding(
            "ND301",
            "input-not-normalized",
            Severity.WARNING,
            "inputs range 0..255 (mean 33.3, std 78.6)",
            evidence={"mean": 33.3, "std": 78.6},
            fix=Fix("divide inputs by 255", patch="x = x / 255.0\n", kind="snippet"),
            impact=0.9,
        ),
        Finding(
            "ND101",
            "deep-plain-stack",
            Severity.WARNING,
            "12 weight layers in series with no normalization",
            module="features",
            location=Location("fixtures/x.py", 12),
            fix=Fix(
                "add BatchNorm2d after each conv", patch=DIFF, kind="diff", path="fixtures/deep.py"
            ),
            evidence={"depth": 12},
            impact=0.3,
        ),
        Finding(
            "ND104",
            "unregistered-submodule",
            Severity.ERROR,
            "layers held in a plain list: 50% of the parameters are invisible\nto the optimizer",
            module="blocks",
            location=Location("fixtures/x.py", 5),
            fix=Fix("use nn.ModuleList", patch="self.blocks = nn.ModuleList(blocks)\n"),
        ),
        Finding(
            "ND109",
            "bias-before-norm",
            Severity.INFO,
            "conv1's bias is cancelled by bn1",
            module="conv1",
        ),
    ]
    r.notes = ["input shape inferred as 1,28,28"]
    for k, v in kw.items():
        setattr(r, k, v)
    return r


MEASUREMENTS = {
    "gradient_flow": [
        {"name": "fc1", "grad_norm": 1e-7},
        {"name": "fc2", "grad_norm": 3e-4},
        {"name": "fc3", "grad_norm": 0.2},
    ],
    "loss_curve": [2.3 - 0.01 * i for i in range(120)],
    "verified_fix": {
        "fix": "divide inputs by 255",
        "before": {"loss_first": 2.302, "loss_last": 2.301, "accuracy": 0.1},
        "after": {"loss_first": 2.30, "loss_last": 0.45, "accuracy": 0.86},
    },
}


# ----------------------------------------------------------------------------- dispatcher


def test_unknown_format_raises():
    with pytest.raises(ValueError):
        render([make_report()], "xml")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_renders_empty_and_clean_reports(fmt):
    out = render([Report(target="fixtures/ok.py:Ok")], fmt, color=False)
    assert isinstance(out, str)
    if fmt == "github":
        assert out == ""
    if fmt == "text":
        assert "no problems found" in out


def test_reporters_do_not_import_torch():
    code = (
        "import sys, netdoctor.report as r\n"
        "from netdoctor.report import text, json_report, sarif, github\n"
        "from netdoctor.findings import Report\n"
        "for f in r.FORMATS: r.render([Report(target='x.py:N')], f, color=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- json


def test_json_single_report_is_report_to_dict():
    r = make_report()
    data = json.loads(render([r], "json"))
    assert data == json.loads(json.dumps(r.to_dict()))
    assert {"version", "target", "findings", "summary"} <= set(data)
    assert data["target"] == "fixtures/x.py:Net"
    # priority order: error first, root cause before its symptom
    rules = [f["rule"] for f in data["findings"]]
    assert rules == ["ND104", "ND301", "ND101", "ND404", "ND109"]
    for f in data["findings"]:
        for key in ("rule", "name", "severity", "message", "module", "location", "fix", "evidence"):
            assert key in f
        assert f["severity"] in ("error", "warning", "info")
        assert isinstance(f["evidence"], dict)
        assert f["location"] is None or set(f["location"]) >= {"path", "line"}
        assert f["fix"] is None or set(f["fix"]) >= {"summary", "patch"}
    by_rule = {f["rule"]: f for f in data["findings"]}
    assert by_rule["ND101"]["location"] == {"path": "fixtures/x.py", "line": 12}
    assert by_rule["ND301"]["location"] is None
    assert by_rule["ND109"]["fix"] is None
    assert by_rule["ND101"]["fix"]["patch"] == DIFF
    assert data["summary"]["error"] == 1 and data["summary"]["warning"] == 3
    assert data["summary"]["fix_first"] == "ND104"


def test_json_several_reports_aggregate():
    data = json.loads(render([make_report(), Report(target="fixtures/ok.py:Ok")], "json"))
    assert set(data) == {"version", "reports", "summary"}
    assert [r["target"] for r in data["reports"]] == ["fixtures/x.py:Net", "fixtures/ok.py:Ok"]
    assert data["summary"]["error"] == 1
    assert data["summary"]["warning"] == 3
    assert data["summary"]["info"] == 1
    assert data["summary"]["total"] == 5


def test_json_is_strict_even_with_non_finite_numbers():
    r = make_report(measurements={"loss_curve": [2.3, float("nan"), float("inf")]})
    r.findings[0].evidence["loss"] = float("nan")
    text = render([r], "json")
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert data["measurements"]["loss_curve"] == [2.3, None, None]


# ----------------------------------------------------------------------------- sarif


def test_sarif_structure_and_levels():
    r = make_report()
    r.findings[2].location = Location(str(Path.cwd() / "fixtures" / "x.py"), 12)  # absolute
    log = json.loads(render([r], "sarif"))
    assert log["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    assert log["version"] == "2.1.0"
    assert len(log["runs"]) == 1
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "netdoctor"
    assert driver["version"]
    rules = driver["rules"]
    assert sorted(rd["id"] for rd in rules) == ["ND101", "ND104", "ND109", "ND301", "ND404"]
    for rd in rules:
        assert rd["shortDescription"]["text"]
        assert rd["defaultConfiguration"]["level"] in ("error", "warning", "note")
    results = run["results"]
    assert len(results) == 5
    levels = {res["ruleId"]: res["level"] for res in results}
    assert levels == {
        "ND104": "error",
        "ND301": "warning",
        "ND101": "warning",
        "ND404": "warning",
        "ND109": "note",
    }
    for res in results:
        assert rules[res["ruleIndex"]]["id"] == res["ruleId"]
        assert res["message"]["text"]
    by_rule = {res["ruleId"]: res for res in results}
    deep = by_rule["ND101"]
    phys = deep["locations"][0]["physicalLocation"]
    assert phys["artifactLocation"]["uri"] == "fixtures/x.py"  # made relative to cwd
    assert phys["region"]["startLine"] == 12
    assert deep["message"]["text"].endswith(" Fix: add BatchNorm2d after each conv")
    assert deep["properties"]["module"] == "features"
    assert deep["properties"]["evidence"] == {"depth": 12}
    # no location of its own: falls back to the target's file, without a region
    phys = by_rule["ND301"]["locations"][0]["physicalLocation"]
    assert phys["artifactLocation"]["uri"] == "fixtures/x.py"
    assert "region" not in phys
    assert "Fix:" not in by_rule["ND109"]["message"]["text"]


def test_sarif_no_location_for_dotted_module_target():
    r = Report(
        target="mypkg.models:Net",
        findings=[Finding("ND105", "softmax-output", Severity.WARNING, "returns softmax")],
    )
    res = json.loads(render([r], "sarif"))["runs"][0]["results"][0]
    assert "locations" not in res


def test_sarif_merges_several_reports_into_one_run():
    other = Report(
        target="fixtures/y.py:Other",
        findings=[
            Finding(
                "ND101",
                "deep-plain-stack",
                Severity.WARNING,
                "20 layers",
                location=Location("fixtures/y.py", 3),
            ),
        ],
    )
    log = json.loads(render([make_report(), other], "sarif"))
    assert len(log["runs"]) == 1
    run = log["runs"][0]
    assert len(run["results"]) == 6
    assert [rd["id"] for rd in run["tool"]["driver"]["rules"]].count("ND101") == 1


# ----------------------------------------------------------------------------- github


def test_github_annotations():
    out = render([make_report()], "github")
    lines = out.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith(
        "::error file=fixtures/x.py,line=5,title=ND104 unregistered-submodule::"
    )
    # newline in the message is escaped, so the annotation stays one line
    assert "invisible%0Ato the optimizer Fix: use nn.ModuleList" in lines[0]
    deep = next(line for line in lines if "ND101" in line)
    assert deep.startswith("::warning file=fixtures/x.py,line=12,title=ND101 deep-plain-stack::")
    dead = next(line for line in lines if "ND404" in line)
    assert "::98%25 of relu1" in dead
    no_loc = next(line for line in lines if "ND301" in line)
    assert no_loc.startswith("::warning title=ND301 input-not-normalized::")
    info = next(line for line in lines if "ND109" in line)
    assert info.startswith("::notice title=ND109 bias-before-norm::")


def test_github_escapes_properties():
    r = Report(
        target="t",
        findings=[
            Finding(
                "ND101",
                "deep-plain-stack",
                Severity.WARNING,
                "a\r\nb",
                location=Location("dir,with:odd/x.py", 2),
            ),
        ],
    )
    line = render([r], "github").rstrip("\n")
    assert "\n" not in line and "\r" not in line
    assert line == (
        "::warning file=dir%2Cwith%3Aodd/x.py,line=2,title=ND101 deep-plain-stack::a%0D%0Ab"
    )


# ----------------------------------------------------------------------------- text


def test_text_layout_plain():
    out = render([make_report()], "text", color=False, width=100)
    assert not ANSI.search(out)
    assert "fixtures/x.py:Net" in out
    assert "Fix first: ND104 unregistered-submodule — use nn.ModuleList (fixtures/x.py:5)" in out
    assert "ND101 deep-plain-stack [warning] fixtures/x.py:12 (features)" in out
    assert "fix: add BatchNorm2d after each conv" in out
    for patch_line in DIFF.splitlines():
        assert patch_line.rstrip() in out
    assert "x = x / 255.0" in out
    assert "likely caused by ND301" in out
    assert "note: input shape inferred as 1,28,28" in out
    assert "1 error, 3 warnings, 1 info" in out
    # grouped by severity, errors first
    assert (
        out.index("ND104") < out.index("ND301 input-not-normalized [warning]") < out.index("ND109")
    )
    # evidence: short numbers only, never raw lists
    assert "dead_fraction=0.98" in out
    assert "per_unit" not in out
    # no trailing whitespace padding
    assert all(line == line.rstrip() for line in out.splitlines())


def test_text_color_has_ansi():
    out = render([make_report()], "text", color=True)
    assert ANSI.search(out)
    assert "Fix first:" in ANSI.sub("", out)


def test_text_user_strings_are_not_markup():
    r = Report(
        target="x.py:Net",
        findings=[
            Finding(
                "ND111",
                "redundant-activation",
                Severity.INFO,
                "relu [bold]twice[/bold]",
                module="layers[0]",
            ),
        ],
    )
    out = render([r], "text", color=False)
    assert "relu [bold]twice[/bold]" in out
    assert "(layers[0])" in out


def test_text_measurement_sections():
    out = render([make_report(command="probe", measurements=MEASUREMENTS)], "text", color=False)
    assert "Gradient flow" in out
    rows = {
        name: line
        for line in out.splitlines()
        for name in ("fc1", "fc2", "fc3")
        if line.startswith(name)
    }
    assert set(rows) == {"fc1", "fc2", "fc3"}
    assert rows["fc1"].count("█") < rows["fc2"].count("█") < rows["fc3"].count("█")
    curve = next(line for line in out.splitlines() if line.startswith("Loss curve"))
    assert "2.30 → 1.11" in curve
    assert any(c in curve for c in "▁▂▃▄▅▆▇█")
    assert (
        "Verified fix: divide inputs by 255: loss 2.30 → 2.30 (accuracy 0.10) "
        "became 2.30 → 0.45 (accuracy 0.86)"
    ) in " ".join(out.split())


def test_text_measurement_sections_absent_and_robust():
    out = render([make_report()], "text", color=False)
    assert "Gradient flow" not in out and "Loss curve" not in out and "Verified fix" not in out
    odd = {
        "gradient_flow": [
            {"name": "a", "grad_norm": 0.0},
            {"name": "b", "grad_norm": float("nan")},
        ],
        "loss_curve": [float("nan")] * 3,
        "verified_fix": {"fix": "x"},
    }
    out = render([make_report(measurements=odd)], "text", color=False)
    assert "Gradient flow" in out and "non-finite" in out
    assert "Loss curve" in out


def test_text_several_reports_final_summary():
    out = render([make_report(), Report(target="fixtures/ok.py:Ok")], "text", color=False)
    assert "fixtures/ok.py:Ok" in out and "no problems found" in out
    assert out.rstrip().splitlines()[-1] == "2 targets: 1 error, 3 warnings, 1 info"


def test_text_no_fix_first_without_fixable_warning():
    r = Report(
        target="x.py:N",
        findings=[
            Finding("ND109", "bias-before-norm", Severity.INFO, "cancelled", fix=Fix("bias=False")),
        ],
    )
    out = render([r], "text", color=False)
    assert "Fix first" not in out
    assert "0 errors, 0 warnings, 1 info" in out


VERIFIED_CHAIN = {
    "fix": "inputs scaled to [0, 1] (x / 255) + learning rate 0.5 → 0.05",
    "rule": "ND301",
    "applied": "inputs scaled to [0, 1] (x / 255) + learning rate 0.5 → 0.05",
    "before": {"loss_first": 5.18, "loss_last": 2.31, "accuracy": 0.08},
    "after": {"loss_first": 2.30, "loss_last": 0.41, "accuracy": 0.88},
    "improved": True,
    "outcome_improved": True,
    "steps": 100,
    "symptom": {
        "rule": "ND404",
        "name": "dead ReLU units (worst layer)",
        "before_text": "100%",
        "after_text": "19%",
        "gone": True,
    },
    "attempts": [
        {
            "applied": "inputs scaled to [0, 1] (x / 255)",
            "steps": 100,
            "outcome": "no",
            "after": {"loss_first": 2.30, "loss_last": 2.31, "accuracy": 0.09},
            "symptom_text": "100%",
        },
        {
            "applied": "inputs scaled to [0, 1] (x / 255) + learning rate 0.5 → 0.05",
            "steps": 100,
            "outcome": "improved",
            "after": {"loss_first": 2.30, "loss_last": 0.41, "accuracy": 0.88},
            "symptom_text": "19%",
        },
    ],
}


def test_text_verified_fix_shows_symptom_and_what_was_tried():
    out = render(
        [make_report(command="probe", measurements={"verified_fix": VERIFIED_CHAIN})],
        "text",
        color=False,
    )
    flat = " ".join(out.split())
    assert (
        "Verified fix: inputs scaled to [0, 1] (x / 255) + learning rate 0.5 → 0.05: loss "
        "5.18 → 2.31 (accuracy 0.08) became 2.30 → 0.41 (accuracy 0.88) over 100 steps"
    ) in flat
    assert "dead ReLU units (worst layer): 100% → 19% (symptom gone)" in flat
    assert (
        "tried inputs scaled to [0, 1] (x / 255): loss 2.30 → 2.31 (accuracy 0.09), dead "
        "ReLU units (worst layer) 100%"
    ) in flat
    assert flat.count("tried ") == 1  # the winning attempt is the headline, not a "tried" line


def test_text_fix_not_verified_lists_every_attempt_with_its_numbers():
    failed = dict(
        VERIFIED_CHAIN,
        improved=False,
        outcome_improved=False,
        after=VERIFIED_CHAIN["attempts"][0]["after"],
        symptom=dict(VERIFIED_CHAIN["symptom"], gone=False, after_text="100%"),
    )
    failed["attempts"] = [
        VERIFIED_CHAIN["attempts"][0],
        dict(
            VERIFIED_CHAIN["attempts"][1],
            outcome="no",
            after={"loss_first": 2.3, "loss_last": 2.29, "accuracy": 0.1},
        ),
    ]
    out = render(
        [make_report(command="probe", measurements={"verified_fix": failed})], "text", color=False
    )
    flat = " ".join(out.split())
    assert "Fix not verified: nothing tried improved the probe's loss 5.18 → 2.31" in flat
    assert "tried 2:" in flat
    assert "inputs scaled to [0, 1] (x / 255): loss 2.30 → 2.31 (accuracy 0.09)" in flat
    assert "+ learning rate 0.5 → 0.05: loss 2.30 → 2.29 (accuracy 0.10)" in flat
    assert "before: dead ReLU units (worst layer): 100%" in flat
    assert "Verified fix" not in flat


# ----------------------------------------------------------------------------- library code

LIBRARY = Location("/venv/lib/python3.11/site-packages/timm/layers/std_conv.py", 169)


def library_report() -> Report:
    r = Report(target="models.py:nfnet_l0")
    r.findings = [
        Finding(
            "ND204",
            "signal-collapse",
            Severity.WARNING,
            "the signal shrinks (The flagged line, timm/layers/std_conv.py:169, is library code "
            "in the installed package timm, not yours to patch.)",
            module="conv2d_8",
            location=Location("models.py", 5),
            library_location=LIBRARY,
        )
    ]
    return r


def test_json_names_the_library_line_second_and_only_when_there_is_one():
    data = json.loads(render([library_report()], "json"))
    (f,) = data["findings"]
    assert f["location"] == {"path": "models.py", "line": 5}  # the contract: {path, line}
    assert f["library_location"] == {"path": LIBRARY.path, "line": 169}
    plain = json.loads(render([make_report()], "json"))
    assert not any("library_location" in f for f in plain["findings"])


def test_sarif_points_at_the_users_line_and_relates_the_library_line():
    data = json.loads(render([library_report()], "sarif"))
    (result,) = data["runs"][0]["results"]
    (loc,) = result["locations"]
    assert loc["physicalLocation"]["artifactLocation"]["uri"] == "models.py"
    assert loc["physicalLocation"]["region"]["startLine"] == 5
    (related,) = result["relatedLocations"]
    assert related["physicalLocation"]["artifactLocation"]["uri"].endswith(
        "site-packages/timm/layers/std_conv.py"
    )
    assert related["physicalLocation"]["region"]["startLine"] == 169
    assert "library code in the installed package timm" in related["message"]["text"]


def test_text_and_github_show_the_users_line_and_name_the_library_line():
    text = render([library_report()], "text", color=False)
    assert "ND204 signal-collapse [warning] models.py:5" in text
    assert "timm/layers/std_conv.py:169, is library code" in " ".join(text.split())
    github = render([library_report()], "github")
    assert github.startswith("::warning file=models.py,line=5,")
    assert "is library code" in github
