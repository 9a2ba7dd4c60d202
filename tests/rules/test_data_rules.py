"""ND301-ND304 (data rules) and `netdoctor check TARGET --data SOURCE`: the measured numbers,
the options, the fixes for each kind of data, and what the rules leave alone (their fixtures
and docs are tests/rules/test_snapshots.py's and test_docs.py's)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from conftest import REPO
from datagen import make_block_images, write_idx_dataset, write_npz
from netdoctor.cli import main
from netdoctor.data.sample import DataSample, sample_data
from netdoctor.rules.contexts import DataContext
from netdoctor.rules.engine import RuleSettings, run_rules

MLP = str(REPO / "fixtures" / "sick" / "mlp.py") + ":MLP"


def run_cli(*args: str, cwd: Path | None = None):
    """`netdoctor check ... --format json` in-process; returns (exit code, report or None, out).

    ND201 is ignored: the seed MLP's N(0, 0.01) init is a static finding, not a data one."""
    runner = CliRunner()
    result = runner.invoke(
        main, ["check", *args, "--ignore", "ND201", "--format", "json"], catch_exceptions=False
    )
    report = None
    if result.exit_code in (0, 1) and result.stdout.strip():
        report = json.loads(result.stdout)
    return result.exit_code, report, result


def findings(report, rule_id):
    return [f for f in report["findings"] if f["rule"] == rule_id]


def rules_in(report):
    return sorted({f["rule"] for f in report["findings"]})


def run_data_rules(sample: DataSample, **tables):
    """The data rules' findings on a sample; `tables`: {rule ID: its options table}."""
    return run_rules(DataContext("t", sample), RuleSettings.from_tables(tables=tables))


def ids(found):
    return sorted(f.rule for f in found)


# ------------------------------------------------------------------------------ ND301


@pytest.fixture
def pixel_arrays():
    images, labels = make_block_images(200, seed=0)
    return images[:, None].astype(np.float32), labels  # (200, 1, 28, 28), 0..255 float


def test_raw_pixels_npz_reports_nd301_with_measured_statistics(tmp_path, pixel_arrays):
    x, y = pixel_arrays
    npz = write_npz(tmp_path / "raw.npz", x, y)
    code, report, _ = run_cli(MLP, "--data", str(npz))
    assert code == 0  # a warning does not fail the default --fail-on error
    (f,) = findings(report, "ND301")
    assert f["severity"] == "warning"
    ev = f["evidence"]
    x64 = x.astype(np.float64)
    # 200 samples, 64 per batch: the 4 sampled batches hold the whole file.
    assert ev["samples"] == 200
    assert ev["mean"] == pytest.approx(x64.mean(), rel=1e-9)
    assert ev["std"] == pytest.approx(x64.std(), rel=1e-9)
    assert ev["min"] == pytest.approx(x64.min())
    assert ev["max"] == pytest.approx(x64.max())
    # The message states them; the fix prints the line to add and the Normalize numbers.
    assert f"mean {x64.mean():.4g}" in f["message"]
    assert f"std {x64.std():.4g}" in f["message"]
    assert "min 0" in f["message"] and "max 255" in f["message"]
    assert f["fix"]["kind"] == "snippet"
    patch = f["fix"]["patch"]
    assert "x = x / 255.0" in patch
    m, s = (x64 / 255).mean(), (x64 / 255).std()
    assert f"transforms.Normalize(({m:.4f},), ({s:.4f},))" in patch
    assert ev["scaled_mean"][0] == pytest.approx(m) and ev["scaled_std"][0] == pytest.approx(s)
    assert report["summary"]["fix_first"] == "ND301"
    assert any(n.startswith("data: ") and "raw.npz" in n for n in report["notes"])


def test_same_pixels_scaled_to_unit_range_do_not_trigger(tmp_path, pixel_arrays):
    x, y = pixel_arrays
    npz = write_npz(tmp_path / "unit.npz", x / 255.0, y)
    code, report, _ = run_cli(MLP, "--data", str(npz))
    assert code == 0
    assert report["findings"] == []
    standardized = (x / 255.0 - (x / 255.0).mean()) / (x / 255.0).std()
    npz = write_npz(tmp_path / "std.npz", standardized, y)
    code, report, _ = run_cli(MLP, "--data", str(npz))
    assert report["findings"] == []


