"""ND605 (fp16-headroom) inside the user's own training: the watcher's deep steps measure each
module's max |output| when the user's forward runs under float16 autocast, with the same
recorder as the probe (`measure.activations`)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import invoke

if not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"):  # pragma: no cover
    pytest.skip("torch.amp.GradScaler (torch >= 2.3) is needed", allow_module_level=True)

LOOP = """\
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
x = torch.randint(0, 65536, (512, 16)).float() / SCALE
y = x[:, :4].argmax(dim=1)
model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
scaler = torch.amp.GradScaler("cpu")
for step in range(12):
    idx = torch.randint(0, 512, (64,))
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x[idx]).float(), y[idx])
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
"""


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(tmp_path, scale: str) -> dict:
    script = tmp_path / "train.py"
    script.write_text(LOOP.replace("SCALE", scale), encoding="utf-8")
    out = tmp_path / "report.json"
    result = invoke("run", "--format", "json", "-o", out, script, cwd=tmp_path)
    assert out.is_file(), f"no report (exit {result.exit_code}): {result.stderr}"
    return json.loads(out.read_text(encoding="utf-8"))


def test_raw_16_bit_readings_overflow_the_first_linear(tmp_path):
    report = _run(tmp_path, "1.0")
    (f,) = [f for f in report["findings"] if f["rule"] == "ND605"]
    assert f["severity"] == "error" and f["module"] == "0"
    assert f["location"]["line"] == 8  # the line that builds the Sequential
    assert f["evidence"]["precision"] == "fp16" and f["evidence"]["modules"] == ["0"]
    assert "h = self[0](h.float())" in f["fix"]["patch"]


def test_scaled_readings_leave_headroom(tmp_path):
    report = _run(tmp_path, "65535.0")
    assert not [f for f in report["findings"] if f["rule"] == "ND605"]
