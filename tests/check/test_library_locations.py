"""Findings whose flagged line is library code (a file of an installed package): they point at
the user's own line that built or called the model, name the library line second, and never
carry a diff against the package."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli
from netdoctor.findings import Finding, Fix, Location, Report, Severity
from netdoctor.fixes.apply import fixable, writable
from netdoctor.fixes.patch import diff_fix
from netdoctor.loading.library import in_installed_package, package_name, package_path
from netdoctor.rules.engine import judge
from netdoctor.rules.registry import all_rules

LIB = '''
import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxNet(nn.Module):
    """A library model whose forward ends in a softmax (ND105) in the library's own code."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return F.softmax(self.head(self.body(x)), dim=1)
'''

USER = """
import fakelib
from torch import nn


def build():
    return fakelib.SoftmaxNet()


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = fakelib.SoftmaxNet()

    def forward(self, x):
        return self.net(x)
"""


@pytest.fixture
def installed(tmp_path, monkeypatch) -> Path:
    """`fakelib` installed in a site-packages folder (on the PYTHONPATH of `run_cli`), and a
    user file that builds its model."""
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "fakelib").mkdir(parents=True)
    (site / "fakelib" / "__init__.py").write_text(textwrap.dedent(LIB), encoding="utf-8")
    (tmp_path / "models.py").write_text(textwrap.dedent(USER), encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site / "fakelib" / "__init__.py"


def _nd105(target: str, folder: Path) -> dict:
    """ND105 as `netdoctor check` reports it from a fresh process: no caller's code on the
    stack (in-process, the test's own line would be the user's line that called the model)."""
    result = run_cli("check", target, "--input-shape", "1,28,28", "--format", "json", cwd=folder)
    found = [f for f in json.loads(result.stdout)["findings"] if f["rule"] == "ND105"]
    assert found, result.stdout + result.stderr
    return found[0]


def test_a_library_models_finding_points_at_the_users_call(installed, tmp_path):
    finding = _nd105("models.py:build", tmp_path)
    assert finding["location"] == {"path": "models.py", "line": 7}  # return fakelib.SoftmaxNet()
    lib = finding["library_location"]
    assert in_installed_package(lib["path"])
    assert package_path(lib["path"]) == "fakelib/__init__.py"
    assert "return F.softmax" in installed.read_text().splitlines()[lib["line"] - 1]
    assert (
        f"fakelib/__init__.py:{lib['line']}, is library code in the installed package fakelib"
        in finding["message"]
    )
    assert finding["fix"]["kind"] == "snippet"  # no diff into the package


def test_a_wrapped_library_models_finding_points_at_the_users_call(installed, tmp_path):
    finding = _nd105("models.py:Wrapped", tmp_path)
    assert finding["location"] == {"path": "models.py", "line": 16}  # return self.net(x)
    lib = finding["library_location"]
    assert package_path(lib["path"]) == "fakelib/__init__.py"
    assert "return F.softmax" in installed.read_text().splitlines()[lib["line"] - 1]
    assert "is library code in the installed package fakelib" in finding["message"]


def test_fix_never_writes_into_an_installed_package(installed, tmp_path):
    before = installed.read_text()
    result = run_cli(
        "check",
        "models.py:build",
        "--input-shape",
        "1,28,28",
        "--fix",
        "--unsafe-fixes",
        cwd=tmp_path,
    )
    assert installed.read_text() == before, result.stdout + result.stderr
    lib = Finding(
        "ND105",
        "softmax-before-loss",
        Severity.WARNING,
        "m",
        fix=Fix("s", "p", kind="diff", path=str(installed), new_source="x = 2\n", safe=True),
    )
    assert not fixable(lib, unsafe=True)
    assert not writable(str(installed), [tmp_path])


def test_a_library_model_named_directly_has_no_user_line(installed, tmp_path):
    finding = _nd105(f"{installed}:SoftmaxNet", tmp_path)
    assert finding["location"] is None
    assert in_installed_package(finding["library_location"]["path"])
    assert finding["fix"]["kind"] == "snippet"


def test_diff_fix_never_edits_an_installed_package(tmp_path):
    site = tmp_path / "dist-packages" / "pkg"
    site.mkdir(parents=True)
    (site / "mod.py").write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "mine.py").write_text("x = 1\n", encoding="utf-8")

    def edit(source: str) -> str:
        return source.replace("1", "2")

    lib = diff_fix("set x to 2", str(site / "mod.py"), edit, "x = 2\n")
    assert (lib.kind, lib.patch, lib.path, lib.new_source) == ("snippet", "x = 2\n", None, None)
    mine = diff_fix("set x to 2", str(tmp_path / "mine.py"), edit, "x = 2\n")
    assert mine.kind == "diff" and mine.new_source == "x = 2\n"


def test_rule_finding_and_judge_move_a_library_line_second():
    rule = all_rules()["ND105"]
    lib = Location("/usr/lib/python3/dist-packages/transformers/models/x/modeling_x.py", 120)
    f = rule.finding("softmax on the logits", location=lib)
    assert f.location is None and f.library_location is not None
    assert f.library_location.line == 120
    assert package_name(f.library_location.path) == "transformers"
    assert f.message.endswith(
        "(The flagged line, transformers/models/x/modeling_x.py:120, is library code in the "
        "installed package transformers, not yours to patch.)"
    )
    report = Report(target="models.py:build")
    judge(report, [f], anchor=Location("models.py", 6))
    assert report.findings[0].location == Location("models.py", 6)
    # An anchor inside a package is no user line: the finding keeps no location.
    g = rule.finding("softmax on the logits", location=lib)
    judge(Report(target="t"), [g], anchor=lib)
    assert g.location is None
    # A user's line that called into library code stays first and names the library line.
    called = Location("models.py", 15).through(lib)
    k = rule.finding("softmax on the logits", location=called)
    assert k.location == Location("models.py", 15) and k.library_location == lib
    assert "modeling_x.py:120, is library code" in k.message
    # A user's own location is left as it is.
    h = rule.finding("softmax on the logits", location=Location("models.py", 3))
    assert h.library_location is None and h.severity == Severity.WARNING


@pytest.mark.parametrize(
    "path, inside",
    [
        ("/venv/lib/python3.11/site-packages/timm/models/nfnet.py", True),
        ("C:\\Python311\\Lib\\site-packages\\timm\\models\\nfnet.py", True),
        ("/usr/lib/python3/dist-packages/torch/nn/modules/linear.py", True),
        ("venv/lib/site-packages/pkg.py", True),
        ("/home/me/site-packages-notes/model.py", False),
        ("/home/me/project/site-packages", False),  # a file named so, not a folder
        ("models.py", False),
    ],
)
def test_installed_packages_are_named_by_their_folder(path, inside):
    assert in_installed_package(path) is inside
    assert (package_path(path) is not None) is inside
