"""No trace on the user's objects: a model pickled, deep-copied, compiled and saved whole with
`torch.save(model)` in the middle of a deep-measured step window, under `netdoctor run` and
under `netdoctor.watch`, trains exactly as without netdoctor, and the saved file loads where
netdoctor cannot be imported. The model is an LSTM (`nn.RNNBase` pickles through its own
`__getstate__`, not Module's) trained by hand, as pytorch/examples' word_language_model does."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_run import bare_run, run_json
from test_watch import global_state

import netdoctor
from conftest import FIXTURES

SCRIPT = FIXTURES / "loops" / "manual_lstm.py"
ARGS = ("--epochs", "2", "--batches", "6", "--copies")


def same_weights(a: Path, b: Path, monkeypatch) -> None:
    """The two saved models have equal weights (the class is the script's `__main__` one)."""
    argv = sys.argv
    sys.argv = [str(SCRIPT), "--epochs", "0"]
    try:
        cls = runpy.run_path(str(SCRIPT), run_name="fixture")["LanguageModel"]
    finally:
        sys.argv = argv
    monkeypatch.setattr(sys.modules["__main__"], "LanguageModel", cls, raising=False)
    left = torch.load(a, weights_only=False).state_dict()
    right = torch.load(b, weights_only=False).state_dict()
    assert left.keys() == right.keys()
    for k in left:
        assert torch.equal(left[k], right[k]), k


def loads_without_netdoctor(path: Path) -> None:
    """Unpickle the whole model in a fresh interpreter where `import netdoctor` fails."""
    code = (
        "import sys; sys.modules['netdoctor'] = None\n"
        "import runpy, torch\n"
        f"sys.argv = ['x', '--epochs', '0']; g = runpy.run_path({str(SCRIPT)!r}, run_name='m')\n"
        "import __main__; __main__.LanguageModel = g['LanguageModel']\n"
        f"m = torch.load({str(path)!r}, weights_only=False)\n"
        "assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())\n"
        "print(type(m).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "LanguageModel"


@pytest.mark.slow
def test_run_leaves_no_trace_on_a_model_saved_copied_and_compiled_mid_window(tmp_path, monkeypatch):
    bare_run(SCRIPT, *ARGS, "--save", str(tmp_path / "bare.pt"))
    report, result = run_json(SCRIPT, *ARGS, "--save", tmp_path / "run.pt", tmp_path=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert not [f for f in report["findings"] if f["severity"] in ("warning", "error")]
    same_weights(tmp_path / "bare.pt", tmp_path / "run.pt", monkeypatch)
    loads_without_netdoctor(tmp_path / "run.pt")


@pytest.mark.slow
def test_watch_leaves_no_trace_on_a_model_saved_copied_and_compiled_mid_window(
    tmp_path, monkeypatch
):
    bare_run(SCRIPT, *ARGS, "--save", str(tmp_path / "bare.pt"))
    before = global_state()
    with netdoctor.watch():
        bare_run(SCRIPT, *ARGS, "--save", str(tmp_path / "watched.pt"))
    assert global_state() == before
    same_weights(tmp_path / "bare.pt", tmp_path / "watched.pt", monkeypatch)
    loads_without_netdoctor(tmp_path / "watched.pt")


WARNS = """
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(16, 32), nn.Dropout2d(0.25), nn.Linear(32, 4)
    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(x))))  # Dropout2d on 2-D input: it warns
model = Net()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
for i in range(8):
    opt.zero_grad()
    F.cross_entropy(model(x[i * 32:(i + 1) * 32]), y[i * 32:(i + 1) * 32]).backward()
    opt.step()
"""


def test_a_warning_in_a_measured_forward_is_shown_as_without_netdoctor(tmp_path):
    """torch's warnings point at their caller (stacklevel); inside netdoctor's measuring mode
    that caller was netdoctor's own line. Same place, same count as the plain script."""
    script = tmp_path / "warns.py"
    script.write_text(WARNS)

    def warnings_of(*cmd: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, *cmd], capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return [line for line in done.stderr.splitlines() if "Warning:" in line]

    plain = warnings_of(str(script))
    watched = warnings_of("-m", "netdoctor", "run", str(script))
    assert len(plain) == 1 and "dropout" in plain[0]
    assert watched == plain