def test_fashionmnist_layout_default_raw_and_normalize(tmp_path):
    write_idx_dataset(tmp_path, "FashionMNIST")
    base = [MLP, "--data", "fashionmnist", "--data-dir", str(tmp_path)]
    code, report, _ = run_cli(*base)
    assert code == 0 and "ND301" not in rules_in(report)
    assert any("served as float32 in [0, 1]" in n for n in report["notes"])

    code, report, _ = run_cli(*base, "--raw")
    (f,) = findings(report, "ND301")
    assert "x = x / 255.0" in f["fix"]["patch"]
    assert "--raw" in f["fix"]["patch"]  # built-in served raw: the fix says to drop the flag

    code, report, _ = run_cli(*base, "--raw", "--normalize")
    assert "ND301" not in rules_in(report)
    code, report, _ = run_cli(
        *base,
        "--batch-size",
        "16",
        "--resize",
        "32",
        "--input-shape",
        "1,32,32",
        "-a",
        "num_inputs=1024",
    )
    assert code == 0 and report["findings"] == []


def test_nd301_thresholds_on_direct_samples():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (256,), generator=g)
    unit = torch.rand(256, 1, 28, 28, generator=g)
    assert run_data_rules(DataSample(unit, y)) == []  # ToTensor pixels
    assert run_data_rules(DataSample((unit - 0.5) / 0.29, y)) == []  # standardized
    twice = run_data_rules(DataSample(unit / 255.0, y))  # divided by 255 twice
    assert ids(twice) == ["ND301"] and "twice" in twice[0].message
    big = run_data_rules(DataSample(torch.randn(256, 8, generator=g) * 50 + 3, y))
    assert ids(big) == ["ND301"]
    assert "x_train.mean(dim=0" in big[0].fix.patch  # tabular: per-feature standardization
    # token ids are not inputs with a scale
    tokens = torch.randint(0, 1000, (256, 16), generator=g)
    assert run_data_rules(DataSample(tokens, y)) == []
    # the options move the limits
    assert run_data_rules(DataSample(unit / 255.0, y), ND301={"min-std": 1e-4}) == []


def test_nd301_rgb_images_get_a_per_channel_normalize():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (128, 3, 8, 8), generator=g).float()
    x[:, 1] = x[:, 1] // 2
    (f,) = run_data_rules(DataSample(x, torch.zeros(128, dtype=torch.long)))
    ch = (x / 255).transpose(0, 1).reshape(3, -1).double()
    means = ", ".join(f"{v:.4f}" for v in ch.mean(1).tolist())
    stds = ", ".join(f"{v:.4f}" for v in ch.std(1, unbiased=False).tolist())
    assert f"transforms.Normalize(({means}), ({stds}))" in f.fix.patch


class _ScalesItself(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1) / 255.0)


def test_model_that_rescales_its_input_is_not_flagged():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 28, 28), generator=g).float()
    y = torch.randint(0, 10, (64,), generator=g)
    sample = DataSample(x, y).for_model(_ScalesItself())
    assert sample.model_input["module"] == "fc"
    assert sample.num_outputs == 10
    assert run_data_rules(sample) == []
    # the seed's MLP feeds them straight into its first Linear
    sys.path.insert(0, str(REPO / "fixtures" / "sick"))
    try:
        from mlp import MLP as SeedMLP
    finally:
        sys.path.pop(0)
    assert ids(run_data_rules(DataSample(x, y).for_model(SeedMLP()))) == ["ND301"]


# ------------------------------------------------------------------------------ ND302


class _Tabular(nn.Module):
    def __init__(self, n=4, c=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n, 16), nn.ReLU(), nn.Linear(16, c))

    def forward(self, x):
        return self.net(x)


TABULAR = textwrap.dedent("""
    from torch import nn

    class Tab(nn.Module):
        def __init__(self, n=4, c=3):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(n, 16), nn.ReLU(), nn.Linear(16, c))

        def forward(self, x):
            return self.net(x)
""")


