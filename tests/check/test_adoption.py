"""Adopting the gate on an existing codebase: `check --add-ignore` accepts today's findings with
`# netdoctor: ignore[...]` comments (where the suppression reader looks for them, nothing else in
the files changed), `--statistics` counts findings per rule."""

from __future__ import annotations

import difflib
import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from conftest import SICK, chdir, check_json, findings_of, invoke
from netdoctor.findings import Finding, Location, Report, Severity
from netdoctor.fixes.ignores import add_ignores
from netdoctor.loading.target import load
from netdoctor.suppress import is_suppressed, with_ignores

ADDED = re.compile(r"^added (\d+) ignore comments? to (\d+) files?$", re.M)


def finding(rule: str, path: Path, line: int) -> Finding:
    return Finding(rule, "name", Severity.WARNING, "message", location=Location(str(path), line))


# ------------------------------------------------------------------ writing a comment


def test_a_comment_is_appended_and_nothing_else_changes():
    text = "a = 1\nx = nn.Linear(4, 4)   \ny = 2\n"
    new, changed = with_ignores(text, {2: {"ND201"}})
    assert new == "a = 1\nx = nn.Linear(4, 4)     # netdoctor: ignore[ND201]\ny = 2\n"
    assert changed == 1


def test_new_ids_merge_into_an_existing_netdoctor_comment():
    text = "x = nn.Conv2d(1, 8, 3)  # netdoctor: ignore[ND101]  (checked by hand)\n"
    new, changed = with_ignores(text, {1: {"ND109", "ND101"}})
    assert new == "x = nn.Conv2d(1, 8, 3)  # netdoctor: ignore[ND101, ND109]  (checked by hand)\n"
    assert changed == 1
    assert with_ignores(new, {1: {"ND109"}}) == (new, 0)  # idempotent


def test_other_comments_are_kept_and_a_bare_ignore_is_left_alone():
    text = "x = nn.Linear(4, 4)  # noqa: E501\ny = nn.Linear(4, 4)  # netdoctor: ignore\n"
    new, changed = with_ignores(text, {1: {"ND201"}, 2: {"ND201"}})
    assert new == (
        "x = nn.Linear(4, 4)  # noqa: E501  # netdoctor: ignore[ND201]\n"
        "y = nn.Linear(4, 4)  # netdoctor: ignore\n"
    )
    assert changed == 1


def test_windows_line_endings_and_a_missing_final_newline_are_kept():
    text = "a = 1\r\nx = nn.Linear(4, 4)\r\ny = nn.Linear(4, 4)"
    new, _ = with_ignores(text, {2: {"ND201"}, 3: {"ND202"}})
    assert new == (
        "a = 1\r\nx = nn.Linear(4, 4)  # netdoctor: ignore[ND201]\r\n"
        "y = nn.Linear(4, 4)  # netdoctor: ignore[ND202]"
    )


CONTINUED = '''\
from torch import nn

layer = nn.Linear(4, 4) \\
    if True else None
doc = nn.Linear(4, len("""one
two"""))
'''


def test_a_line_that_cannot_end_in_a_comment_gets_it_where_its_continuation_ends(tmp_path):
    new, changed = with_ignores(CONTINUED, {3: {"ND201"}, 5: {"ND202"}})
    lines = new.splitlines()
    assert lines[2] == "layer = nn.Linear(4, 4) \\"  # a comment cannot follow a backslash
    assert lines[3].endswith("if True else None  # netdoctor: ignore[ND201]")
    assert lines[5] == 'two"""))  # netdoctor: ignore[ND202]'
    assert changed == 2
    compile(new, "m.py", "exec")
    path = tmp_path / "m.py"
    path.write_text(new)
    # the reader looks where the writer wrote
    assert is_suppressed(finding("ND201", path, 3))
    assert is_suppressed(finding("ND202", path, 5))
    assert not is_suppressed(finding("ND203", path, 3))


def test_findings_without_a_source_line_are_reported_not_suppressible(tmp_path):
    onnx = Finding(
        "ND101",
        "deep-plain-stack",
        Severity.WARNING,
        "m",
        location=Location(str(tmp_path / "model.onnx")),
    )
    functional = Finding("ND105", "softmax-output", Severity.WARNING, "m")
    outcome = add_ignores([Report("t", findings=[onnx, functional])], [tmp_path])
    assert outcome.comments == 0 and outcome.files == []
    reasons = [reason for _, reason in outcome.left]
    assert reasons == ["no source line to put a comment on", "no source line to put a comment on"]


# ------------------------------------------------------------------ the command


@pytest.fixture
def sick_copy(tmp_path) -> Path:
    work = tmp_path / "models"
    shutil.copytree(SICK, work, ignore=shutil.ignore_patterns("__pycache__"))
    return work


def _changed_lines(old: str, new: str) -> list[tuple[str, str]]:
    """(old line, new line) for every replaced line; fails on inserted or deleted lines."""
    pairs = []
    a, b = old.splitlines(), new.splitlines()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        assert tag == "replace" and i2 - i1 == j2 - j1, (tag, a[i1:i2], b[j1:j2])
        pairs.extend(zip(a[i1:i2], b[j1:j2]))
    return pairs


