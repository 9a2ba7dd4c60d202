"""Every rule's doc (rules/NDxxx.md), parametrized over the registry: it exists, its header
says the rule's name, default severity and stage, its sections come in order, its References
link somewhere, its Options are the rule's own (keys and defaults, read off the rule's Options
dataclass), and its examples are true -- the Example triggers the rule; the Fix does not and is
healthy (no warning or error). Each example runs the way its stage runs:

* meta, graph, params: `netdoctor check model.py:Net --input-shape INPUT_SHAPE` (and
  `--input-dtype INPUT_DTYPE` when the example defines it: "long" for token ids)
* data: the same with `--data model.py:data`
* runtime: `netdoctor probe` with the flags of the example's `# probe:` line (the Fix's, else
  the Example's), `--no-verify`
* loop: `netdoctor run train.py`, in process. A rule whose fixture runs under torchrun (ND508)
  has examples that need two processes: tests/test_distributed.py runs them.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

import snapshot
from conftest import RULE_DOCS, invoke
from netdoctor import docs
from netdoctor.rules.base import Stage
from netdoctor.rules.registry import all_rules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RULES = all_rules()
SECTIONS = [
    "## What it finds",
    "## Why it matters",
    "## Example",
    "## Fix",
    "## Options",
    "## References",
]
# How each stage's header line names the commands that run its rules.
STAGE_COMMANDS = {
    Stage.META: "netdoctor check",
    Stage.GRAPH: "netdoctor check",
    Stage.PARAMS: "netdoctor check",
    Stage.DATA: "netdoctor check --data, netdoctor probe",
    Stage.RUNTIME: "netdoctor probe",
    Stage.LOOP: "netdoctor run, netdoctor.watch",
}
MULTI_PROCESS = {
    rule_id
    for rule_id, rule in RULES.items()
    if rule.fixture is not None and snapshot.target_of(rule.fixture).torchrun
}


def _doc(rule_id: str) -> str:
    path = RULE_DOCS / f"{rule_id}.md"
    assert path.is_file(), f"{rule_id} is implemented but has no doc at rules/{rule_id}.md"
    return path.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    end = text.find("\n## ", start)
    return text[start : end if end > 0 else len(text)]


@pytest.mark.parametrize("rule_id", RULES)
def test_doc_structure(rule_id):
    rule = RULES[rule_id]
    text = _doc(rule_id)
    lines = text.splitlines()
    assert lines[0] == f"# {rule_id} {rule.name}"
    header = next(line for line in lines[1:] if line.strip())
    assert header == (
        f"**Severity:** {rule.severity.label} · **Stage:** {rule.stage} "
        f"({STAGE_COMMANDS[rule.stage]})"
    )
    positions = [text.find(f"\n{s}\n") for s in SECTIONS]
    missing = [s for s, p in zip(SECTIONS, positions) if p < 0]
    assert not missing, f"{rule_id}.md lacks {missing}"
    assert positions == sorted(positions), f"{rule_id}.md: sections out of order"
    for section in SECTIONS:
        assert _section(text, section).strip(), f"{rule_id}.md: {section} is empty"
    references = _section(text, "## References")
    assert re.search(r"https?://", references), f"{rule_id}.md: References cites no link"


@pytest.mark.parametrize("rule_id", RULES)
def test_doc_options_are_the_rules_options_with_their_defaults(rule_id):
    """The TOML block of Options is the rule's table: every key of its Options dataclass with
    its default, plus `severity` with the rule's; a rule with no options may say "None." """
    rule = RULES[rule_id]
    options = _section(_doc(rule_id), "## Options")
    blocks = re.findall(r"```toml\n(.*?)```", options, re.S)
    expected = {**rule.options.keys(), "severity": rule.severity.label}
    if not blocks:
        assert expected == {"severity": rule.severity.label}, f"{rule_id}.md documents no options"
        assert options.strip().startswith("None.")
        assert "severity" in options and f"[tool.netdoctor.rules.{rule_id}]" in options
        return
    assert len(blocks) == 1, f"{rule_id}.md: one TOML block under Options"
    (table,) = tomllib.loads(blocks[0])["tool"]["netdoctor"]["rules"].values()
    assert list(tomllib.loads(blocks[0])["tool"]["netdoctor"]["rules"]) == [rule_id]
    assert table == expected
    # ... and the documented values are what the rule reads when they are configured.
    assert rule.options.parse(table, f"rules/{rule_id}.md") == rule.options()


