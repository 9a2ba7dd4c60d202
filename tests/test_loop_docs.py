"""Every training-loop rule (ND5xx) has a doc in rules/, and its examples are true: the
Example, a complete training script run under `netdoctor run`, triggers the rule; the Fix does
not, and is a healthy loop (no warning or error at all). The examples of the distributed rules
need two processes: tests/test_distributed.py runs them under torchrun."""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch

from conftest import RULE_DOCS, invoke
from netdoctor import docs
from netdoctor.catalogue import RULES
from netdoctor.rules import REGISTRY

LOOP = sorted(rid for rid, impl in REGISTRY.items() if impl.needs == "loop")
MULTI_PROCESS = {"ND508"}  # examples run under torchrun, in tests/test_distributed.py
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


def test_loop_rules_are_registered():
    assert LOOP == [f"ND50{i}" for i in range(1, 9)]
    assert all(RULES[r].stage == "loop" for r in LOOP)


@pytest.mark.parametrize("rule_id", LOOP)
def test_doc_structure(rule_id):
    text = _doc(rule_id)
    info = RULES[rule_id]
    lines = text.splitlines()
    assert lines[0] == f"# {rule_id} {info.name}"
    header = next(line for line in lines[1:] if line.strip())
    assert header == (
        f"**Severity:** {info.severity.label} · **Stage:** loop (netdoctor run, netdoctor.watch)"
    ), header
    positions = [text.find(f"\n{s}\n") for s in SECTIONS]
    assert all(p >= 0 for p in positions), f"{rule_id}.md lacks a section"
    assert positions == sorted(positions), f"{rule_id}.md: sections out of order"
    refs = text[text.find("\n## References\n") :]
    assert re.search(r"https?://", refs)


@pytest.mark.parametrize("rule_id", LOOP)
def test_doc_options_are_the_ones_the_rule_reads(rule_id):
    source = inspect.getsource(REGISTRY[rule_id].fn)
    read = set(re.findall(rf'ctx\.option\("{rule_id}",\s*"([\w-]+)"', source))
    text = _doc(rule_id)
    options = text[text.find("\n## Options\n") : text.find("\n## References\n")]
    documented = set(re.findall(r"^([a-z][\w-]*)\s*=", options, re.MULTILINE)) - {"severity"}
    assert documented == read, f"{rule_id}: documented {documented}, read {read}"


def _run(tmp_path, code: str, name: str) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    script = folder / "train.py"
    script.write_text(code, encoding="utf-8")
    out = folder / "report.json"
    result = invoke("run", "--format", "json", "-o", out, script, cwd=folder)
    assert out.is_file(), f"no report (exit {result.exit_code}): {result.stderr}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("rule_id", [r for r in LOOP if r not in MULTI_PROCESS])
def test_example_triggers_and_fix_does_not(rule_id, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ex = docs.examples(_doc(rule_id))
        assert "bad" in ex and "good" in ex
        bad = _run(tmp_path, ex["bad"], "bad")
        rules = [f["rule"] for f in bad["findings"]]
        assert rule_id in rules, f"{rule_id}'s Example does not trigger it: {rules}"
        good = _run(tmp_path, ex["good"], "good")
        loud = [
            (f["rule"], f["message"])
            for f in good["findings"]
            if f["severity"] in ("warning", "error")
        ]
        assert not loud, f"{rule_id}'s Fix is not a healthy loop: {loud}"
    finally:
        torch.set_num_threads(threads)