@pytest.mark.slow
def test_add_ignore_on_the_sick_fixtures_leaves_a_clean_gate_and_only_added_comments(sick_copy):
    before = {p.name: p.read_text() for p in sick_copy.glob("*.py")}
    with chdir(sick_copy):
        built = sorted(m.target for m in load(".").models)  # what imports and builds today
    assert len(built) >= 25

    result = invoke("check", ".", "--add-ignore", cwd=sick_copy)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    m = ADDED.search(result.stderr)
    assert m, result.stderr
    assert "not suppressible" not in result.stderr

    after = {p.name: p.read_text() for p in sick_copy.glob("*.py")}
    changed = [name for name in before if before[name] != after[name]]
    assert int(m.group(2)) == len(changed) >= 15
    pairs = [pair for name in changed for pair in _changed_lines(before[name], after[name])]
    assert int(m.group(1)) == len(pairs)
    for old, new in pairs:  # each changed line is the old one plus an appended comment
        assert new.startswith(old), (old, new)
        assert re.fullmatch(r"  # netdoctor: ignore\[ND\d{3}(, ND\d{3})*\]", new[len(old) :])

    # The next check: the same models still import and build, and nothing is reported.
    report, result = check_json(".", cwd=sick_copy)
    assert result.exit_code == 0
    assert sorted(r["target"] for r in report["reports"]) == built
    assert findings_of(report) == []
    assert report["summary"]["total"] == 0
    suppressed = [n for r in report["reports"] for n in r["notes"] if "suppressed by" in n]
    assert len(suppressed) >= 30  # today's findings, all of them still found and suppressed
    assert {n.split()[0] for n in suppressed} >= {"ND002", "ND101", "ND104", "ND109", "ND201"}


MULTILINE = textwrap.dedent("""\
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(
                1, 8, 3,
                padding=1,
            )  # a multi-line call: its finding points at the first line
            self.bn = nn.BatchNorm2d(8, momentum=0.9)  # netdoctor: ignore[ND101]
            self.head = nn.Linear(8 * 28 * 28, 10)

        def forward(self, x):
            return self.head(self.bn(self.conv(x)).flatten(1))
    """)


def test_add_ignore_on_a_multi_line_call_and_a_line_with_a_comment(tmp_path):
    (tmp_path / "net.py").write_text(MULTILINE)
    report, _ = check_json("net.py:Net", "--input-shape", "1,28,28", cwd=tmp_path)
    assert sorted(f["rule"] for f in findings_of(report)) == ["ND109", "ND203"]
    result = invoke("check", "net.py:Net", "--input-shape", "1,28,28", "--add-ignore", cwd=tmp_path)
    assert "added 2 ignore comments to 1 file" in result.stderr
    text = (tmp_path / "net.py").read_text()
    assert "self.conv = nn.Conv2d(  # netdoctor: ignore[ND109]\n" in text
    assert "momentum=0.9)  # netdoctor: ignore[ND101, ND203]\n" in text
    report, result = check_json("net.py:Net", "--input-shape", "1,28,28", cwd=tmp_path)
    assert findings_of(report) == [] and result.exit_code == 0


BLOCK = textwrap.dedent("""\
    from torch import nn


    def block():
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    """)

USES_BLOCK = textwrap.dedent("""\
    import sys
    from pathlib import Path

    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
    from blocks import block  # noqa: E402


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = block()
            self.head = nn.Linear(8 * 28 * 28, 10)

        def forward(self, x):
            return self.head(self.body(x).flatten(1))
    """)


def test_files_outside_the_project_are_not_written(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "blocks.py").write_text(BLOCK)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "net.py").write_text(USES_BLOCK)
    result = invoke(
        "check", "net.py:Net", "--input-shape", "1,28,28", "--add-ignore", cwd=tmp_path / "proj"
    )
    assert result.exit_code == 0
    assert "ND109 at " in result.stderr and "lib/blocks.py is outside the project" in result.stderr
    assert "added 0 ignore comments to 0 files" in result.stderr
    assert (tmp_path / "lib" / "blocks.py").read_text() == BLOCK
    assert (tmp_path / "proj" / "net.py").read_text() == USES_BLOCK


@pytest.mark.parametrize("flags", [["--fix"], ["--unsafe-fixes"], ["--diff"], ["--statistics"]])
def test_add_ignore_with_a_flag_that_fixes_or_counts_is_a_usage_error(tmp_path, flags):
    shutil.copy(SICK / "mlp.py", tmp_path / "mlp.py")
    result = invoke("check", "mlp.py:MLP", "--add-ignore", *flags, cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stderr.startswith("netdoctor: error: --add-ignore")
    assert len(result.stderr.splitlines()) == 1
    assert (tmp_path / "mlp.py").read_text() == (SICK / "mlp.py").read_text()


# ------------------------------------------------------------------ --statistics

STATS_TARGETS = (
    "fixtures/sick/bias_before_bn.py",
    "fixtures/sick/bn_momentum.py",
    "fixtures/sick/mlp.py",
)


def test_statistics_counts_per_rule_most_frequent_first():
    result = invoke("check", *STATS_TARGETS, "--statistics")
    assert result.exit_code == 0
    assert result.stdout == (
        "  3  ND109  bias-before-norm\n  2  ND203  batchnorm-momentum\n  1  ND201  init-scale\n"
    )


def test_statistics_as_json_and_its_exit_code():
    result = invoke(
        "check", *STATS_TARGETS, "--statistics", "--format", "json", "--fail-on", "warning"
    )
    assert result.exit_code == 1  # the gate still applies
    assert json.loads(result.stdout) == [
        {"count": 3, "rule": "ND109", "name": "bias-before-norm", "severity": "info"},
        {"count": 2, "rule": "ND203", "name": "batchnorm-momentum", "severity": "warning"},
        {"count": 1, "rule": "ND201", "name": "init-scale", "severity": "warning"},
    ]


def test_statistics_in_sarif_is_a_usage_error():
    result = invoke("check", "fixtures/sick/mlp.py", "--statistics", "--format", "sarif")
    assert result.exit_code == 2
    assert result.stderr == "netdoctor: error: --statistics prints text or json, not sarif\n"
