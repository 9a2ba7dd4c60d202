"""`--time-budget`: unless --steps is given, the probe measures what a step costs and scales its
steps (and for big models the batch and the extra checks) to end within the budget, saying so.
No test here asserts a wall time (that is benchmarks/probe_budget.py's job)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from conftest import HEALTHY, invoke
from netdoctor.data import DataSpec, open_source
from netdoctor.probe.budget import MIN_BATCH, plan
from netdoctor.probe.engine import ProbeConfig, steps_that_fit

RESNET = f"{HEALTHY / 'resnet.py'}:ResNet"
LENET = f"{HEALTHY / 'lenet_relu.py'}:LeNet"


def probe_json(*args, cwd=None) -> tuple[dict, int]:
    result = invoke("probe", *args, "--format", "json", cwd=cwd)
    assert result.stdout, result.stderr
    return json.loads(result.stdout), result.exit_code


def test_steps_that_fit():
    assert steps_that_fit(1, 1.0, 0.5, 10.0, 100) == 19  # 9 s left at 0.5 s a step
    assert steps_that_fit(2, 1.0, 0.001, 10.0, 100) == 100  # never more than asked
    assert steps_that_fit(2, 12.0, 0.5, 10.0, 100) == 2  # over budget: no more steps


@pytest.mark.slow
def test_a_tight_budget_scales_the_steps_and_says_so():
    report, code = probe_json(RESNET, "--data", "synthetic", "--time-budget", "2", "--no-verify")
    probe = report["measurements"]["probe"]
    assert probe["steps"] < probe["steps_requested"] == 100
    notes = [n for n in report["notes"] if n.startswith("time budget:")]
    assert any(f"{probe['steps']} steps instead of 100" in n for n in notes), report["notes"]
    # a probe cut short cannot say the model does not learn: no loss-trend warning
    assert not [
        f for f in report["findings"] if f["rule"] in ("ND407", "ND409") and f["severity"] != "info"
    ]
    assert code == 0


def test_steps_given_means_no_budget():
    report, _ = probe_json(
        LENET, "--data", "synthetic", "--steps", "5", "--time-budget", "0.001", "--no-verify"
    )
    assert report["measurements"]["probe"]["steps"] == 5
    assert not [n for n in report["notes"] if n.startswith("time budget")]


@pytest.mark.slow
def test_time_budget_from_the_config(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.netdoctor.probe]\ntime-budget = 1\n")
    report, _ = probe_json(RESNET, "--data", "synthetic", "--no-verify", cwd=tmp_path)
    assert report["measurements"]["probe"]["steps"] < 100
    assert any(n.startswith("time budget:") for n in report["notes"])


@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_bad_time_budget_is_one_clear_line(value):
    result = invoke("probe", LENET, "--data", "synthetic", "--time-budget", value)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "time-budget" in lines[0] and "Traceback" not in result.stderr


class _SlowPerSample(nn.Module):
    """A forward that costs 5 ms per sample (and nothing fixed): a stand-in for a big model."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        time.sleep(0.005 * x.shape[0])
        return self.fc(x)


def test_a_model_too_slow_for_the_batch_trains_on_smaller_batches():
    source = open_source(DataSpec("synthetic", input_shape=(8,), batch_size=64))
    config = ProbeConfig(device="cpu")
    # 20 s left: the probe's run gets 35% = 7 s; a step of 64 would take ~3.5 * 0.32 s = 1.1 s,
    # so ten steps do not fit; at 16 samples (~0.28 s a step) they do.
    p = plan(_SlowPerSample(), source, config, time.monotonic() + 20, 20, batch_given=False)
    assert MIN_BATCH <= p.config.batch_limit <= 32
    assert any("trains on the first" in n for n in p.notes)
    given = plan(_SlowPerSample(), source, config, time.monotonic() + 20, 20, batch_given=True)
    assert given.config.batch_limit is None  # --batch-size was given: kept
    roomy = plan(
        _SlowPerSample(), source, config, time.monotonic() + 10_000, 10_000, batch_given=False
    )
    assert roomy.config == config and not roomy.notes  # everything fits: nothing changes


def test_batch_limit_feeds_the_first_samples_of_each_batch():
    from netdoctor.probe.engine import run_probe

    source = open_source(DataSpec("synthetic", input_shape=(8,), batch_size=64))
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            seen.append(x.shape[0])
            return self.fc(x)

    run = run_probe(
        Recorder(),
        source,
        ProbeConfig(steps=3, batch_limit=4, overfit_steps=0, device="cpu"),
        instrument=False,
    )
    assert run.steps_run == 3 and seen == [4, 4, 4]
    assert torch.get_num_threads() >= 1
