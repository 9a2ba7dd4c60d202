"""`netdoctor probe --precision fp16|bf16` on the CPU: autocast around forward and loss, a
GradScaler for fp16, each module's float16 headroom, and ND605 (fp16-headroom) with its
verified fix. An fp32 probe reads as it did before the option existed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import HEALTHY, REPO, SICK, invoke, run_cli
from netdoctor.measure.record import ModuleHeadroom, NonFinite, TrainingRun
from netdoctor.probe.config import ProbeConfig

if not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"):  # pragma: no cover
    pytest.skip("torch.amp.GradScaler (torch >= 2.3) is needed", allow_module_level=True)

SENSOR = f"{SICK / 'fp16_overflow.py'}:SensorNet"
READINGS = f"{SICK / 'fp16_overflow.py'}:readings"
HEALTHY_MLP = f"{HEALTHY / 'mlp_normalized.py'}:MLP"

# logits times 1000: the loss is finite, but its float16 gradients scaled by the GradScaler's
# first scale (65536) overflow, so the scaler skips steps while it calibrates
LOUD_LOGITS = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) * 1000.0
"""


def _probe_json(tmp_path, *args):
    out = tmp_path / "report.json"
    result = invoke("probe", *args, "--format", "json", "-o", out)
    assert out.is_file(), f"no report (exit {result.exit_code}): {result.stderr}"
    return json.loads(out.read_text(encoding="utf-8")), result


