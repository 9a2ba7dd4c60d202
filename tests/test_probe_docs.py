"""Every runtime rule (ND4xx) has a doc in rules/, and its examples are true: the Example,
probed with the flags of its `# probe:` line, triggers the rule; the Fix (with its own `# probe:`
line, else the Example's) does not, and is healthy."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import RULE_DOCS, invoke
from netdoctor import docs
from netdoctor.catalogue import RULES
from netdoctor.rules import REGISTRY

RUNTIME = sorted(rid for rid, impl in REGISTRY.items() if impl.needs == "runtime")
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


def _flags(code: str) -> list[str] | None:
    m = re.search(r"^# probe: (.+)$", code, re.MULTILINE)
    return shlex.split(m.group(1)) if m else None


def _input_shape(code: str) -> str:
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "INPUT_SHAPE" for t in node.targets
        ):
            return ",".join(map(str, ast.literal_eval(node.value)))
    raise AssertionError("the example defines no INPUT_SHAPE = (C, H, W)")


def _probe(tmp_path: Path, code: str, flags: list[str], name: str) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.py").write_text(code, encoding="utf-8")
    if "--input-shape" not in flags:
        flags = [*flags, "--input-shape", _input_shape(code)]
    result = invoke(
        "probe", f"{folder / 'model.py'}:Net", *flags, "--no-verify", "--format", "json", cwd=folder
    )
    assert result.stdout, f"no report (exit {result.exit_code}): {result.stderr}"
    return json.loads(result.stdout)


def test_runtime_rules_are_registered():
    assert RUNTIME == [f"ND4{i:02d}" for i in range(1, 13)]


@pytest.mark.parametrize("rule_id", RUNTIME)
def test_doc_structure(rule_id):
    text = _doc(rule_id)
    info = RULES[rule_id]
    lines = text.splitlines()
    assert lines[0] == f"# {rule_id} {info.name}"
    header = next(line for line in lines[1:] if line.strip())
    assert header == (
        f"**Severity:** {info.severity.label} · **Stage:** runtime (netdoctor probe)"
    ), header
    positions = [text.find(f"\n{s}\n") for s in SECTIONS]
    assert all(p >= 0 for p in positions), f"{rule_id}.md lacks a section"
    assert positions == sorted(positions), f"{rule_id}.md: sections out of order"
    refs = text[text.find("\n## References\n") :]
    assert re.search(r"https?://", refs)


@pytest.mark.parametrize("rule_id", RUNTIME)
def test_doc_options_are_the_ones_the_rule_reads(rule_id):
    import inspect

    source = inspect.getsource(REGISTRY[rule_id].fn)
    read = set(re.findall(rf'ctx\.option\("{rule_id}",\s*"([\w-]+)"', source))
    text = _doc(rule_id)
    options = text[text.find("\n## Options\n") : text.find("\n## References\n")]
    documented = set(re.findall(r"^([a-z][\w-]*)\s*=", options, re.MULTILINE)) - {"severity"}
    assert documented == read, f"{rule_id}: documented {documented}, read {read}"


@pytest.mark.parametrize("rule_id", RUNTIME)
def test_example_triggers_and_fix_does_not(rule_id, tmp_path):
    ex = docs.examples(_doc(rule_id))
    assert "bad" in ex and "good" in ex
    for key in ("bad", "good"):
        compile(ex[key], f"{rule_id}-{key}", "exec")
        assert re.search(r"^class Net\(nn\.Module\):", ex[key], re.MULTILINE)
    bad_flags = _flags(ex["bad"])
    assert bad_flags and "--data" in bad_flags, f"{rule_id}: the Example has no '# probe:' line"

    bad = _probe(tmp_path, ex["bad"], bad_flags, "bad")
    rules = [f["rule"] for f in bad["findings"]]
    assert rule_id in rules, f"{rule_id}'s Example does not trigger it: {rules}"

    good = _probe(tmp_path, ex["good"], _flags(ex["good"]) or bad_flags, "good")
    loud = [
        (f["rule"], f["message"]) for f in good["findings"] if f["severity"] in ("warning", "error")
    ]
    assert not loud, f"{rule_id}'s Fix is not a healthy model: {loud}"
