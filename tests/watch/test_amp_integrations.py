"""The trainer callbacks on mixed precision: a Lightning fit in `precision="16-mixed"` /
`"bf16-mixed"` and a Hugging Face Trainer with `fp16=True` / `bf16=True`, each with gradient
accumulation, clipping and a schedule (fixtures/loops/amp_lightning_healthy.py,
amp_hf_trainer_healthy.py, run in this process as `python script.py` would).

Each healthy fit must be clean and end with the very same weights as without the callback. On
the CPU, Lightning's fp16 needs its precision plugin named with a GradScaler("cpu") (the
fixture does so), and accelerate runs `fp16=True` in float32: the fixtures print what ran, and
benchmarks/gpu_check.sh runs both on a GPU."""

from __future__ import annotations

import json

import pytest
from test_amp_healthy import bf16_on_cpu, fp16_on_cpu
from test_integrations import (
    LOOPS,
    loud,
    needs_lightning,
    needs_transformers,
    one_thread,  # noqa: F401 (the autouse fixture)
    run_script,
    same_weights,
)
from test_watch import global_state


def fit_twice(script, tmp_path, *args) -> dict:
    """The script without the callback, then with it: its JSON report (weights compared)."""
    before = global_state()
    run_script(script, *args, "--no-doctor", "--save", tmp_path / "bare.pt")
    run_script(
        script, *args, "--report", tmp_path / "report.json", "--save", tmp_path / "watched.pt"
    )
    assert global_state() == before  # every hook and wrapper gone after the fit
    assert same_weights(tmp_path / "bare.pt", tmp_path / "watched.pt") == []
    report = json.loads((tmp_path / "report.json").read_text())
    assert not loud(report), loud(report)
    assert not [n for n in report["notes"] if "internal netdoctor error" in n]
    return report


@needs_lightning
@pytest.mark.parametrize(
    "precision, ran", [("16-mixed", "precision 16-mixed"), ("bf16-mixed", "precision bf16-mixed")]
)
def test_lightning_mixed_precision_fit_is_clean_and_trains_as_without_netdoctor(
    precision, ran, tmp_path, capsys
):
    reason = (fp16_on_cpu if precision == "16-mixed" else bf16_on_cpu)()
    if reason:
        pytest.skip(reason)
    script = LOOPS / "amp_lightning_healthy.py"
    report = fit_twice(script, tmp_path, "--precision", precision, "--steps", 12)
    out = capsys.readouterr().out
    assert out.count(ran) == 2, out  # the precision ran as asked, in both fits
    if precision == "16-mixed":
        assert "grad scale None" not in out  # with a GradScaler
    run = report["measurements"]["run"]
    assert run["steps"] == 12 and run["optimizers"][0]["class"] == "AdamW"
    assert [m["label"] for m in run["models"]] == ["Classifier"]
    curve = report["measurements"]["loss_curve"]
    assert len(curve) == 12 and curve[-1] < curve[0], curve


@needs_transformers
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_hf_trainer_mixed_precision_is_clean_and_trains_as_without_netdoctor(
    precision, tmp_path, capsys
):
    if precision == "bf16" and bf16_on_cpu():
        pytest.skip(bf16_on_cpu())
    script = LOOPS / "amp_hf_trainer_healthy.py"
    report = fit_twice(script, tmp_path, "--precision", precision, "--steps", 6)
    out = capsys.readouterr().out
    assert out.count(f"{precision}=True on cpu: mixed_precision {precision}") == 2, out
    if precision == "bf16":
        assert "autocast True" in out  # accelerate autocasts bf16 on the CPU
    run = report["measurements"]["run"]
    assert run["steps"] == 6 and run["optimizers"][0]["class"] == "AdamW"
    assert run["models"][0]["label"] == "BertForSequenceClassification"
    assert len(report["measurements"]["loss_curve"]) == 6
