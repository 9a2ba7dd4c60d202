"""The html reports of a probe and of a `run` opened in a real headless Chromium (the system's,
driven by playwright): the charts rendered, nothing went to the console, the findings are
there, and the page made no request beyond its own file.

Skipped when playwright or chromium is missing, unless NETDOCTOR_REQUIRE_BROWSER=1 (CI sets it,
and installs Debian's chromium): then that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import FIXTURES, run_cli

REQUIRE = os.environ.get("NETDOCTOR_REQUIRE_BROWSER") == "1"
CURVES = {"loss", "gradient-flow", "grad-norm", "update-ratio", "activations"}

pytestmark = pytest.mark.slow


def chromium() -> str:
    """The browser's path, or skip (fail under NETDOCTOR_REQUIRE_BROWSER=1)."""
    missing = None
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing = "no chromium on PATH (Debian: apt-get install chromium)"
    for module, extra in (("playwright.sync_api", "test"), ("plotly", "html")):
        try:
            __import__(module)
        except ImportError:
            missing = f"{module.split('.')[0]} is not installed (the [{extra}] extra)"
    if missing is not None:
        if REQUIRE:
            pytest.fail(f"{missing}, and NETDOCTOR_REQUIRE_BROWSER=1")
        pytest.skip(missing)
    assert path is not None
    return path


@dataclass
class Opened:
    """What the browser saw of a page."""

    requests: list[str] = field(default_factory=list)
    console: list[tuple[str, str]] = field(default_factory=list)  # (type, text)
    errors: list[str] = field(default_factory=list)  # uncaught exceptions
    charts: list[dict[str, Any]] = field(default_factory=list)
    findings: list[dict[str, str]] = field(default_factory=list)
    text: str = ""


# Per chart: its svg layers and the traces drawn in them, and the axis tick labels.
CHARTS_JS = """() => Array.from(document.querySelectorAll('figure.chart')).map(f => ({
  key: f.dataset.chart,
  svgs: f.querySelectorAll('svg.main-svg').length,
  traces: f.querySelectorAll('.scatterlayer .trace, .barlayer .trace').length,
  paths: f.querySelectorAll('.scatterlayer path.js-line, .barlayer path').length,
  ticks: f.querySelectorAll('.xtick text, .ytick text').length,
  width: f.querySelector('.js-plotly-plot') ? f.querySelector('.js-plotly-plot')
    .getBoundingClientRect().width : 0,
}))"""
FINDINGS_JS = """() => Array.from(document.querySelectorAll('article.finding')).map(a => ({
  rule: a.dataset.rule,
  shown: a.querySelector('.rule').innerText,
  name: a.querySelector('.name').innerText,
  title: a.querySelector('.title') ? a.querySelector('.title').innerText : '',
}))"""


def open_in_chromium(page_path: Path) -> Opened:
    """Open the file offline, every request recorded and anything but file: or data: aborted;
    wait for every chart to draw."""
    from playwright.sync_api import sync_playwright

    seen = Opened()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium())
        try:
            context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.on("console", lambda m: seen.console.append((m.type, m.text)))
            page.on("pageerror", lambda e: seen.errors.append(str(e)))
            page.on("request", lambda r: seen.requests.append(r.url))

            def only_local(route: Any) -> None:
                if route.request.url.startswith(("file:", "data:")):
                    route.continue_()
                else:
                    route.abort()

            page.route("**/*", only_local)
            page.goto(page_path.as_uri(), wait_until="load")
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('figure.chart'))"
                ".every(f => f.querySelector('svg.main-svg'))",
                timeout=30_000,
            )
            seen.charts = page.evaluate(CHARTS_JS)
            seen.findings = page.evaluate(FINDINGS_JS)
            seen.text = page.inner_text("body")
        finally:
            browser.close()
    return seen


def produce(tmp: Path, *command: str) -> tuple[dict, Path]:
    """`netdoctor COMMAND... --format json -o report.json --html report.html`, as a user runs
    it: (the json report, the page)."""
    out, page = tmp / "report.json", tmp / "report.html"
    if command[0] == "run":
        args = ["run", "--format", "json", "-o", out, "--html", page, *command[1:]]
    else:
        args = [*command, "--format", "json", "-o", out, "--html", page]
    result = run_cli(*args, timeout=400)
    assert out.is_file() and page.is_file(), result.stderr
    return json.loads(out.read_text(encoding="utf-8")), page


def assert_sound(seen: Opened, report: dict, expected: set[str]) -> None:
    from netdoctor.catalogue import RULES

    # no request but the page itself, nothing on the console, no uncaught exception
    assert seen.requests and all(u.startswith(("file:", "data:")) for u in seen.requests), (
        seen.requests
    )
    assert not seen.errors, seen.errors
    assert not [m for m in seen.console if m[0] in ("error", "warning")], seen.console
    # the charts: each drawn in its svg layers, with its traces and axes
    keys = [c["key"] for c in seen.charts]
    assert expected <= set(keys), keys
    for c in seen.charts:
        assert c["svgs"] >= 2 and c["traces"] >= 1 and c["paths"] >= 1, c
        assert c["ticks"] >= 4 and c["width"] > 300, c
    # the findings, in the report's order, with their rule ids, names and titles
    assert [f["rule"] for f in seen.findings] == [f["rule"] for f in report["findings"]]
    for shown, f in zip(seen.findings, report["findings"]):
        assert shown["shown"] == f["rule"] and shown["name"] == f["name"]
        assert shown["title"] == RULES[f["rule"]].summary
    first = report["summary"]["fix_first"]
    flat = "".join(seen.text.split())
    assert first is None or f"FIXFIRST{first}" in flat.upper()


def test_probe_report_in_chromium(tmp_path):
    chromium()
    report, page = produce(
        tmp_path, "probe", "fixtures/sick/lenet_sigmoid.py:LeNet", "--data", "synthetic"
    )
    assert {"ND102", "ND403"} <= {f["rule"] for f in report["findings"]}
    seen = open_in_chromium(page)
    fix = {"verified-fix"} if report["curves"]["fix"] else set()
    assert_sound(seen, report, CURVES | fix)
    assert "Verified fix" in seen.text or not fix


def test_run_report_in_chromium(tmp_path):
    chromium()
    report, page = produce(tmp_path, "run", str(FIXTURES / "loops" / "vanishing.py"))
    assert {"ND102", "ND403"} <= {f["rule"] for f in report["findings"]}
    seen = open_in_chromium(page)
    assert_sound(seen, report, CURVES)
