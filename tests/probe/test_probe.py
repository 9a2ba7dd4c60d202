"""`netdoctor probe`: the acceptance scenarios of the runtime probe (issue 3), on small
FashionMNIST-layout data written by datagen (class k = a bright 7x7 block at its own place).

Each scenario runs once per module (cached) and several tests read its JSON report. Steps are
kept small where the behaviour shows early; the seed scenario runs the default 100 steps.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from conftest import HEALTHY, SICK, invoke, line_of, run_cli
from datagen import write_idx_dataset, write_npz

MLP = f"{SICK / 'mlp.py'}:MLP"
LENET_SIGMOID = f"{SICK / 'lenet_sigmoid.py'}:LeNet"
SIGMOID_MLP = f"{SICK / 'sigmoid_mlp.py'}:SigmoidMLP"
ZERO_HIDDEN = f"{SICK / 'zero_init.py'}:ZeroHiddenMLP"
DETACHED = f"{SICK / 'detached.py'}:DetachedFeatures"
BN_NET = f"{SICK / 'bn_momentum.py'}:KerasMomentumNet"
HEALTHY_MLP = f"{HEALTHY / 'mlp_normalized.py'}:MLP"
LENET = f"{HEALTHY / 'lenet_relu.py'}:LeNet"

ZERO_LAST = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 64)
        self.fc2 = nn.Linear(64, 10)
        nn.init.zeros_(self.fc2.weight)  # a zero LAST layer is a common, harmless choice
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    write_idx_dataset(root, "FashionMNIST", n_train=1024, n_test=64)
    return root


_cache: dict[tuple, tuple[dict, int]] = {}


def probe_json(*args, data_dir=None, cwd=None) -> tuple[dict, int]:
    """`netdoctor probe ARGS --format json` in process (cached per argument list)."""
    full = [*map(str, args)]
    if data_dir is not None:
        full += ["--data-dir", str(data_dir)]
    key = (tuple(full), str(cwd))
    if key not in _cache:
        result = invoke("probe", *full, "--format", "json", cwd=cwd)
        assert result.stdout, f"no report (exit {result.exit_code}): {result.stderr}"
        _cache[key] = (json.loads(result.stdout), result.exit_code)
    return _cache[key]


def rules_of(report: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in report["findings"]:
        out.setdefault(f["rule"], []).append(f)
    return out


def loud(report: dict) -> list[tuple[str, str]]:
    return [
        (f["rule"], f["message"])
        for f in report["findings"]
        if f["severity"] in ("warning", "error")
    ]


# ------------------------------------------------------------------------------ the seed report


@pytest.fixture(scope="module")
def seed_report(data_dir):
    report, code = probe_json(
        MLP,
        "--data",
        "fashionmnist",
        "--raw",
        "--lr",
        "0.5",
        "--momentum",
        "0",
        "--steps",
        "100",
        data_dir=data_dir,
    )
    return report, code


def test_raw_pixels_kill_the_relus_and_scaling_comes_first(seed_report):
    report, code = seed_report
    found = rules_of(report)
    assert "ND301" in found, report["findings"]
    dead = found["ND404"]
    assert [f["module"] for f in dead] == ["net.2"]
    assert dead[0]["severity"] == "error"
    assert dead[0]["evidence"]["dead_fraction"] >= 0.95
    assert dead[0]["cause"] == "ND301"
    assert dead[0]["location"]["path"].endswith("fixtures/sick/mlp.py")
    assert dead[0]["location"]["line"] == line_of(SICK / "mlp.py", "nn.ReLU()")
    # every runtime symptom is traced back to the raw inputs
    assert all(f["cause"] == "ND301" for f in report["findings"] if f["rule"].startswith("ND4"))
    assert report["summary"]["fix_first"] == "ND301"
    assert code == 1  # ND404 is an error at ~100% dead


def test_verified_fix_makes_the_loss_fall(seed_report):
    report, _ = seed_report
    vf = report["measurements"]["verified_fix"]
    assert vf["rule"] == "ND301" and "255" in vf["applied"]
    before, after = vf["before"], vf["after"]
    assert after["loss_last"] < 0.5 * before["loss_last"]
    assert after["loss_last"] < after["loss_first"] * 0.5  # it falls from ~ln(10)
    assert after["accuracy"] > before["accuracy"] + 0.3
    assert vf["improved"] is True


def test_json_carries_the_measurements(seed_report):
    report, _ = seed_report
    m = report["measurements"]
    assert [r["name"] for r in m["gradient_flow"]] == ["net.1", "net.3"]
    assert all(r["grad_norm"] is not None and r["grad_norm"] >= 0 for r in m["gradient_flow"])
    assert len(m["loss_curve"]) == m["probe"]["steps"] == 100
    acts = {a["name"]: a for a in m["activations"]}
    assert acts["net.2"]["kind"] == "relu" and acts["net.2"]["units"] == 300
    assert acts["net.2"]["dead_fraction"] >= 0.95
    assert m["expected_initial_loss"] == pytest.approx(math.log(10))
    assert m["probe"]["optimizer"] == "sgd" and m["probe"]["lr"] == 0.5
    assert m["overfit"]["samples"] == 16


def test_text_report_shows_flow_curve_and_verified_fix(data_dir):
    result = invoke(
        "probe",
        MLP,
        "--data",
        "fashionmnist",
        "--data-dir",
        data_dir,
        "--raw",
        "--lr",
        "0.5",
        "--momentum",
        "0",
        "--steps",
        "40",
        "--no-color",
    )
    out = result.stdout
    assert "Fix first: ND301 input-not-normalized" in out
    assert "Gradient flow" in out and "net.1" in out
    assert "Loss curve" in out
    assert "Verified fix:" in out and "became" in out
    assert "likely caused by ND301" in out


# ------------------------------------------------------------------------------ vanishing gradients


@pytest.mark.parametrize("target,first", [(LENET_SIGMOID, "net.0"), (SIGMOID_MLP, "net.1")])
def test_sigmoid_stacks_report_vanishing_gradients(data_dir, target, first):
    report, _ = probe_json(
        target, "--data", "fashionmnist", "--steps", "20", "--no-verify", data_dir=data_dir
    )
    found = rules_of(report)
    (nd403,) = found["ND403"]
    assert nd403["module"] == first
    assert nd403["evidence"]["first_last_ratio"] < 1e-2
    assert "first weight layer" in nd403["message"]
    assert nd403["cause"] == "ND102"  # the static saturating chain is the root
    assert "ND102" in found


def test_sigmoid_lenet_fix_is_verified(data_dir):
    report, _ = probe_json(
        LENET_SIGMOID, "--data", "fashionmnist", "--normalize", "--steps", "60", data_dir=data_dir
    )
    assert report["summary"]["fix_first"] == "ND102"
    vf = report["measurements"]["verified_fix"]
    assert vf["applied"].endswith("replaced by ReLU")
    assert vf["after"]["accuracy"] > vf["before"]["accuracy"]


# ------------------------------------------------------------------------------ constant init


def test_zero_hidden_layer_reports_constant_init_and_the_stall(data_dir):
    report, _ = probe_json(
        ZERO_HIDDEN, "--data", "fashionmnist", "--steps", "50", data_dir=data_dir
    )
    found = rules_of(report)
    (nd202,) = found["ND202"]
    assert nd202["module"] == "fc2" and nd202["severity"] == "error"
    assert nd202["location"]["line"] == line_of(SICK / "zero_init.py", "self.fc2 = nn.Linear")
    assert "kaiming_normal_(self.fc2.weight" in nd202["fix"]["patch"]
    (stall,) = found["ND407"]
    assert stall["cause"] == "ND202"
    assert found["ND404"][0]["module"] == "fc2" and found["ND404"][0]["cause"] == "ND202"
    assert report["summary"]["fix_first"] == "ND202"
    vf = report["measurements"]["verified_fix"]
    assert vf["improved"] and vf["after"]["loss_last"] < 1.0 < vf["before"]["loss_last"]


def test_zero_last_layer_is_fine(data_dir, tmp_path):
    (tmp_path / "zl.py").write_text(ZERO_LAST)
    report, _ = probe_json(
        f"{tmp_path / 'zl.py'}:Net",
        "--data",
        "fashionmnist",
        "--steps",
        "40",
        "--no-verify",
        data_dir=data_dir,
        cwd=tmp_path,
    )
    assert not loud(report)


# ------------------------------------------------------------------------------ BatchNorm


def test_batchnorm_momentum_zero_reports_train_eval_gap(data_dir):
    report, _ = probe_json(
        BN_NET,
        "-a",
        "momentum=0",
        "--data",
        "fashionmnist",
        "--normalize",
        "--steps",
        "40",
        data_dir=data_dir,
    )
    found = rules_of(report)
    (gap,) = found["ND411"]
    assert gap["module"] in ("bn1", "bn2")
    assert gap["cause"] == "ND203" and "ND203" in found
    assert gap["evidence"]["relative_gap"] > 0.3
    assert "momentum=0.1" in gap["fix"]["patch"]
    assert report["measurements"]["train_eval"]["momentum"] == {"bn1": 0, "bn2": 0}


def test_healthy_bn_cnn_on_normalized_data_is_clean(data_dir):
    report, code = probe_json(
        BN_NET,
        "-a",
        "momentum=0.1",
        "--data",
        "fashionmnist",
        "--normalize",
        "--steps",
        "100",
        data_dir=data_dir,
    )
    assert not loud(report), loud(report)
    assert code == 0
    m = report["measurements"]
    assert m["train_eval"]["relative_gap"] < 0.3
    assert m["overfit"]["loss_min"] < 0.2 * m["overfit"]["loss_first"]
    assert "verified_fix" not in m
    assert report["summary"]["fix_first"] is None


def test_healthy_lenet_with_functional_relus_is_clean(data_dir):
    report, _ = probe_json(
        LENET, "--data", "fashionmnist", "--normalize", "--steps", "60", data_dir=data_dir
    )
    assert not loud(report), loud(report)
    names = [a["name"] for a in report["measurements"]["activations"]]
    assert names == ["relu(conv1)", "relu(conv2)", "relu(fc1)", "relu(fc2)"]
    loc = report["measurements"]["activations"][0]["location"]
    assert loc["line"] == line_of(HEALTHY / "lenet_relu.py", "torch.relu(self.conv1(x))")


# ------------------------------------------------------------------------------ too high a lr


def test_far_too_high_lr_names_the_producing_layer(data_dir):
    report, code = probe_json(
        HEALTHY_MLP,
        "--data",
        "fashionmnist",
        "--raw",
        "--lr",
        "0.5",
        "--steps",
        "30",
        "--no-verify",
        data_dir=data_dir,
    )
    found = rules_of(report)
    assert "ND401" in found, report["findings"]
    (nan,) = found["ND401"]
    assert nan["module"] in {"net.1", "net.3", "net.5"}
    assert nan["evidence"]["step"] >= 2
    assert nan["location"]["path"].endswith("fixtures/healthy/mlp_normalized.py")
    if nan["evidence"]["kind"] == "forward":
        assert nan["evidence"]["input_stats"]["nan"] == 0  # the producer, not a propagator
        assert nan["evidence"]["output_stats"]["nan"] + nan["evidence"]["output_stats"]["inf"] > 0
    assert report["measurements"]["probe"]["stopped"] == "non-finite"
    assert code == 1


def test_high_lr_without_nan_blames_the_learning_rate(data_dir):
    report, _ = probe_json(
        LENET, "--data", "fashionmnist", "--lr", "10", "--steps", "30", data_dir=data_dir
    )
    found = rules_of(report)
    lr_findings = [
        f
        for f in report["findings"]
        if f["rule"] in ("ND401", "ND402")
        or (f["rule"] == "ND406" and f["evidence"]["direction"] == "too-large")
    ]
    assert lr_findings, report["findings"]
    assert all(f["module"] in {"conv1", "conv2", "fc1", "fc2", "fc3"} for f in lr_findings)
    assert report["summary"]["fix_first"] in ("ND401", "ND402", "ND406")
    assert all(f["cause"] is not None for f in found["ND404"])  # dead ReLUs are the symptom
    vf = report["measurements"]["verified_fix"]
    assert vf["applied"].startswith("learning rate 10 → ")  # lowered, tried step by step
    assert vf["improved"], vf


# ------------------------------------------------------------------------------ no gradient


def test_detached_features_starve_the_convolutions(data_dir):
    report, _ = probe_json(
        DETACHED, "--data", "fashionmnist", "--steps", "10", "--no-verify", data_dir=data_dir
    )
    starved = {f["module"]: f for f in rules_of(report)["ND410"]}
    assert set(starved) == {"conv1", "conv2"}
    assert starved["conv1"]["severity"] == "error"
    assert starved["conv1"]["evidence"]["parameters"] == ["conv1.weight", "conv1.bias"]
    assert starved["conv2"]["location"]["line"] == line_of(
        SICK / "detached.py", "self.conv2 = nn.Conv2d"
    )


# ------------------------------------------------------------------------------ bad data


def test_labels_beyond_the_outputs_are_a_finding_not_a_crash(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 20, size=256)
    path = write_npz(tmp_path / "labels.npz", x, y)
    report, code = probe_json(HEALTHY_MLP, "--data", path, "--steps", "20", cwd=tmp_path)
    found = rules_of(report)
    assert found["ND303"][0]["severity"] == "error"
    assert "outside [0, 10)" in found["ND303"][0]["message"]
    assert code == 1
    assert report["measurements"]["probe"]["steps"] == 0
    assert any("did not train" in n for n in report["notes"])


def test_nan_in_the_data_is_reported(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 1, 28, 28)).astype(np.float32)
    x[3, 0, 5, 5] = np.nan
    y = rng.integers(0, 10, size=256)
    path = write_npz(tmp_path / "nan.npz", x, y)
    report, code = probe_json(HEALTHY_MLP, "--data", path, "--steps", "20", cwd=tmp_path)
    found = rules_of(report)
    assert "ND304" in found
    assert code == 1
    for f in found.get("ND401", []):
        assert f["cause"] == "ND304"


# ------------------------------------------------------------------------------ the Python API


def _hook_count(model) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def test_probe_leaves_the_model_untouched(data_dir):
    import torch

    from netdoctor.data import DataSpec, open_source
    from netdoctor.loading.target import load
    from netdoctor.probe.engine import ProbeConfig, run_probe

    model = load(LENET).models[0].model
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = open_source(DataSpec("fashionmnist", data_dir=data_dir))
    run = run_probe(model, source, ProbeConfig(steps=5, overfit_steps=3))
    assert run.steps_run == 5 and len(run.loss) == 5
    assert _hook_count(model) == 0
    assert not model.training  # modes untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch._C._len_torch_function_stack() == 0


def test_hooks_are_removed_when_the_forward_raises(data_dir):
    import torch
    from torch import nn

    from netdoctor.data import DataSpec, open_source
    from netdoctor.measure.activations import ActivationRecorder
    from netdoctor.probe.engine import ProbeConfig, run_probe

    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return torch.relu(self.fc(x.flatten(1)))

    model = Flaky()
    rec = ActivationRecorder(model)
    with pytest.raises(RuntimeError), rec.attached():
        assert _hook_count(model) > 0
        for _ in range(3):
            with rec.forward():
                model(torch.randn(2, 1, 28, 28))
    assert _hook_count(model) == 0
    assert torch._C._len_torch_function_stack() == 0
    source = open_source(DataSpec("fashionmnist", data_dir=data_dir))
    with pytest.raises(RuntimeError):
        run_probe(Flaky(), source, ProbeConfig(steps=5))
    assert torch._C._len_torch_function_stack() == 0


def test_same_seed_same_run(data_dir):
    from netdoctor.data import DataSpec, open_source
    from netdoctor.loading.target import load
    from netdoctor.probe.engine import ProbeConfig, run_probe

    model = load(HEALTHY_MLP).models[0].model
    runs = [
        run_probe(
            model,
            open_source(DataSpec("fashionmnist", data_dir=data_dir)),
            ProbeConfig(steps=8, overfit_steps=0),
        )
        for _ in range(2)
    ]
    assert runs[0].loss == runs[1].loss
    assert [p.grad_norm for p in runs[0].params] == [p.grad_norm for p in runs[1].params]


# ------------------------------------------------------------------------------ the command line


def test_probe_needs_data():
    result = invoke("probe", MLP)
    assert result.exit_code == 2
    assert result.stderr.startswith("netdoctor: error: no data given")


def test_plot_without_matplotlib_is_one_clear_line(data_dir, tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("matplotlib is installed")
    result = invoke(
        "probe",
        MLP,
        "--data",
        "fashionmnist",
        "--data-dir",
        data_dir,
        "--plot",
        tmp_path / "flow.png",
    )
    assert result.exit_code == 2
    assert "pip install matplotlib" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "flow.png").exists()


def test_plot_writes_the_gradient_flow_png(data_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "flow.png"
    result = invoke(
        "probe",
        LENET_SIGMOID,
        "--data",
        "fashionmnist",
        "--data-dir",
        data_dir,
        "--steps",
        "10",
        "--no-verify",
        "--plot",
        out,
    )
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_help_does_not_import_torch():
    code = (
        "import sys\nfrom netdoctor.cli import main\nsys.argv = ['netdoctor', 'probe', "
        "'--help']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)"
    )
    from conftest import run_python

    result = run_python(code)
    assert "TORCH False" in result.stdout, result.stdout + result.stderr
    assert "--data SOURCE" in result.stdout


def test_onnx_target_cannot_be_probed(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    result = invoke("probe", tmp_path / "m.onnx", "--data", "synthetic")
    assert result.exit_code == 2
    assert "ONNX" in result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="posix shell")
def test_probe_subprocess_exit_code(data_dir):
    result = run_cli(
        "probe",
        HEALTHY_MLP,
        "--data",
        "fashionmnist",
        "--data-dir",
        data_dir,
        "--normalize",
        "--steps",
        "30",
        "--no-verify",
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["command"] == "probe"
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
