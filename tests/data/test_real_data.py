"""The probe on real data: scikit-learn's bundled data sets (never downloaded), fed as .npz
files written by the test.

* digits (8x8 images, intensities 0..16): a healthy MLP on x / 16 probes clean; on the raw
  0..16 values ND301 names the right scale (x / 16, not / 255) -- and since the MLP still
  learns well on them, reports it as info with the numbers, not as a warning.
* wine (13 chemical measurements in their own units: proline ~750, hue ~1, a std ratio of
  ~2500): standardized, the MLP probes clean; raw, per-feature standardization (ND302) is the
  fix first, and the verified fix improves both loss and accuracy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import invoke
from datagen import write_npz

datasets = pytest.importorskip("sklearn.datasets")

pytestmark = pytest.mark.slow

MODELS = """\
from torch import nn


class DigitsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64),
                                 nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


class WineMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                                 nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x)
"""


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The model file and the .npz files: digits raw and /16, wine raw and standardized."""
    root = tmp_path_factory.mktemp("real")
    (root / "models.py").write_text(MODELS)
    digits = datasets.load_digits()
    x = digits.data.reshape(-1, 1, 8, 8).astype(np.float32)
    write_npz(root / "digits_raw.npz", x, digits.target)
    write_npz(root / "digits.npz", x / 16.0, digits.target)
    wine = datasets.load_wine()
    w = wine.data.astype(np.float32)
    write_npz(root / "wine_raw.npz", w, wine.target)
    write_npz(root / "wine.npz", (w - w.mean(0)) / w.std(0), wine.target)
    return root


_cache: dict[tuple, dict] = {}


def probe(root, model: str, data: str) -> dict:
    key = (model, data)
    if key not in _cache:
        result = invoke(
            "probe",
            f"{root / 'models.py'}:{model}",
            "--data",
            root / data,
            "--steps",
            "100",
            "--format",
            "json",
            cwd=root,
        )
        assert result.stdout, result.stderr
        _cache[key] = json.loads(result.stdout)
    return _cache[key]


def loud(report: dict) -> list[str]:
    return [
        f"{f['rule']}: {f['message']}"
        for f in report["findings"]
        if f["severity"] in ("warning", "error")
    ]


def curve(report: dict) -> tuple[float, float]:
    losses = report["measurements"]["loss_curve"]
    return float(np.mean(losses[:10])), float(np.mean(losses[-10:]))


@pytest.mark.parametrize("model,data", [("DigitsMLP", "digits.npz"), ("WineMLP", "wine.npz")])
def test_healthy_model_on_scaled_real_data_is_clean(real, model, data):
    report = probe(real, model, data)
    assert not loud(report), loud(report)
    first, last = curve(report)
    assert last < 0.85 * first  # it learns
    assert "verified_fix" not in report["measurements"]


def test_raw_digits_scale_fix_follows_the_measured_range(real):
    report = probe(real, "DigitsMLP", "digits_raw.npz")
    (nd301,) = [f for f in report["findings"] if f["rule"] == "ND301"]
    ev = nd301["evidence"]
    assert ev["max"] == 16 and ev["range_max"] == 16
    assert "x = x / 16.0" in nd301["fix"]["patch"] and "255" not in nd301["fix"]["summary"]
    assert "0..16" in nd301["message"]
    # the MLP learns well on 0..16 values at this lr: a risk, reported as info with the numbers
    survived = ev["training_survived"]
    assert survived["loss_last"] < 0.5 * survived["loss_first"]
    assert nd301["severity"] == "info" and "Training survived it" in nd301["message"]
    assert not loud(report), loud(report)


def test_raw_wine_standardizes_each_feature_first_and_the_fix_is_verified(real):
    report = probe(real, "WineMLP", "wine_raw.npz")
    assert report["summary"]["fix_first"] == "ND302"
    (nd302,) = [f for f in report["findings"] if f["rule"] == "ND302"]
    assert nd302["severity"] == "warning" and nd302["evidence"]["ratio"] > 1000
    assert "ND301" in {f["rule"] for f in report["findings"]}  # far from unit scale too
    vf = report["measurements"]["verified_fix"]
    assert vf["rule"] == "ND302" and vf["improved"] and vf["outcome_improved"]
    assert vf["applied"].startswith("each input feature standardized")
    before, after = vf["before"], vf["after"]
    assert after["loss_last"] < 0.5 * before["loss_last"]
    assert after["accuracy"] >= before["accuracy"] + 0.3
