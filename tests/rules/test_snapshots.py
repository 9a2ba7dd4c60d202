"""Every fixture's report equals its committed snapshot (tests/snapshots; see snapshot.py).

* Each rule's `fixture` reports the rule, and its `healthy` counterpart does not and has no
  warning or error (the rule units name both: `netdoctor.rules.base.Fixture`).
* Every other fixture no rule names -- the remaining models of fixtures/sick and
  fixtures/healthy, probe fixtures and loop scripts -- is compared too; a report is made once.
* Every fixture model has a snapshot, and every snapshot belongs to a fixture.

Probe and run reports take seconds each: those tests are marked slow.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

import snapshot
from conftest import FIXTURES, REPO, invoke
from netdoctor.rules.registry import all_rules

RULES = snapshot.rule_targets()
LOUD = ("warning", "error")

_reports: dict[snapshot.Target, dict] = {}


def report_of(target: snapshot.Target) -> dict:
    """The target's JSON report, made once per session (a healthy model several rules name)."""
    if target not in _reports:
        if target.torchrun:
            _reports[target], _ = snapshot.produce(target)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "report.json"
                if target.command == "run":
                    args = ["run", "--format", "json", "-o", out, *target.args]
                else:
                    args = [target.command, *target.args, "--format", "json", "-o", out]
                result = _one_thread(lambda: invoke(*args, cwd=REPO))
                assert out.is_file(), f"no report (exit {result.exit_code}): {result.stderr}"
                _reports[target] = json.loads(out.read_text(encoding="utf-8"))
    return _reports[target]


def _one_thread(call):
    """Reports are recorded with torch on one thread (as under xdist, OMP_NUM_THREADS=1): float
    sums over several threads round differently, and the snapshots keep 6 digits."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return call()
    finally:
        torch.set_num_threads(threads)


def matching(target: snapshot.Target) -> dict:
    report = report_of(target)
    snapshot.assert_matches(target, report)
    return report


def _marks(*targets: snapshot.Target) -> list:
    return [pytest.mark.slow] if any(t.command != "check" for t in targets) else []


def _rule_params(side: int) -> list:
    return [
        pytest.param(rule_id, pair[side], id=rule_id, marks=_marks(pair[side]))
        for rule_id, pair in RULES.items()
    ]


@pytest.mark.parametrize("rule_id, target", _rule_params(0))
def test_the_rules_fixture_shows_it(rule_id, target):
    report = matching(target)
    found = [f["rule"] for f in report["findings"]]
    assert rule_id in found, f"{target.command} {' '.join(target.args)}: {found}"


@pytest.mark.parametrize("rule_id, target", _rule_params(1))
def test_the_rules_healthy_counterpart_does_not(rule_id, target):
    report = matching(target)
    assert not [f for f in report["findings"] if f["rule"] == rule_id]
    loud = [(f["rule"], f["message"]) for f in report["findings"] if f["severity"] in LOUD]
    assert not loud, f"{target.command} {' '.join(target.args)} is not healthy: {loud}"


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(t, id=f"{t.command}/{t.name}", marks=_marks(t))
        for t in snapshot.other_targets()
    ],
)
def test_every_other_fixture_matches_its_snapshot(target):
    report = matching(target)
    if target.args[0].startswith("fixtures/healthy/"):
        loud = [(f["rule"], f["message"]) for f in report["findings"] if f["severity"] in LOUD]
        assert not loud, f"{target.args[0]} is not healthy: {loud}"


def test_every_rule_names_a_fixture_and_a_healthy_counterpart():
    assert set(RULES) == set(all_rules())
    for rule_id, rule in all_rules().items():
        for fixture in (rule.fixture, rule.healthy):
            assert fixture.command in ("check", "probe", "run"), rule_id
            target = fixture.args[0].partition(":")[0]
            assert (REPO / target).is_file(), f"{rule_id}: no such fixture {target}"
            assert target.startswith("fixtures/"), rule_id


def test_every_fixture_model_has_a_snapshot():
    """A new fixture gets a snapshot (run `python tests/snapshot.py NAME`)."""
    discovered = {t.name for t in snapshot.discover_check_targets()}
    committed = {t.name for t in snapshot.check_targets()}
    assert discovered == committed
    # The data fixtures run with their data: each is some rule's fixture or healthy data.
    named = {t.args[0].partition(":")[0] for pair in RULES.values() for t in pair}
    data = {f"fixtures/data/{p.name}" for p in (FIXTURES / "data").glob("*.py")}
    assert data <= named, data - named


def test_every_snapshot_belongs_to_a_fixture():
    """No stale snapshot: each file is the report of a target that runs."""
    expected = {t.path for t in snapshot.all_targets()}
    stale = sorted(
        str(p.relative_to(REPO)) for p in snapshot.SNAPSHOTS.glob("*/*.json") if p not in expected
    )
    assert not stale
