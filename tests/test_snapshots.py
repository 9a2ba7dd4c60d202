"""Every fixture's report equals its committed snapshot (tests/snapshots; see snapshot.py):
`check` for every model of fixtures/sick and fixtures/healthy, `probe` for the probe fixtures,
`run` for every script of fixtures/loops."""

from __future__ import annotations

import json

import pytest

import snapshot
from conftest import REPO, invoke


def _in_process(target: snapshot.Target, tmp_path) -> dict:
    out = tmp_path / "report.json"
    if target.command == "run":
        args = ["run", "--format", "json", "-o", out, *target.args]
    else:
        args = [target.command, *target.args, "--format", "json", "-o", out]
    result = invoke(*args, cwd=REPO)
    assert out.is_file(), f"no report (exit {result.exit_code}): {result.stderr}"
    return json.loads(out.read_text(encoding="utf-8"))


def _params(targets: list[snapshot.Target], slow: bool) -> list:
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(t, id=t.name, marks=marks) for t in targets]


@pytest.mark.parametrize("target", _params(snapshot.check_targets(), slow=False))
def test_check_report_matches_its_snapshot(target, tmp_path):
    snapshot.assert_matches(target, _in_process(target, tmp_path))


@pytest.mark.parametrize("target", _params(snapshot.probe_targets(), slow=True))
def test_probe_report_matches_its_snapshot(target, tmp_path):
    snapshot.assert_matches(target, _in_process(target, tmp_path))


@pytest.mark.parametrize("target", _params(snapshot.run_targets(), slow=True))
def test_run_report_matches_its_snapshot(target, tmp_path):
    if target.torchrun:
        report, _ = snapshot.produce(target)
    else:
        report = _in_process(target, tmp_path)
    snapshot.assert_matches(target, report)


def test_every_fixture_model_has_a_snapshot():
    """A new fixture gets a snapshot (run `python tests/snapshot.py check`)."""
    discovered = {t.name for t in snapshot.discover_check_targets()}
    committed = {t.name for t in snapshot.check_targets()}
    assert discovered == committed
