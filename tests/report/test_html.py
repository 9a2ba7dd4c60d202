"""The html reporter on reports built by hand (no torch): the page's structure, the findings as
the text report groups them, the charts made only from the curves there are, and escaping.
(The page in a real browser: test_html_browser.py; from the CLI: tests/cli/test_html_cli.py.)"""

from __future__ import annotations

import json
import re
import sys
from html.parser import HTMLParser

import pytest

from conftest import run_python
from netdoctor.curves import ActivationCurve, Curves, FixCurve, LayerCurve, ScaleCurve
from netdoctor.errors import UserError
from netdoctor.findings import Finding, Fix, Location, Report, Severity
from netdoctor.report import render

pytest.importorskip("plotly", reason="the html report's charts need plotly (the [html] extra)")

DIFF = (
    "--- a/fixtures/deep.py\n"
    "+++ b/fixtures/deep.py\n"
    "@@ -7,2 +7,3 @@\n"
    "     nn.Conv2d(3, 64, 3),\n"
    "+    nn.BatchNorm2d(64),  # </pre></details><script>alert('diff')</script>\n"
    "     nn.ReLU(),\n"
)
EVIL = "<script>alert('x')</script>"


class Page(HTMLParser):
    """The page's elements: (tag, attributes) in order, and each script's text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data

    def with_attr(self, name: str) -> list[str | None]:
        return [attrs[name] for _, attrs in self.tags if name in attrs]


def findings() -> list[Finding]:
    return [
        Finding(
            "ND404",
            "dead-relu",
            Severity.WARNING,
            "98% of relu1's units never fired",
            module="relu1",
            location=Location("fixtures/x.py", 14),
            evidence={"dead_fraction": 0.98},
            cause="ND301",
            impact=0.5,
        ),
        Finding(
            "ND301",
            "input-not-normalized",
            Severity.WARNING,
            "inputs range 0..255",
            fix=Fix("divide inputs by 255", patch="x = x / 255.0\n", kind="snippet"),
            impact=0.9,
        ),
        Finding(
            "ND101",
            "deep-plain-stack",
            Severity.WARNING,
            f"12 weight layers in series {EVIL}",
            module="features",
            location=Location("fixtures/<img src=x onerror=alert(1)>.py", 12),
            fix=Fix("add BatchNorm2d", patch=DIFF, kind="diff", path="fixtures/deep.py"),
            impact=0.3,
        ),
        Finding(
            "ND104",
            "unregistered-submodule",
            Severity.ERROR,
            "layers held in a plain list",
            module="blocks",
            location=Location("fixtures/x.py", 5),
            fix=Fix("use nn.ModuleList", patch="self.blocks = nn.ModuleList(blocks)\n"),
        ),
        Finding("ND109", "bias-before-norm", Severity.INFO, "conv1's bias is cancelled"),
    ]


def curves(steps: int = 20, layers: int = 3) -> Curves:
    measured = list(range(1, steps + 1))
    return Curves(
        loss=[2.3 * 0.9**i for i in range(steps)],
        accuracy=[min(1.0, 0.1 + 0.04 * i) for i in range(steps)],
        grad_norm=[1.0 + 0.01 * i for i in range(steps)],
        lr=[0.1] * steps,
        measured_steps=measured,
        layers=[
            LayerCurve(f"net.{k}", [10.0 ** (k - 4)] * steps, [1e-3 * (k + 1)] * steps)
            for k in range(layers)
        ],
        activations=[ActivationCurve("net.1", "relu", [0.5] * steps, 0.25)],
    )


def report(**kw) -> Report:
    r = Report(target="fixtures/x.py:Net", command=kw.pop("command", "probe"))
    r.findings = findings()
    r.notes = [f"a note {EVIL}"]
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def charts_of(page: Page) -> list[str | None]:
    return page.with_attr("data-chart")


# ----------------------------------------------------------------------------- findings


def test_findings_grouped_as_the_text_report_with_fix_first_on_top():
    text = render([report(command="check")], "html")
    page = Page(text)
    assert text.startswith("<!DOCTYPE html>")
    rules = page.with_attr("data-rule")
    assert rules == ["ND104", "ND301", "ND101", "ND404", "ND109"]  # the text report's order
    fix_first = text.index('class="fix-first"')
    assert fix_first < text.index("<h2>Findings</h2>")
    assert "ND104 unregistered-submodule</b></a> — use nn.ModuleList" in text
    heads = re.findall(r'<h3 class="(\w+)">(\w+) \((\d)\)</h3>', text)
    assert heads == [("error", "errors", "1"), ("warning", "warnings", "3"), ("info", "info", "1")]
    # each rule's title from the catalogue, and the symptom links to its cause
    assert "many weight layers in series" in text
    anchor = re.search(r'id="(finding-0-\d)" data-rule="ND301"', text).group(1)
    assert f'likely caused by <a href="#{anchor}">ND301 input-not-normalized</a>' in text
    assert '1 error</b>, <b class="warning">3 warnings</b>' in text


def test_check_report_has_no_charts_and_no_script():
    page = Page(render([report(command="check")], "html"))
    assert charts_of(page) == []
    assert page.scripts == []  # nothing to draw: plotly.js is not inlined


def test_fixes_are_highlighted_and_only_the_fix_first_patch_is_unfolded():
    text = render([report(command="check")], "html")
    assert text.count("<details open>") == 1
    first = text.index("<details open>")
    assert text.index('data-rule="ND104"') < first < text.index('data-rule="ND301"')
    assert "the patch (fixtures/deep.py)" in text
    assert 'class="gi"' in text  # pygments' inserted-line token


def test_everything_from_the_report_is_escaped():
    r = report(command="check", target=f'fixtures/"a&b"{EVIL}.py:Net')
    text = render([r], "html")
    page = Page(text)
    assert page.scripts == []  # no script got in, from the message, path, diff, note, target
    assert "<img" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "&quot;a&amp;b&quot;" in text
    assert "&lt;/pre&gt;&lt;/details&gt;" in text  # the diff's line, as code


def test_several_reports_get_a_table_of_contents():
    other = Report(target="fixtures/ok.py:Ok")
    text = render([report(command="check"), other], "html")
    assert "<h1>netdoctor: 2 targets</h1>" in text
    assert '<a href="#report-1"><code>fixtures/ok.py:Ok</code></a>: no problems found' in text
    assert '<p class="summary"><b class="clean">no problems found</b></p>' in text


# ----------------------------------------------------------------------------- charts


def test_probe_report_draws_its_curves_once_plotly_is_inlined():
    r = report(
        curves=curves(),
        measurements={
            "gradient_flow": [
                {"name": "net.0", "grad_norm": 1e-4, "grad_norm_max": 2e-4},
                {"name": "net.2", "grad_norm": 0.3, "grad_norm_max": 0.5},
            ]
        },
    )
    page = Page(render([r], "html"))
    # the constant learning rate is a setting, not a chart; no scaler, no verified fix
    assert charts_of(page) == ["loss", "gradient-flow", "grad-norm", "update-ratio", "activations"]
    plotly_js, *plots = page.scripts
    assert len(plotly_js) > 1_000_000 and "Plotly" in plotly_js
    assert len(plots) == 5 and all("Plotly.newPlot" in s for s in plots)
    flow = next(s for s in plots if '"chart-0-gradient-flow"' in s)
    assert '"net.0"' in flow and '"type":"log"' in flow  # 3.5 decades: a log axis


def test_only_the_charts_with_data():
    c = Curves(loss=[None, None], lr=[0.1, 0.01], measured_steps=[1, 2])
    page = Page(render([report(curves=c)], "html"))
    assert charts_of(page) == ["lr"]  # a varying lr; no finite loss, no layers
    assert charts_of(Page(render([report(curves=Curves())], "html"))) == []


def test_scaler_and_verified_fix_charts():
    c = curves()
    c.scalers = [ScaleCurve("GradScaler", [65536.0, 32768.0, 32768.0], skipped=[1])]
    c.fix = FixCurve("4 sigmoid/tanh activations replaced by ReLU", [2.3] * 20, [2.3, 1.0] * 10)
    r = report(
        curves=c,
        measurements={
            "verified_fix": {
                "applied": "4 sigmoid/tanh activations replaced by ReLU",
                "before": {"loss_first": 2.34, "loss_last": 2.31, "accuracy": 0.1},
                "after": {"loss_first": 2.31, "loss_last": 0.85, "accuracy": 0.88},
                "steps": 100,
                "symptom": {
                    "name": "first/last layer gradient ratio",
                    "before_text": "5.3e-04",
                    "after_text": "0.916",
                    "gone": True,
                },
            }
        },
    )
    text = render([r], "html")
    page = Page(text)
    assert "scale-1" in charts_of(page) and "verified-fix" in charts_of(page)
    assert text.index("<h2>Verified fix</h2>") < text.index('data-chart="verified-fix"')
    assert "loss 2.34 → 2.31 (accuracy 0.10) became 2.31 → 0.85 (accuracy 0.88)" in text
    assert "first/last layer gradient ratio: 5.3e-04 → 0.916 (symptom gone)" in text
    scale = next(s for s in page.scripts if '"chart-0-scale-1"' in s)
    assert '"skipped step"' in scale and '"x":[1]' in scale


def test_deep_models_draw_a_sample_of_their_layers():
    page = Page(render([report(curves=curves(layers=30))], "html"))
    grad = next(s for s in page.scripts if '"chart-0-grad-norm"' in s)
    names = re.findall(r'"name":"(net\.\d+)"', grad)
    assert len(names) == 12 and names[0] == "net.0" and names[-1] == "net.29"
    assert "12 of the 30 layers are drawn" in render([report(curves=curves(layers=30))], "html")


def test_chart_labels_are_escaped():
    c = curves()
    c.layers[0].name = "</script><script>alert(1)</script>"
    text = render([report(curves=c)], "html")
    assert "<script>alert(1)" not in text
    assert len(Page(text).scripts) == 1 + 4  # plotly.js and the four charts, nothing injected
    # as plotly's label html: the entities show the name as written
    assert r'"name":"&lt;\u002fscript&gt;&lt;script&gt;alert(1)' in text


def test_distributed_run_lists_its_ranks_and_per_rank_outliers():
    r = report(command="run")
    r.findings[0].evidence["ranks"] = [1]
    r.measurements = {
        "run": {
            "steps": 40,
            "stopped": None,
            "ranks": {
                "reported": [0, 1],
                "missing": [2],
                "per_rank": {"1": {"steps": 32, "stopped": "exception", "error": "ValueError"}},
                "world_size": 3,
                "backend": "gloo",
            },
        }
    }
    text = render([r], "html")
    assert "<h2>Ranks</h2>" in text
    rows = re.findall(r"<tr><td>(\d)</td><td>(\d*)</td><td>([\w ]+)</td>", text)
    assert rows == [("0", "40", "finished"), ("1", "32", "exception"), ("2", "", "sent no report")]
    assert re.search(r"ND404 dead-relu</a>: only on rank 1</li>", text)
    assert "world size 3 · backend gloo" in text


# ----------------------------------------------------------------------------- the data


def test_curves_are_a_new_json_key_and_strict():
    r = report(curves=Curves(loss=[2.3, float("nan")], measured_steps=[1]))
    data = json.loads(render([r], "json"))
    assert data["curves"]["loss"] == [2.3, None]
    assert data["curves"]["fix"] is None
    assert "curves" not in json.loads(render([report(command="check")], "json"))


def test_rendering_html_imports_no_torch():
    code = (
        "import sys\n"
        "from netdoctor.curves import Curves, LayerCurve\n"
        "from netdoctor.findings import Report\n"
        "from netdoctor.report import render\n"
        "c = Curves(loss=[2.0, 1.0], measured_steps=[1, 2], layers=[LayerCurve('a', [1, 2])])\n"
        "assert 'Plotly.newPlot' in render([Report('x.py:N', curves=c)], 'html')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_without_plotly_charts_are_a_user_error_and_check_still_renders(monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly raises ImportError
    with pytest.raises(UserError, match=r"pip install 'netdoctor\[html\]'"):
        render([report(curves=curves())], "html")
    assert 'data-rule="ND104"' in render([report(command="check")], "html")