# -- the examples ---------------------------------------------------------------------------


def _input_shape(code: str) -> str:
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "INPUT_SHAPE" for t in node.targets
        ):
            shape = ast.literal_eval(node.value)
            assert isinstance(shape, tuple) and all(isinstance(s, int) for s in shape)
            return ",".join(map(str, shape))
    raise AssertionError("the example defines no INPUT_SHAPE = (C, H, W)")


def _input_dtype(code: str) -> list[str]:
    """`--input-dtype` for an example that defines INPUT_DTYPE (token ids: "long")."""
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "INPUT_DTYPE" for t in node.targets
        ):
            dtype = ast.literal_eval(node.value)
            assert isinstance(dtype, str)
            return ["--input-dtype", dtype]
    return []


def _probe_flags(code: str) -> list[str] | None:
    m = re.search(r"^# probe: (.+)$", code, re.MULTILINE)
    return shlex.split(m.group(1)) if m else None


def _json(result, out: Path | None = None) -> dict:
    text = out.read_text(encoding="utf-8") if out is not None and out.is_file() else result.stdout
    assert text, f"no report (exit {result.exit_code}): {result.stderr}"
    return json.loads(text)


def _run_example(rule_id: str, code: str, folder: Path, flags: list[str] | None) -> dict:
    """The example's report, run the way its rule's stage runs."""
    stage = RULES[rule_id].stage
    folder.mkdir()
    if stage is Stage.LOOP:
        script = folder / "train.py"
        script.write_text(code, encoding="utf-8")
        out = folder / "report.json"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = invoke("run", "--format", "json", "-o", out, script, cwd=folder)
        finally:
            torch.set_num_threads(threads)
        return _json(result, out)
    assert re.search(r"^class Net\(nn\.Module\):", code, re.MULTILINE), "no class Net(nn.Module)"
    model = folder / "model.py"
    model.write_text(code, encoding="utf-8")
    shape = ["--input-shape", _input_shape(code), *_input_dtype(code)]
    if stage is Stage.RUNTIME:
        assert flags and "--data" in flags, f"{rule_id}: the Example has no '# probe:' line"
        extra = flags if "--input-shape" in flags else [*flags, *shape]
        args = ["probe", f"{model}:Net", *extra, "--no-verify"]
    elif stage is Stage.DATA:
        args = ["check", f"{model}:Net", *shape, "--data", f"{model}:data"]
    else:
        args = ["check", f"{model}:Net", *shape]
    return _json(invoke(*args, "--format", "json", cwd=folder))


@pytest.mark.parametrize("rule_id", [r for r in RULES if r not in MULTI_PROCESS])
def test_example_triggers_the_rule_and_the_fix_does_not(rule_id, tmp_path):
    examples = docs.examples(_doc(rule_id))
    assert "bad" in examples and "good" in examples, (
        f"{rule_id}.md needs a python block in Example and in Fix"
    )
    for key, code in examples.items():
        compile(code, f"{rule_id}-{key}", "exec")
    bad_flags = _probe_flags(examples["bad"])
    good_flags = _probe_flags(examples["good"]) or bad_flags

    bad = _run_example(rule_id, examples["bad"], tmp_path / "bad", bad_flags)
    found = [f["rule"] for f in bad["findings"]]
    assert rule_id in found, f"{rule_id}'s Example does not trigger it: {found}"

    good = _run_example(rule_id, examples["good"], tmp_path / "good", good_flags)
    still = [f["message"] for f in good["findings"] if f["rule"] == rule_id]
    assert not still, f"{rule_id}'s Fix still triggers it: {still}"
    loud = [
        (f["rule"], f["message"]) for f in good["findings"] if f["severity"] in ("warning", "error")
    ]
    assert not loud, f"{rule_id}'s Fix is not healthy: {loud}"
    if RULES[rule_id].stage is Stage.DATA:
        assert good["findings"] == [], f"{rule_id}'s Fix data is not clean: {good['findings']}"
