"""Every implemented static rule has a doc in rules/, and the doc's examples are true:
the Example triggers the rule, the Fix does not (and is healthy)."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

from conftest import RULE_DOCS, check_json, findings_of, invoke
from netdoctor import docs
from netdoctor.catalogue import RULES
from netdoctor.rules import REGISTRY

STATIC = sorted(rid for rid, impl in REGISTRY.items() if impl.needs in ("outcome", "graph"))
SECTIONS = [
    "## What it finds",
    "## Why it matters",
    "## Example",
    "## Fix",
    "## Options",
    "## References",
]


def _doc(rule_id: str) -> str:
    path = RULE_DOCS / f"{rule_id}.md"
    assert path.is_file(), f"{rule_id} is implemented but has no doc at rules/{rule_id}.md"
    return path.read_text(encoding="utf-8")


def _input_shape(code: str) -> tuple[int, ...]:
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "INPUT_SHAPE" for t in node.targets
        ):
            shape = ast.literal_eval(node.value)
            assert isinstance(shape, tuple) and all(isinstance(s, int) for s in shape)
            return shape
    raise AssertionError("the example defines no INPUT_SHAPE = (C, H, W)")


def _check_example(tmp_path: Path, code: str, name: str) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    model = folder / "model.py"
    model.write_text(code, encoding="utf-8")
    shape = ",".join(map(str, _input_shape(code)))
    report, _ = check_json(f"{model}:Net", "--input-shape", shape, cwd=folder)
    return report


def test_static_rules_are_registered():
    assert {"ND001", "ND002", "ND101", "ND102", "ND103", "ND104", "ND203"} <= set(STATIC)


@pytest.mark.parametrize("rule_id", STATIC)
def test_doc_structure(rule_id):
    text = _doc(rule_id)
    info = RULES[rule_id]
    lines = text.splitlines()
    assert lines[0] == f"# {rule_id} {info.name}"
    header = next(line for line in lines[1:] if line.strip())
    expected = f"**Severity:** {info.severity.label} · **Stage:** {info.stage}"
    assert header.startswith(expected), header
    positions = [text.find(f"\n{s}\n") for s in SECTIONS]
    missing = [s for s, p in zip(SECTIONS, positions, strict=True) if p < 0]
    assert not missing, f"{rule_id}.md lacks {missing}"
    assert positions == sorted(positions), f"{rule_id}.md: sections out of order"
    for section, start in zip(SECTIONS, positions, strict=True):
        end = text.find("\n## ", start + 1)
        body = text[start + len(section) + 1 : end if end > 0 else len(text)]
        assert body.strip(), f"{rule_id}.md: {section} is empty"
    options = text[text.find("\n## Options\n") : text.find("\n## References\n")]
    assert "severity" in options or options.strip().endswith("None.") or "None." in options
    refs = text[text.find("\n## References\n") :]
    assert re.search(r"https?://", refs), f"{rule_id}.md: References cites nothing with a link"


@pytest.mark.parametrize("rule_id", STATIC)
def test_doc_options_are_the_ones_the_rule_reads(rule_id):
    """Keys documented under Options are the ones the implementation passes to ctx.option."""
    import inspect

    source = inspect.getsource(REGISTRY[rule_id].fn)
    calls = re.findall(r"\.option\(([^)]*)\)", source)
    read = set(re.findall(r'\.option\(\s*(?:"ND\d{3}"|\w+)\s*,\s*"([\w-]+)"', source))
    if len(read) < len(calls):
        pytest.skip(f"{rule_id} reads options in a way this test cannot parse: {calls}")
    text = _doc(rule_id)
    options = text[text.find("\n## Options\n") : text.find("\n## References\n")]
    documented = set(re.findall(r"^([a-z][\w-]*)\s*=", options, re.MULTILINE)) - {"severity"}
    assert documented == read, f"{rule_id}: documented {documented}, read {read}"


@pytest.mark.parametrize("rule_id", STATIC)
def test_example_triggers_and_fix_does_not(rule_id, tmp_path):
    ex = docs.examples(_doc(rule_id))
    assert "bad" in ex and "good" in ex, f"{rule_id}.md needs a python block in Example and Fix"
    for key in ("bad", "good"):
        code = ex[key]
        compile(code, f"{rule_id}-{key}", "exec")
        assert re.search(r"^class Net\(nn\.Module\):", code, re.MULTILINE), (
            f"{rule_id} {key}: no class Net(nn.Module)"
        )

    bad = _check_example(tmp_path, ex["bad"], "bad")
    assert findings_of(bad, rule_id), (
        f"{rule_id}'s Example does not trigger it: {[f['rule'] for f in findings_of(bad)]}"
    )

    good = _check_example(tmp_path, ex["good"], "good")
    assert not findings_of(good, rule_id), f"{rule_id}'s Fix still triggers it"
    loud = [
        (f["rule"], f["message"])
        for f in findings_of(good)
        if f["severity"] in ("warning", "error")
    ]
    assert not loud, f"{rule_id}'s Fix is not a healthy model: {loud}"


def test_explain_prints_the_doc():
    result = invoke("explain", "ND101")
    assert result.exit_code == 0
    assert result.stdout.strip() == _doc("ND101").strip()
    # Rules are also found by name, case-insensitively.
    assert invoke("explain", "deep-plain-stack").stdout == result.stdout
    assert invoke("explain", "nd101").stdout == result.stdout


def test_explain_unknown_rule_is_a_usage_error():
    result = invoke("explain", "ND999")
    assert result.exit_code == 2
    assert result.stderr.startswith("netdoctor: error: unknown rule 'ND999'")


def test_docs_found_in_a_checkout():
    assert docs.docs_dir() == RULE_DOCS
    assert docs.read_doc("ND101") == _doc("ND101")


def test_docs_found_in_an_installed_package(tmp_path, monkeypatch):
    """A wheel ships rules/ as netdoctor/rule_docs (pyproject force-include); docs.py prefers it."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    pyproject = tomllib.loads((RULE_DOCS.parent / "pyproject.toml").read_text(encoding="utf-8"))
    include = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert include.get("rules") == "netdoctor/rule_docs"

    package = tmp_path / "site-packages" / "netdoctor"
    (package / "rule_docs").mkdir(parents=True)
    (package / "rule_docs" / "ND101.md").write_text("# ND101 shipped copy\n", encoding="utf-8")
    monkeypatch.setattr(docs, "__file__", str(package / "docs.py"))
    assert docs.docs_dir() == package / "rule_docs"
    assert docs.read_doc("ND101") == "# ND101 shipped copy\n"
    assert docs.read_doc("ND102") is None
    result = invoke("explain", "ND101")
    assert result.exit_code == 0 and result.stdout.strip() == "# ND101 shipped copy"


def test_examples_helper_reads_first_block_of_each_section():
    text = textwrap.dedent("""\
        # ND999 x

        ## Example
        prose
        ```python
        bad = 1
        ```
        ```python
        ignored = 1
        ```
        ## Fix
        ```python
        good = 1
        ```
        ## Options
        None.
        """)
    assert docs.examples(text) == {"bad": "bad = 1\n", "good": "good = 1\n"}