def test_feature_scale_mismatch_npz(tmp_path):
    (tmp_path / "tab.py").write_text(TABULAR)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    x[:, 0] *= 0.001  # std ratio of the largest feature to feature 0: ~1000
    npz = write_npz(tmp_path / "mismatch.npz", x, rng.integers(0, 3, 200))
    _, report, _ = run_cli(f"{tmp_path / 'tab.py'}:Tab", "--data", str(npz))
    (f,) = findings(report, "ND302")
    stds = x.astype(np.float64).std(axis=0)
    top = int(stds.argmax())
    assert f["evidence"]["ratio"] == pytest.approx(stds[top] / stds[0], rel=1e-6)
    assert f"feature {top}" in f["message"] and "feature 0" in f["message"]
    assert "ND301" not in rules_in(report)  # overall scale is fine: only the mismatch
    assert "(x - mean) / std" in f["fix"]["patch"]

    ok = write_npz(tmp_path / "ok.npz", (x - x.mean(0)) / x.std(0), rng.integers(0, 3, 200))
    _, report, _ = run_cli(f"{tmp_path / 'tab.py'}:Tab", "--data", str(ok))
    assert report["findings"] == []


def test_nd302_constant_and_sparse_features_and_channels():
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(256, dtype=torch.long)
    x = torch.randn(256, 5, generator=g)
    x[:, 3] = 7.0  # constant
    x[:, 4] = 0.0
    x[:5, 4] = 1e-4 * torch.rand(5)  # sparse: set in 2% of samples
    assert run_data_rules(DataSample(x, y)) == []
    x[:, 1] *= 1000
    found = [f for f in run_data_rules(DataSample(x, y)) if f.rule == "ND302"]
    assert len(found) == 1
    assert found[0].evidence["constant"] == [3] and found[0].evidence["sparse"] == [4]
    assert "constant" in found[0].message
    # flattened digit-like images: empty or rarely set border pixels are not a mismatch
    images, _ = make_block_images(256, seed=1)
    flat = torch.from_numpy(images.reshape(256, -1).astype(np.float32) / 255.0)
    flat[:, :28] = 0.0
    flat[:3, 28] = 0.004
    assert "ND302" not in ids(run_data_rules(DataSample(flat, y)))
    # image channels
    img = torch.rand(64, 3, 8, 8, generator=g)
    img[:, 2] *= 1e-3
    (f,) = [f for f in run_data_rules(DataSample(img, y[:64])) if f.rule == "ND302"]
    assert "channel 2" in f.message and "transforms.Normalize(" in f.fix.patch


# ------------------------------------------------------------------------------ ND303


def test_labels_beyond_the_models_outputs(tmp_path, pixel_arrays):
    x, _ = pixel_arrays
    y = np.arange(200) % 12  # labels 0..11 for the MLP's 10 outputs
    npz = write_npz(tmp_path / "labels.npz", x / 255.0, y)
    code, report, _ = run_cli(MLP, "--data", str(npz))
    assert code == 1  # ND303 is an error
    (f,) = findings(report, "ND303")
    assert f["severity"] == "error"
    counts = {str(v): int((y == v).sum()) for v in (10, 11)}
    assert f["evidence"]["out_of_range"] == counts
    assert f"10 (x{counts['10']})" in f["message"] and f"11 (x{counts['11']})" in f["message"]
    assert "outside [0, 10)" in f["message"]
    assert "nn.Linear(..., 12)" in f["fix"]["patch"]


def test_float_labels(tmp_path, pixel_arrays):
    x, _ = pixel_arrays
    npz = write_npz(tmp_path / "half.npz", x / 255.0, np.full(200, 0.5, dtype=np.float32))
    _, report, _ = run_cli(MLP, "--data", str(npz))
    (f,) = findings(report, "ND303")
    assert "not integers" in f["message"] and "0.5" in f["message"]
    assert f["evidence"]["fractional"] == 200
    whole = write_npz(tmp_path / "whole.npz", x / 255.0, (np.arange(200) % 10).astype(np.float32))
    _, report, _ = run_cli(MLP, "--data", str(whole))
    (f,) = findings(report, "ND303")
    assert "y = y.long()" in f["fix"]["patch"]


