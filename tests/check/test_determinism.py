"""Same target and flags, same report: everything random in check and probe runs under --seed
(default 0; `seed` in [tool.netdoctor]), model construction included, and netdoctor leaves the
caller's own random streams as they were."""

from __future__ import annotations

import random
import textwrap

import numpy as np
import pytest
import torch

from conftest import REPO, check_json, findings_of, invoke, run_cli, start_cli

MLP = "fixtures/sick/mlp.py:MLP"  # N(0, 0.01) init: ND201's evidence is the measured weight std


@pytest.mark.slow
def test_two_processes_give_byte_identical_json_on_every_fixture():
    args = ("check", "fixtures/sick", "fixtures/healthy", "--format", "json")
    procs = [start_cli(*args), start_cli(*args)]
    outs = [proc.communicate(timeout=900) for proc in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 1, err  # the sick fixtures hold errors
        assert out.startswith("{")
    assert outs[0][0] == outs[1][0]
    # ... and the report does depend on random weights (it is not trivially equal).
    assert '"std": 0.0' in outs[0][0] and '"rule": "ND204"' in outs[0][0]


def _evidence(report: dict, rule: str) -> list[dict]:
    return [f["evidence"] for f in findings_of(report, rule)]


def test_seed_is_honoured_and_reproducible():
    zero, _ = check_json(MLP)
    again, _ = check_json(MLP, "--seed", "0")
    one, _ = check_json(MLP, "--seed", "1")
    one_again, _ = check_json(MLP, "--seed", "1")
    assert zero == again  # 0 is the default
    assert one == one_again
    assert _evidence(zero, "ND201") != _evidence(one, "ND201")  # other weights were drawn...
    assert [f["rule"] for f in findings_of(zero)] == [f["rule"] for f in findings_of(one)]


def test_seed_from_the_config_and_the_command_line_overrides_it(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.netdoctor]\nseed = 1\n")
    target = str(REPO / MLP.replace(":MLP", "")) + ":MLP"
    from_config, _ = check_json(target, cwd=tmp_path)
    from_cli, _ = check_json(MLP, "--seed", "1")
    overridden, _ = check_json(target, "--seed", "0", cwd=tmp_path)
    default, _ = check_json(MLP)
    assert _evidence(from_config, "ND201") == _evidence(from_cli, "ND201")
    assert _evidence(overridden, "ND201") == _evidence(default, "ND201")


HEALTHY_SAMPLE = [
    "resnet.py",
    "vit.py",
    "transformer.py",
    "lstm.py",
    "lenet_relu.py",
    "mlp_normalized.py",
    "zero_head.py",
    "unet.py",
]


@pytest.mark.slow
@pytest.mark.parametrize("seed", ["7", "123456"])
def test_another_seed_changes_nothing_for_healthy_models(seed):
    report, result = check_json(
        *[f"fixtures/healthy/{name}" for name in HEALTHY_SAMPLE], "--seed", seed
    )
    assert result.exit_code == 0
    assert len(report["reports"]) == len(HEALTHY_SAMPLE)
    assert findings_of(report) == []


def test_a_model_is_built_the_same_alone_and_among_its_folder():
    alone, _ = check_json("fixtures/sick/bad_init.py:DeepTanhMLP")
    folder, _ = check_json("fixtures/sick/bad_init.py")
    (report,) = [r for r in folder["reports"] if r["target"].endswith(":DeepTanhMLP")]
    assert alone["findings"] == report["findings"]


def test_checking_leaves_the_callers_random_state_alone():
    from netdoctor.check import CheckOptions, check

    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    check(MLP, CheckOptions(input_shape=(1, 28, 28), seed=5))
    assert random.getstate() == states[0]
    assert (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


RANDOM_FORWARD = textwrap.dedent('''\
    import random

    import numpy as np
    import torch
    from torch import nn

    DRAWN = [random.random(), float(np.random.rand())]  # at import


    class Noisy(nn.Module):
        """Draws from every generator while it is built and in forward."""

        def __init__(self):
            super().__init__()
            self.scale = random.uniform(0.001, 1.0) * float(np.random.rand())
            self.body = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8),
                                      nn.Linear(8, 8))
            for m in self.body:
                nn.init.normal_(m.weight, std=self.scale * DRAWN[0] * DRAWN[1])

        def forward(self, x):
            return self.body(x + 1e-3 * torch.randn_like(x))
    ''')


def test_python_numpy_and_torch_randomness_in_user_code_is_seeded(tmp_path):
    (tmp_path / "noisy.py").write_text(RANDOM_FORWARD)
    args = ("check", "noisy.py:Noisy", "--input-shape", "8", "--format", "json")
    other_process = run_cli(*args, cwd=tmp_path)
    assert other_process.stdout.startswith("{"), other_process.stderr
    assert invoke(*args, cwd=tmp_path).stdout == other_process.stdout
    assert invoke(*args, "--seed", "3", cwd=tmp_path).stdout != other_process.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--seed", "abc"], ["--seed must be an integer from 0 to 4294967295", "'abc'"]),
        (["--seed", "-1"], ["--seed must be an integer", "'-1'"]),
        (["--seed", "4294967296"], ["--seed must be an integer"]),
    ],
)
def test_a_bad_seed_is_one_line_and_exit_2(args, words):
    result = invoke("check", MLP, *args)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("netdoctor: error: ")
    assert all(w in lines[0] for w in words), lines[0]


def test_a_bad_seed_in_the_config_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.netdoctor]\nseed = "zero"\n')
    result = invoke("check", "x.py:Net", cwd=tmp_path)
    assert result.exit_code == 2
    assert "[tool.netdoctor] seed must be an integer" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_check_and_probe_share_one_seed_option():
    check_help = invoke("check", "--help").stdout
    probe_help = invoke("probe", "--help").stdout

    def seed_help(text: str) -> str:
        start = text.index("--seed")
        return " ".join(text[start:].split("\n  -")[0].split())

    assert seed_help(check_help) == seed_help(probe_help)
    assert check_help.count("--seed") == probe_help.count("--seed") == 1


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "timings_s"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.slow
def test_two_probe_processes_give_the_same_report():
    """Everything but the wall-clock timings (measurements of this machine, not of the model)."""
    import json

    args = ("probe", MLP, "--data", "synthetic", "--steps", "5", "--no-verify", "--format", "json")
    procs = [start_cli(*args), start_cli(*args)]
    outs = [proc.communicate(timeout=600) for proc in procs]
    reports = [_without_timings(json.loads(out)) for out, _ in outs]
    assert reports[0] == reports[1]
    assert reports[0]["measurements"]["loss_curve"]