def test_bf16_probe_names_its_precision_and_shows_headroom(tmp_path):
    report, result = _probe_json(
        tmp_path, HEALTHY_MLP, "--data", "synthetic", "--precision", "bf16", "--steps", "12",
        "--no-verify", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0
    probe = report["measurements"]["probe"]
    assert probe["precision"] == "bf16"
    assert any("bfloat16 autocast" in n for n in report["notes"])
    rows = report["measurements"]["headroom"]
    assert rows and all(r["dtype"] in ("bfloat16", "float32") for r in rows)
    linear = [r for r in rows if r["module_type"] == "Linear"]
    assert {r["dtype"] for r in linear} == {"bfloat16"}  # autocast ran the matmuls in bf16
    assert all(r["fp16_headroom"] > 100 for r in rows)  # a normalized MLP is far from 65504
    headrooms = [r["fp16_headroom"] for r in rows]
    assert headrooms == sorted(headrooms)
    assert not [f for f in report["findings"] if f["rule"] == "ND605"]


def test_fp16_text_report_names_the_overflowing_module_and_its_line():
    result = invoke(
        "probe", SENSOR, "--data", READINGS, "--precision", "fp16", "--steps", "20",
        "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 1, result.stderr
    text = result.stdout
    assert "float16 autocast with a GradScaler" in text
    assert "ND605 fp16-headroom [error] fixtures/sick/fp16_overflow.py:15 (proj)" in text
    assert "ND401 non-finite [error] fixtures/sick/fp16_overflow.py:15 (proj)" in text
    table = text[text.index("Float16 headroom") :].splitlines()
    assert "proj (Linear)" in table[2] and "overflowed" in table[2]
    assert "fixtures/sick/fp16_overflow.py:15" in table[2]
    assert "5 module(s) after it were non-finite too" in table[3]
    assert "Verified fix: proj kept in float32 under autocast" in text


def test_fp16_overflow_is_localized_to_the_producer(tmp_path):
    report, _ = _probe_json(
        tmp_path, SENSOR, "--data", READINGS, "--precision", "fp16", "--steps", "20",
        "--no-verify", "--device", "cpu",
    )  # fmt: skip
    by_rule = {f["rule"]: f for f in report["findings"]}
    assert by_rule["ND605"]["severity"] == "error"
    assert by_rule["ND605"]["module"] == "proj"
    assert by_rule["ND605"]["evidence"]["modules"] == ["proj"]  # not the modules after it
    assert by_rule["ND401"]["module"] == "proj"  # the replay ran under the same autocast
    assert report["measurements"]["non_finite"]["step"] == 1


def test_the_same_model_trains_in_fp32_and_bf16_without_nd605_warning(tmp_path):
    for precision in ("fp32", "bf16"):
        report, _ = _probe_json(
            tmp_path, SENSOR, "--data", READINGS, "--precision", precision, "--steps", "20",
            "--no-verify", "--device", "cpu",
        )  # fmt: skip
        assert report["measurements"]["probe"]["stopped"] is None
        nd605 = [f for f in report["findings"] if f["rule"] == "ND605"]
        if precision == "fp32":
            assert "precision" not in report["measurements"]["probe"]
            assert "headroom" not in report["measurements"]
            assert not nd605
        else:  # bf16 is fine; moved to float16 it would overflow: said as info
            assert [f["severity"] for f in nd605] == ["info"]
            assert nd605[0]["module"] == "proj"
            assert nd605[0]["evidence"]["max_abs"] > 65504


def test_gradscaler_skips_are_calibration_not_a_stop(tmp_path):
    model = tmp_path / "loud.py"
    model.write_text(LOUD_LOGITS, encoding="utf-8")
    report, _ = _probe_json(
        tmp_path, f"{model}:Net", "--data", "synthetic", "--input-shape", "8",
        "--precision", "fp16", "--steps", "12", "--no-verify", "--device", "cpu",
    )  # fmt: skip
    probe = report["measurements"]["probe"]
    assert probe["stopped"] is None and probe["steps"] == 12
    skipped = probe["skipped_steps"]
    assert skipped[0] == 1 and len(skipped) < 12  # skipped while its scale came down
    assert all(math.isfinite(v) for v in report["measurements"]["loss_curve"])
    assert any(
        n.startswith(f"the GradScaler skipped {len(skipped)} of 12") for n in report["notes"]
    )
    assert not [f for f in report["findings"] if f["rule"] == "ND401"]


def test_bad_precision_is_one_clear_error():
    result = run_cli("probe", HEALTHY_MLP, "--data", "synthetic", "--precision", "fp8")
    assert result.returncode == 2
    assert "'fp8' is not one of 'fp32', 'fp16', 'bf16'" in result.stderr
    assert "Traceback" not in result.stderr


def test_precision_from_the_config(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.netdoctor.probe]\nprecision = "bf16"\n', encoding="utf-8"
    )
    out = tmp_path / "r.json"
    args = [HEALTHY_MLP, "--data", "synthetic", "--steps", "4", "--no-verify", "--device", "cpu"]
    result = invoke("probe", *args, "--format", "json", "-o", out, cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text())["measurements"]["probe"]["precision"] == "bf16"
    (tmp_path / "pyproject.toml").write_text(
        '[tool.netdoctor.probe]\nprecision = "fp8"\n', encoding="utf-8"
    )
    result = invoke("probe", *args, cwd=tmp_path)
    assert result.exit_code == 2
    assert "unknown precision 'fp8' (use fp32, fp16, bf16)" in result.stderr


# -- the rule on measured runs ---------------------------------------------------------------


def _run(precision: str, *rows: ModuleHeadroom) -> TrainingRun:
    run = TrainingRun(config=ProbeConfig(precision=precision), device="cpu")
    run.precision = precision
    run.headroom = list(rows)
    run.module_types = {r.module: "Linear" for r in rows}
    return run


def _nd605(run: TrainingRun, **options):
    from netdoctor.rules.contexts import RuntimeContext
    from netdoctor.rules.runtime.nd605_fp16_headroom import RULE, Options

    return list(RULE.check(RuntimeContext("m.py:Net", run), Options(**options)))


def test_nd605_thresholds():
    near = ModuleHeadroom("fc1", "float16", 9000.0, steps=10)
    far = ModuleHeadroom("fc2", "float16", 8000.0, steps=10)
    (f,) = _nd605(_run("fp16", far, near))
    assert f.module == "fc1" and f.severity.label == "warning"
    assert f.evidence["fp16_headroom"] == pytest.approx(65504 / 9000)
    assert "7.28x below 65504" in f.message
    assert [g.module for g in _nd605(_run("fp16", far, near), factor=16.0)] == ["fc1", "fc2"]
    assert _nd605(_run("fp16", far, near), factor=4.0) == []
    assert _nd605(_run("fp32", far, near)) == []  # nothing ran in float16
    (info,) = _nd605(_run("bf16", far, near))
    assert info.severity.label == "info" and "do not move this model to float16" in info.message


def test_nd605_blames_the_producer_of_an_overflow():
    rows = [
        ModuleHeadroom("fc1", "float16", 100.0),
        ModuleHeadroom("fc2", "float16", math.inf, first_overflow=3),
        ModuleHeadroom("fc3", "float16", math.inf, first_overflow=3),
    ]
    (f,) = _nd605(_run("fp16", *rows))
    assert f.module == "fc2" and f.severity.label == "error" and "at step 3" in f.message
    run = _run("fp16", *rows)
    run.nonfinite = NonFinite(3, "forward", module="fc3")  # ND401's replay named fc3
    (f,) = _nd605(run)
    assert f.module == "fc3"


def test_kept_in_float32_under_autocast_and_copyable():
    import copy

    from netdoctor.probe.amp import keep_float32

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    keep_float32(["0"])(net)
    twin = copy.deepcopy(net)
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = twin[0](x)
        out = twin(x)
    assert hidden.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert type(twin[0]).__name__ == "Linear" and isinstance(twin[0], nn.Linear)
    assert [n for n, _ in twin.named_modules()] == ["", "0", "1"]
    assert twin[0].weight is not net[0].weight


def test_fp32_probe_snapshot_has_no_precision():
    """The committed fp32 probe reports carry no precision or headroom: unchanged."""
    for path in (REPO / "tests" / "snapshots" / "probe").glob("*.json"):
        report = json.loads(path.read_text(encoding="utf-8"))
        m = report.get("measurements") or {}
        fp32 = "--precision" not in json.dumps(report.get("notes", [])) and not any(
            "autocast" in n for n in report.get("notes", [])
        )
        if fp32:
            assert "precision" not in m.get("probe", {}), path.name
            assert "headroom" not in m, path.name


def test_recorder_takes_max_abs_only_under_autocast():
    from netdoctor.measure.activations import ActivationRecorder

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(5, 4) * 100
    rec = ActivationRecorder(net)
    with rec.attached():
        with rec.forward():
            net(x)
        rec.flush_step()
        assert rec.headroom() == [] and rec.precision == "fp32"
        with torch.autocast("cpu", dtype=torch.bfloat16), rec.forward():
            out = net(x)
        rec.flush_step()
    rows = {h.module: h for h in rec.headroom()}
    assert list(rows) == ["0", "1", "2"]  # innermost producers; not the Sequential itself
    assert rec.precision == "bf16"
    assert rows["2"].amax == pytest.approx(float(out.abs().max()))
    assert rows["0"].dtype == "bfloat16" and rows["0"].steps == 1