def test_nd303_class_count_and_what_it_leaves_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    model12 = _Tabular(c=12)
    shuffled = torch.randint(0, 10, (256,), generator=g)
    # 12 outputs, labels 0..9 in 256 >= 20*12 shuffled samples: outputs 10, 11 never a target
    (f,) = run_data_rules(DataSample(x, shuffled).for_model(model12))
    assert f.rule == "ND303" and "10..11" in f.message
    # ... but not from a label-sorted sample or a small one
    assert run_data_rules(DataSample(x, shuffled.sort().values).for_model(model12)) == []
    assert run_data_rules(DataSample(x[:100], shuffled[:100]).for_model(model12)) == []
    # a built-in set declares its classes
    declared = DataSample(x[:16], shuffled[:16], num_classes=10).for_model(model12)
    (f,) = run_data_rules(declared)
    assert "10 classes" in f.message
    # 1-based labels
    (f,) = run_data_rules(DataSample(x, shuffled + 1).for_model(_Tabular(c=10)))
    assert "1-based" in f.message and "y = y - 1" in f.fix.patch
    # regression / multi-label targets shaped like the output, a non-class loss, ignore_index
    three = _Tabular(c=3)
    assert run_data_rules(DataSample(x, torch.randn(256, 3, generator=g)).for_model(three)) == []
    assert run_data_rules(DataSample(x, shuffled, loss="mse").for_model(three)) == []
    ignored = shuffled % 3
    ignored[:7] = -100
    assert run_data_rules(DataSample(x, ignored).for_model(three)) == []
    # the loss says class indices: float labels flagged without a model
    (f,) = run_data_rules(DataSample(x, torch.full((256,), 0.5), loss="cross_entropy"))
    assert f.rule == "ND303"


def test_segmentation_style_labels_against_output_channels():
    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 1)

        def forward(self, x):
            return self.conv(x)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 6, 6, generator=g)
    sample = DataSample(x, torch.randint(0, 7, (8, 6, 6), generator=g)).for_model(Seg())
    assert sample.num_outputs == 5
    (f,) = run_data_rules(sample)
    assert f.rule == "ND303" and "outside [0, 5)" in f.message


# ------------------------------------------------------------------------------ ND304


def test_nan_in_x(tmp_path, pixel_arrays):
    x, y = pixel_arrays
    x = x / 255.0
    x[[3, 50], 0, 10, 10] = np.nan
    x[77, 0, 0, 0] = np.inf
    npz = write_npz(tmp_path / "nan.npz", x, y)
    code, report, _ = run_cli(MLP, "--data", str(npz))
    assert code == 1
    (f,) = findings(report, "ND304")
    ev = f["evidence"]["x"]
    assert (ev["nan"], ev["inf"], ev["samples"]) == (2, 1, 3)
    assert ev["fraction"] == pytest.approx(3 / x.size)
    assert len(ev["first_samples"]) == 3 and len(ev["first_batch_rows"]) == 3
    assert "2 NaN and 1 Inf" in f["message"]
    assert "ND301" not in rules_in(report)  # the statistics skip the non-finite values


def test_nan_in_y_and_systematic_nan():
    x = torch.rand(32, 4)
    y = torch.randn(32)
    y[5] = float("nan")
    (f,) = [f for f in run_data_rules(DataSample(x, y)) if f.rule == "ND304"]
    assert f.evidence["y"]["first_samples"] == [5]
    x[:, 2] = float("nan")
    (f,) = [
        f
        for f in run_data_rules(DataSample(x, torch.zeros(32, dtype=torch.long)))
        if f.rule == "ND304"
    ]
    assert f.evidence["x"]["always_nonfinite_positions"] == 1
    assert "clamp_min" in f.fix.summary


# ------------------------------------------------------------------------------ CLI plumbing


def test_missing_data_dir_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    code, _, result = run_cli(MLP, "--data", "fashionmnist", "--data-dir", str(missing))
    assert code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0]
    assert lines[0].startswith("netdoctor: error:")
    code, _, result = run_cli(MLP, "--data", str(tmp_path / "none.npz"))
    assert code == 2 and "none.npz" in result.stderr and "Traceback" not in result.stderr


