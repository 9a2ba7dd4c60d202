"""The AMP failures found inside the user's loop (ND601-ND604), through `netdoctor.watch` in
process: each sick loop's rule with its cause and the user's line, the fixes as patches against
the user's file, and the scaler's own record (skips, scale, unscale_ calls). The CLI reports of
the fixtures are the snapshots (tests/rules/test_snapshots.py)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_amp_healthy import fp16_on_cpu
from test_watch import global_state
from torch import nn

import netdoctor
from conftest import FIXTURES

LOOPS = FIXTURES / "loops"

pytestmark = pytest.mark.skipif(fp16_on_cpu() is not None, reason=str(fp16_on_cpu()))


def watched(script: str, *args: str) -> netdoctor.Doctor:
    """Run a loop fixture under `netdoctor.watch()` (models and optimizers discovered)."""
    argv = sys.argv
    sys.argv = [script, *args]
    doctor = netdoctor.watch()
    try:
        runpy.run_path(str(LOOPS / script), run_name="__main__")
    finally:
        sys.argv = argv
        doctor.close()
    return doctor


def only(doctor, rule: str):
    found = [f for f in doctor.findings if f.rule == rule]
    assert len(found) == 1, [f.rule for f in doctor.findings]
    return found[0]


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_nan_every_step_under_the_scaler_names_the_overflowing_module():
    doctor = watched("amp_overflow.py", "--steps", "16")
    skipped = only(doctor, "ND601")
    assert skipped.severity.name == "ERROR"
    assert skipped.evidence["skipped"] == skipped.evidence["steps"] == 16
    assert skipped.evidence["overflow_module"] == "0"
    assert "forward overflows float16" in skipped.message
    (scaler,) = doctor.facts.scalers
    assert scaler.scale[0] == 32768.0 and scaler.scale[-1] == 65536.0 / 2**16  # halved each skip
    nonfinite = only(doctor, "ND401")
    assert nonfinite.module == "0" and "65504" in nonfinite.message  # (its line: under run)


def test_clipping_before_unscale_is_found_at_the_clip_with_a_patch():
    path = LOOPS / "amp_clip_scaled.py"
    doctor = watched("amp_clip_scaled.py", "--steps", "8")
    clip = only(doctor, "ND602")
    assert clip.location.line == line_of(path, "    torch.nn.utils.clip_grad_norm_(")
    scale, seen = clip.evidence["scale"], clip.evidence["seen_norm"]
    assert scale == 65536.0 and 1e3 < seen < 1e6  # the true norm times the scale
    assert clip.fix.kind == "diff"
    assert "+    scaler.unscale_(optimizer)\n     torch.nn.utils.clip_grad_norm_(" in clip.fix.patch


def test_unscale_before_clip_is_healthy():
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with netdoctor.watch(model, opt) as doctor:
        for i in range(8):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32])
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
    (facts,) = doctor.facts.scalers
    assert facts.clips == 8 and facts.scaled_clips == 0 and facts.unscale_calls == 8
    assert not [f for f in doctor.findings if f.rule.startswith("ND6")]


def test_backward_on_the_plain_loss_is_found_with_a_patch():
    path = LOOPS / "amp_backward_unscaled.py"
    doctor = watched("amp_backward_unscaled.py", "--steps", "8")
    plain = only(doctor, "ND603")
    assert plain.location.line == line_of(path, "    loss.backward()")
    assert "-    loss.backward()\n+    scaler.scale(loss).backward()" in plain.fix.patch
    assert doctor.facts.scalers[0].skipped == []  # nothing looks wrong to the scaler


def test_gradient_overflow_with_a_finite_loss():
    """A summed loss times 1e4: finite, but its gradients overflow float16 once scaled; the
    scaler skips step after step and its scale collapses."""
    torch.manual_seed(0)
    x, y = torch.randn(512, 8), torch.randint(0, 3, (512,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler("cpu")
    with netdoctor.watch(model, opt) as doctor:
        for _ in range(30):
            idx = torch.randint(0, 512, (64,))
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x[idx]), y[idx], reduction="sum") * 1e4
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    skipped = only(doctor, "ND601")
    assert skipped.evidence["nonfinite_losses"] == 0
    assert "gradients overflow" in skipped.message
    assert skipped.evidence["min_scale"] < 1


def test_a_few_calibration_skips_are_normal():
    """A scale that starts far too high skips its first steps, then trains: no finding."""
    torch.manual_seed(0)
    x, y = torch.randn(512, 8), torch.randint(0, 3, (512,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
    with netdoctor.watch(model, opt) as doctor:
        for _ in range(40):
            idx = torch.randint(0, 512, (64,))
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x[idx]), y[idx])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    (facts,) = doctor.facts.scalers
    assert 3 <= len(facts.skipped) <= 20 and max(facts.skipped) <= 20
    assert not [f for f in doctor.findings if f.rule == "ND601"]


def test_bfloat16_weights_and_half_adam():
    bf16 = only(watched("amp_bf16_weights.py", "--steps", "12"), "ND604")
    assert bf16.evidence["dtype"] == "bfloat16" and bf16.evidence["unchanged_share"] > 0.5
    half = only(watched("amp_half_adam.py", "--steps", "4"), "ND604")
    assert half.severity.name == "ERROR" and half.evidence["eps"] == 1e-8


def test_float32_weights_under_autocast_are_not_low_precision():
    model = nn.Linear(8, 3)
    opt = torch.optim.Adam(model.parameters())
    with netdoctor.watch(model, opt) as doctor:
        for _ in range(4):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(torch.randn(16, 8))
            F.cross_entropy(out.float(), torch.randint(0, 3, (16,))).backward()
            opt.step()
    assert doctor.facts.precision == []


def test_no_wrapper_outlives_the_doctor():
    before = global_state()
    watched("amp_clip_scaled.py", "--steps", "2")
    assert global_state() == before
