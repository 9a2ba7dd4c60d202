"""Healthy mixed precision stays clean: the AMP recipe (fp16 autocast, GradScaler, gradient
accumulation, unscale_ before clipping, a scheduler) and a bf16 autocast loop, under `netdoctor
run` and under `netdoctor.watch`. Each must report no warning or error, train, and end with
the very same weights, losses and scaler state as without netdoctor."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from test_run import bare_run, run_json, tensors
from test_watch import global_state

import netdoctor
from conftest import FIXTURES
from netdoctor.findings import Severity

LOOPS = FIXTURES / "loops"
STEPS = 24


def fp16_on_cpu() -> str | None:
    """Why this torch cannot run the fp16 recipe on the CPU (None: it can)."""
    if not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"):
        return f"torch {torch.__version__} has no torch.amp.GradScaler"
    try:
        scaler = torch.amp.GradScaler("cpu")
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        return f"torch {torch.__version__}: no CPU fp16 autocast or GradScaler('cpu') ({e})"
    if out.dtype != torch.float16 or not scaler.is_enabled():
        return f"torch {torch.__version__}: CPU fp16 autocast or GradScaler('cpu') is inactive"
    return None


def bf16_on_cpu() -> str | None:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
    except (RuntimeError, TypeError) as e:
        return f"torch {torch.__version__}: no CPU bf16 autocast ({e})"
    return None if out.dtype == torch.bfloat16 else "CPU bf16 autocast is inactive"


FIXTURE = {"amp_fp16_healthy": fp16_on_cpu, "amp_bf16_healthy": bf16_on_cpu}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def needs(name: str) -> Path:
    reason = FIXTURE[name]()
    if reason:
        pytest.skip(reason)
    return LOOPS / f"{name}.py"


def loud(findings) -> list[tuple[str, str]]:
    return [(f["rule"], f["message"]) for f in findings if f["severity"] in ("warning", "error")]


def differing(a: dict, b: dict) -> list[str]:
    """The keys whose tensors differ (empty: bit for bit the same)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("name", sorted(FIXTURE))
def test_healthy_amp_loop_is_clean_under_run_and_trains_as_without_netdoctor(name, tmp_path):
    script = needs(name)
    bare_run(script, "--steps", str(STEPS), "--save", str(tmp_path / "bare.pt"))
    report, result = run_json(
        script, "--steps", STEPS, "--save", tmp_path / "watched.pt", tmp_path=tmp_path
    )
    assert result.exit_code == 0, result.stderr
    assert not loud(report["findings"]), loud(report["findings"])
    assert not [n for n in report["notes"] if "internal netdoctor error" in n]
    run = report["measurements"]["run"]
    assert run["steps"] == STEPS and run["optimizers"][0]["steps"] == STEPS
    curve = report["measurements"]["loss_curve"]
    assert len(curve) == STEPS and curve[-1] < 0.8 * curve[0], curve  # it trains
    bare = dict(tensors(torch.load(tmp_path / "bare.pt")))
    watched = dict(tensors(torch.load(tmp_path / "watched.pt")))
    assert differing(bare, watched) == []


def run_fixture(script: Path, watched: bool) -> tuple[dict, list[float], float | None, list]:
    """The fixture's own build() and train() in this process, under netdoctor.watch(model,
    optimizer) when `watched`: (state_dict, losses, final grad scale, loud findings)."""
    mod = runpy.run_path(str(script), run_name="amp_fixture")
    built = mod["build"]("cpu", STEPS)
    model, optimizer = built[0], built[1]
    scaler = built[3] if len(built) == 5 else None
    if not watched:
        losses = mod["train"](*built, steps=STEPS)
        return model.state_dict(), losses, scaler and scaler.get_scale(), []
    with netdoctor.watch(model, optimizer) as doctor:
        losses = mod["train"](*built, steps=STEPS)
    assert doctor.optimizers[0].facts.steps == STEPS
    severe = [(f.rule, f.message) for f in doctor.findings if f.severity >= Severity.WARNING]
    return model.state_dict(), losses, scaler and scaler.get_scale(), severe


@pytest.mark.parametrize("name", sorted(FIXTURE))
def test_healthy_amp_loop_is_clean_under_watch_and_changes_nothing(name):
    script = needs(name)
    before = global_state()
    bare_weights, bare_losses, bare_scale, _ = run_fixture(script, watched=False)
    weights, losses, scale, severe = run_fixture(script, watched=True)
    assert global_state() == before  # every hook and wrapper gone after close()
    assert not severe, severe
    assert losses == bare_losses and scale == bare_scale
    assert differing(bare_weights, weights) == []
    per_step = [sum(losses[i : i + 2]) / 2 for i in range(0, len(losses), 2)]
    assert per_step[-1] < 0.8 * per_step[0], per_step  # it trains