def test_select_ignore_suppression_and_input_shape_from_data(tmp_path, pixel_arrays):
    x, y = pixel_arrays
    npz = write_npz(tmp_path / "raw.npz", x, y)
    code, report, _ = run_cli(MLP, "--data", str(npz), "--ignore", "ND301")
    assert code == 0 and report["findings"] == []
    _, report, _ = run_cli(MLP, "--data", str(npz), "--select", "ND1")
    assert report["findings"] == []
    assert any("input shape 1,28,28 taken from the data" in n for n in report["notes"])
    model = tmp_path / "model.py"
    model.write_text(
        (REPO / "fixtures" / "sick" / "mlp.py")
        .read_text()
        .replace("class MLP(nn.Module):", "class MLP(nn.Module):  # netdoctor: ignore[ND301]")
    )
    _, report, _ = run_cli(f"{model}:MLP", "--data", str(npz))
    assert report["findings"] == []
    assert any("ND301" in n and "suppressed" in n for n in report["notes"])


def test_sample_data_api(tmp_path):
    from netdoctor.data import DataSpec, open_source

    write_idx_dataset(tmp_path, "FashionMNIST")
    spec = DataSpec("fashionmnist", data_dir=tmp_path, raw=True, batch_size=32)
    sys.path.insert(0, str(REPO / "fixtures" / "sick"))
    try:
        from mlp import MLP as SeedMLP
    finally:
        sys.path.pop(0)
    model = SeedMLP().train()
    sample = sample_data(open_source(spec), model, n_batches=2, spec=spec)
    assert model.training  # modes restored
    assert sample.x.shape == (64, 1, 28, 28) and sample.y.shape == (64,)
    assert sample.num_outputs == 10 and sample.output_shape == (8, 10)
    assert sample.builtin and sample.raw and not sample.normalized
    assert sample.num_classes == 10 and sample.batch_size == 32
    assert "FashionMNIST" in sample.description
    # without the spec the flags are read off the source
    again = sample_data(open_source(spec), None, n_batches=1)
    assert again.builtin and again.raw and again.num_outputs is None

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 10)

        def forward(self, x):
            return self.fc(x)

    broken = sample.for_model(Broken())
    assert broken.num_outputs is None and any("forward failed" in n for n in broken.notes)


@pytest.mark.parametrize(
    "top,maximum,divisor",
    [
        (16, 16, 16.0),
        (255, 255, 255.0),
        (255, 100, 255.0),
        (4095, 3000, 4095.0),
        (65535, 65535, 65535.0),
    ],
)
def test_nd301_scale_follows_the_measured_range(top, maximum, divisor):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, maximum + 1, (256, 1, 8, 8), generator=g).float()
    x[0, 0, 0, 0] = maximum
    (f,) = [
        f
        for f in run_data_rules(DataSample(x, torch.zeros(256, dtype=torch.long)))
        if f.rule == "ND301"
    ]
    assert f.evidence["range_max"] == divisor
    assert f"x = x / {divisor:.1f}" in f.fix.patch and f"x / {divisor:.1f}" in f.fix.summary
    assert f"0..{top}" in f.message
    assert f.evidence["scaled_mean"][0] == pytest.approx(float(x.double().mean()) / divisor)


def test_nd301_standardizes_what_no_range_fits():
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(256, dtype=torch.long)
    for x in (
        torch.randint(0, 41, (256, 1, 8, 8), generator=g).float(),  # max 40: no range
        torch.randn(256, 1, 8, 8, generator=g) * 30,  # signed
        torch.rand(256, 1, 8, 8, generator=g) * 200,
    ):  # fractional
        (f,) = [f for f in run_data_rules(DataSample(x, y)) if f.rule == "ND301"]
        assert "range_max" not in f.evidence
        assert f.fix.summary.startswith("standardize"), f.fix.summary


def test_nd302_ranks_before_nd301_on_raw_tabular_data():
    from netdoctor.findings import Report

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g) * torch.tensor([0.1, 1.0, 300.0, 20.0]) + 50
    found = run_data_rules(DataSample(x, torch.zeros(256, dtype=torch.long)))
    assert ids(found) == ["ND301", "ND302"]
    assert Report(target="t", findings=found).fix_first().rule == "ND302"
