"""`--format html` and `--html FILE` for check, probe and run, as a user runs them: the page and
the measured curves behind its charts (json `curves`), and the usage errors. (The renderer on
hand-built reports: tests/report/test_html.py; the page in a browser: test_html_browser.py.)"""

from __future__ import annotations

import json
import re

import pytest

from conftest import FIXTURES, invoke, run_python

pytest.importorskip("plotly", reason="the html report's charts need plotly (the [html] extra)")

LENET_SIGMOID = "fixtures/sick/lenet_sigmoid.py:LeNet"
VANISHING = FIXTURES / "loops" / "vanishing.py"


def charts_in(page: str) -> list[str]:
    return re.findall(r'data-chart="([\w-]+)"', page)


def rules_in(page: str) -> list[str]:
    return re.findall(r'data-rule="(ND\d+)"', page)


# ----------------------------------------------------------------------------- check


def test_check_format_html_prints_the_page_without_charts():
    result = invoke("check", LENET_SIGMOID, "--format", "html")
    assert result.exit_code == 0, result.stderr
    page = result.stdout
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert rules_in(page) == ["ND102"]
    assert "fixtures/sick/lenet_sigmoid.py:16" in page
    assert charts_in(page) == [] and "<script" not in page


def test_check_html_file_next_to_the_text_report(tmp_path):
    out = tmp_path / "report.html"
    result = invoke("check", LENET_SIGMOID, "--html", out, "--no-color")
    assert result.exit_code == 0, result.stderr
    assert "Fix first: ND102" in result.stdout  # the text report still goes to stdout
    assert rules_in(out.read_text(encoding="utf-8")) == ["ND102"]


def test_html_file_that_cannot_be_written_is_one_line(tmp_path):
    result = invoke("check", LENET_SIGMOID, "--html", tmp_path / "no" / "such" / "r.html")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "cannot write" in result.stderr


def test_add_ignore_refuses_html(tmp_path):
    result = invoke("check", LENET_SIGMOID, "--add-ignore", "--html", tmp_path / "r.html")
    assert result.exit_code == 2 and "--html" in result.stderr


def test_without_plotly_probe_and_run_say_so_before_any_work():
    """One line naming the extra, exit 2, before the probe trains or the script runs."""
    for args in (
        ["probe", LENET_SIGMOID, "--data", "synthetic", "--format", "html"],
        ["run", "--html", "r.html", "fixtures/loops/no_such_script.py"],
    ):
        code = (
            "import sys\n"
            "sys.modules['plotly'] = None  # import plotly raises ImportError\n"
            "from netdoctor.cli import main\n"
            f"sys.argv = ['netdoctor', *{args!r}]\n"
            "main()\n"
        )
        result = run_python(code)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            "netdoctor: error: the html report needs plotly, which is not installed: "
            "pip install 'netdoctor[html]'"
        ]


# ----------------------------------------------------------------------------- probe


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[dict, str]:
    """One probe (40 steps), json on stdout and the page in a file: (report, page)."""
    page = tmp_path_factory.mktemp("probe") / "probe.html"
    result = invoke(
        "probe", LENET_SIGMOID, "--data", "synthetic", "--steps", "40", "--format", "json",
        "--html", page,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), page.read_text(encoding="utf-8")


@pytest.mark.slow
def test_probe_html_has_the_findings_and_every_chart(probed):
    report, page = probed
    assert rules_in(page) == [f["rule"] for f in report["findings"]]
    assert "ND403" in rules_in(page)
    assert charts_in(page) == [
        "loss",
        "gradient-flow",
        "grad-norm",
        "update-ratio",
        "activations",
        "verified-fix",
    ]  # sgd at a constant lr: no lr chart; fp32: no scaler
    assert "<h2>Verified fix</h2>" in page and "Verified fix:</span>" in page


@pytest.mark.slow
def test_probe_curves_are_the_runs_measurements(probed):
    report, _ = probed
    c = report["curves"]
    assert c["loss"] == pytest.approx(report["measurements"]["loss_curve"])
    assert c["measured_steps"] == list(range(1, 41))
    assert [x["name"] for x in c["layers"]] == [
        r["name"] for r in report["measurements"]["gradient_flow"]
    ]
    for layer, row in zip(c["layers"], report["measurements"]["gradient_flow"]):
        assert len(layer["grad_norm"]) == len(layer["update_ratio"]) == 40
        assert sum(layer["grad_norm"]) / 40 == pytest.approx(row["grad_norm"])
    assert [(a["name"], a["kind"]) for a in c["activations"]] == [
        ("net.1", "sigmoid"),
        ("net.4", "sigmoid"),
        ("net.8", "sigmoid"),
        ("net.10", "sigmoid"),
    ]
    assert all(len(a["share"]) == 40 for a in c["activations"])
    assert c["lr"] == [0.01] * 40 and c["scalers"] == []
    # the verified fix: the loss as it was and with the fix, over the steps it compared (40 is
    # too short for this one: it ran both again for 120)
    fix, vf = c["fix"], report["measurements"]["verified_fix"]
    assert fix["applied"] == vf["applied"] and vf["improved"]
    assert len(fix["before"]) == len(fix["after"]) == vf["steps"]
    assert fix["before"][:40] == pytest.approx(c["loss"])  # the same batches, the same model
    assert fix["after"][0] == pytest.approx(vf["after"]["loss_first"])
    tail = min(10, vf["steps"] // 10)  # "loss_last": the mean of the last steps
    assert sum(fix["after"][-tail:]) / tail == pytest.approx(vf["after"]["loss_last"])


@pytest.mark.slow
def test_fp16_probe_carries_its_scale(tmp_path):
    result = invoke(
        "probe", LENET_SIGMOID, "--data", "synthetic", "--steps", "12", "--precision", "fp16",
        "--no-verify", "--format", "json", "--html", tmp_path / "p.html",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    scalers = json.loads(result.stdout)["curves"]["scalers"]
    assert len(scalers) == 1 and len(scalers[0]["scale"]) == 12
    assert all(s > 0 for s in scalers[0]["scale"])
    assert "scale-1" in charts_in((tmp_path / "p.html").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- run


@pytest.mark.slow
def test_run_html_and_its_curves(tmp_path):
    page_path = tmp_path / "run.html"
    json_path = tmp_path / "run.json"
    result = invoke("run", "--format", "json", "-o", json_path, "--html", page_path, VANISHING)
    assert result.exit_code == 0, result.stderr
    report = json.loads(json_path.read_text(encoding="utf-8"))
    page = page_path.read_text(encoding="utf-8")
    assert rules_in(page) == [f["rule"] for f in report["findings"]]
    assert {"ND403", "ND102"} <= set(rules_in(page))
    assert charts_in(page) == ["loss", "gradient-flow", "grad-norm", "update-ratio", "activations"]
    c = report["curves"]
    steps = report["measurements"]["run"]["steps"]
    assert len(c["loss"]) == len(c["lr"]) == len(c["grad_norm"]) == steps
    assert c["loss"] == pytest.approx(report["measurements"]["loss_curve"])
    assert c["measured_steps"][:4] == [1, 2, 3, 4] and len(c["measured_steps"]) < steps
    assert all(len(x["grad_norm"]) == len(c["measured_steps"]) for x in c["layers"])
    assert c["fix"] is None  # run verifies nothing


@pytest.mark.slow
def test_run_format_html_of_a_scaler_that_skips_every_step(tmp_path):
    out = tmp_path / "run.html"
    script = FIXTURES / "loops" / "amp_overflow.py"
    result = invoke("run", "--format", "html", "-o", out, script)
    assert result.exit_code == 1, result.stderr  # ND601 is an error
    page = out.read_text(encoding="utf-8")
    assert {"ND601", "ND401"} <= set(rules_in(page))
    assert "scale-1" in charts_in(page) and "skipped step" in page


def test_watch_options_accept_html():
    from netdoctor.watcher.settings import WatchOptions

    assert WatchOptions.from_kwargs(format="html").format == "html"


def test_help_names_the_html_option():
    for command in ("check", "probe", "run"):
        result = invoke(command, "--help")
        assert "--html FILE" in result.stdout
