"""`netdoctor run SCRIPT.py`: the user's unchanged scripts of fixtures/loops, run in process (the
fast way: torch is imported once) and, where the process itself matters (exit codes, the
traceback on stderr), as `python -m netdoctor run`.

Healthy loops must report no warning or error and end with the very same weights as without
netdoctor; each sick loop must be found, at the user's line."""

from __future__ import annotations

import json
import runpy
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, REPO, invoke, line_of, run_cli

LOOPS = FIXTURES / "loops"
HEALTHY = [
    "plain",
    "accumulation",
    "gan",
    "frozen_backbone",
    "validation",
    "warmup_cosine",
    "cyclic_lr",
    "warm_restarts",
    "one_cycle",
    "transformer",
    "custom_optimizer",
    "mixed_precision",
    "adam_sum_loss",
    "lbfgs",
    "manual_sgd",
]
# script -> (rule, the line it must point at (a needle), exit code)
SICK = {
    "no_zero_grad": ("ND501", "optimizer.step()", 1),
    "lbfgs_no_zero_grad": ("ND501", "loss = optimizer.step(closure)", 1),
    "manual_no_zero_grad": ("ND501", "loss.backward()", 1),
    "replaced_layer": ("ND502", "model.fc = nn.Linear(64, 4)", 1),
    "zero_grad_before_step": ("ND503", "optimizer.step()", 1),
    "eval_mode": ("ND504", "    model.eval()", 0),
    "lr_collapse": ("ND505", "scheduler.step()", 0),
    "cosine_per_batch": ("ND505", "scheduler.step()", 0),
    "softmax_cross_entropy": ("ND506", "loss = criterion(", 1),
    "bce_on_logits": ("ND506", "loss = criterion(", 1),
    "broadcast_mse": ("ND507", "loss = criterion(", 1),
    "nan_ignore_index": ("ND401", "loss = F.cross_entropy(", 1),
    "nan_attention_mask": ("ND401", "self.attn = nn.MultiheadAttention", 1),
    "vanishing": ("ND403", "layers += [nn.Linear", 0),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_json(*args, tmp_path: Path, cwd=None) -> tuple[dict, object]:
    """`netdoctor run -o report.json ARGS` in process: (report, click result)."""
    out = tmp_path / "report.json"
    result = invoke("run", "--format", "json", "-o", out, *args, cwd=cwd)
    assert out.is_file(), f"no report (exit {result.exit_code}): {result.stderr}"
    return json.loads(out.read_text()), result


def bare_run(script: Path, *args: str) -> None:
    """The script as `python script.py ARGS` runs it (in this process)."""
    saved = list(sys.argv)
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved


def tensors(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}{k}.")
    else:
        yield prefix, obj


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_loop_is_clean_and_trains_exactly_as_without_netdoctor(name, tmp_path):
    script = LOOPS / f"{name}.py"
    bare_run(script, "--save", str(tmp_path / "bare.pt"))
    report, result = run_json(script, "--save", tmp_path / "watched.pt", tmp_path=tmp_path)
    assert result.exit_code == 0, result.stderr
    loud = [
        (f["rule"], f["message"])
        for f in report["findings"]
        if f["severity"] in ("warning", "error")
    ]
    assert not loud, loud
    assert not [n for n in report["notes"] if "internal netdoctor error" in n]
    assert report["measurements"]["run"]["steps"] > 0
    bare = dict(tensors(torch.load(tmp_path / "bare.pt")))
    watched = dict(tensors(torch.load(tmp_path / "watched.pt")))
    assert bare.keys() == watched.keys()
    assert all(torch.equal(bare[k], watched[k]) for k in bare), [
        k for k in bare if not torch.equal(bare[k], watched[k])
    ]


@pytest.mark.parametrize("name", sorted(SICK))
def test_sick_loop_is_found_at_the_users_line(name, tmp_path):
    rule, needle, code = SICK[name]
    script = LOOPS / f"{name}.py"
    report, result = run_json(script, tmp_path=tmp_path)
    found = [f for f in report["findings"] if f["rule"] == rule]
    assert found, [(f["rule"], f["message"]) for f in report["findings"]]
    assert result.exit_code == code, result.stderr
    loc = found[0]["location"]
    assert loc is not None and Path(loc["path"]).name == script.name
    assert loc["line"] == line_of(script, needle), (found[0]["message"], needle)
    assert found[0]["fix"] is not None


def test_nd501_points_at_the_step_and_the_fix_adds_zero_grad(tmp_path):
    script = LOOPS / "no_zero_grad.py"
    report, result = run_json(script, tmp_path=tmp_path)
    f = next(f for f in report["findings"] if f["rule"] == "ND501")
    assert report["summary"]["fix_first"] == "ND501"
    assert f["location"]["line"] == line_of(script, "optimizer.step()")
    assert f["fix"]["kind"] == "diff"
    assert "+    optimizer.zero_grad()\n" in f["fix"]["patch"]
    assert f["evidence"]["stale_steps"] == f["evidence"]["steps"] - 1
    assert "ND501 grads-not-cleared" in result.stderr  # announced while it ran


def test_nan_is_localised_to_the_attention_and_to_the_loss(tmp_path):
    report, _ = run_json(LOOPS / "nan_attention_mask.py", tmp_path=tmp_path)
    f = next(f for f in report["findings"] if f["rule"] == "ND401")
    assert f["module"] == "attn" and f["evidence"]["step"] == 4
    assert "key_padding_mask masks every key of 1 of the 8 sequences" in f["message"]
    report, _ = run_json(LOOPS / "nan_ignore_index.py", tmp_path=tmp_path)
    f = next(f for f in report["findings"] if f["rule"] == "ND401")
    assert f["evidence"]["kind"] == "loss" and f["evidence"]["step"] == 6
    assert "every one of the 160 targets of this batch equals ignore_index (-100)" in f["message"]


def test_stop_on_error_stops_a_nan_run_with_the_report(tmp_path):
    report, result = run_json(
        "--stop-on", "error", LOOPS / "nan_ignore_index.py", tmp_path=tmp_path
    )
    assert result.exit_code == 1
    assert report["measurements"]["run"]["steps"] == 6  # of 20
    assert report["measurements"]["run"]["stopped"] == "stop-on"
    assert (
        "netdoctor: stopped training at step 6 (--stop-on error): ND401 non-finite" in result.stderr
    )


def test_script_sees_python_semantics(tmp_path):
    script = tmp_path / "sub" / "train.py"
    script.parent.mkdir()
    (script.parent / "helper.py").write_text("VALUE = 7\n")
    script.write_text(
        textwrap.dedent("""\
        import json, sys
        import helper  # found because sys.path[0] is the script's folder
        print(json.dumps({"name": __name__, "argv": sys.argv, "path0": sys.path[0],
                          "value": helper.VALUE}))
        """)
    )
    result = invoke(
        "run",
        "--format",
        "json",
        "-o",
        tmp_path / "r.json",
        script,
        "--epochs",
        "3",
        "--format",
        "x",
    )
    assert result.exit_code == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[0])
    assert seen == {
        "name": "__main__",
        "argv": [str(script), "--epochs", "3", "--format", "x"],
        "path0": str(script.parent),
        "value": 7,
    }


def test_module_mode_runs_as_python_dash_m(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text((LOOPS / "no_zero_grad.py").read_text())
    report, result = run_json("-m", "mypkg.train", "--steps", "5", tmp_path=tmp_path, cwd=tmp_path)
    assert result.exit_code == 1, result.stderr
    f = next(f for f in report["findings"] if f["rule"] == "ND501")
    assert f["location"]["path"].endswith("mypkg/train.py")
    assert report["measurements"]["run"]["steps"] == 5
    assert report["target"] == "-m mypkg.train"


def test_sys_exit_code_and_keyboard_interrupt(tmp_path):
    body = textwrap.dedent("""\
        import sys
        import torch
        from torch import nn
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
        """)
    (tmp_path / "exits.py").write_text(body + "sys.exit(3)\n")
    (tmp_path / "done.py").write_text(body + "sys.exit(0)\n")
    (tmp_path / "interrupted.py").write_text(body + "raise KeyboardInterrupt\n")
    report, result = run_json(tmp_path / "exits.py", tmp_path=tmp_path)
    assert result.exit_code == 3 and report["measurements"]["run"]["steps"] == 3
    assert invoke("run", tmp_path / "done.py").exit_code == 0
    report, result = run_json(tmp_path / "interrupted.py", tmp_path=tmp_path)
    assert result.exit_code == 130
    assert result.stderr.rstrip().endswith("KeyboardInterrupt")
    assert report["measurements"]["run"]["stopped"] == "interrupted"


@pytest.mark.slow
def test_a_failing_script_shows_its_traceback_then_the_report():
    """As a process: the user's traceback as Python prints it (no netdoctor or runpy frames),
    the report on stdout, and the script's exit code."""
    script = LOOPS / "bce_on_logits.py"
    result = run_cli("run", script)
    assert result.returncode == 1
    err = result.stderr
    assert err.startswith("Traceback (most recent call last):\n"), err
    first = err.splitlines()[1]
    assert (
        first == f'  File "{script}", line {line_of(script, "loss = criterion(")}, in <module>'
    ), first
    assert "netdoctor" not in err.split("Traceback", 1)[1].split("RuntimeError")[0]
    assert err.rstrip().endswith("RuntimeError: all elements of input should be between 0 and 1")
    assert "ND506 loss-pairing [error]" in result.stdout
    assert "BCELoss was fed values outside [0, 1]" in result.stdout


@pytest.mark.slow
def test_compiled_model_runs_unchanged_with_a_note(tmp_path):
    script = LOOPS / "compiled.py"
    bare_run(script, "--save", str(tmp_path / "bare.pt"))
    report, result = run_json(script, "--save", tmp_path / "watched.pt", tmp_path=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert not [f for f in report["findings"] if f["severity"] in ("warning", "error")]
    assert any("compiled with torch.compile: not instrumented" in n for n in report["notes"])
    bare, watched = torch.load(tmp_path / "bare.pt"), torch.load(tmp_path / "watched.pt")
    assert all(torch.equal(bare[k], watched[k]) for k in bare)


def test_usage_errors_are_one_line(tmp_path):
    for args, words in (
        (["run"], "no script given"),
        (["run", "nope.py"], "nope.py: no such file"),
        (["run", "-m"], "-m needs a module name"),
        (["run", "-m", "no_such_module_xyz"], "no module named"),
        (["run", "--every", "0", "x.py"], "every must be a positive"),
    ):
        result = invoke(*args, cwd=tmp_path)
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.startswith("netdoctor: error: ") and words in result.stderr, (
            result.stderr
        )
        assert "Traceback" not in result.stderr


def test_config_table_sets_the_schedule(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.netdoctor.run]\nevery = 7\nstop-on = "never"\n')
    report, _ = run_json(
        LOOPS / "no_zero_grad.py", "--steps", "15", tmp_path=tmp_path, cwd=tmp_path
    )
    assert report["measurements"]["run"]["schedule"]["every"] == 7
    (tmp_path / "pyproject.toml").write_text("[tool.netdoctor.run]\nevry = 7\n")
    result = invoke("run", LOOPS / "no_zero_grad.py", cwd=tmp_path)
    assert result.exit_code == 2 and "unknown key(s) in [tool.netdoctor.run]: evry" in result.stderr


def test_repo_loop_readme_lists_every_script():
    readme = (LOOPS / "README.md").read_text()
    for script in sorted(LOOPS.glob("*.py")):
        assert f"`{script.name}`" in readme, script.name
    assert REPO.joinpath("rules", "ND501.md").is_file()


def test_watch_inside_a_run_script_joins_the_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        (LOOPS / "no_zero_grad.py")
        .read_text()
        .replace(
            "for step in range(args.steps):",
            "import netdoctor\ndoctor = netdoctor.watch(model, optimizer)\n"
            "for step in range(args.steps):",
        )
        + "doctor.close()\n"
    )
    report, result = run_json(script, "--steps", "6", tmp_path=tmp_path)
    assert result.exit_code == 1, result.stderr
    assert [f["rule"] for f in report["findings"]] == ["ND501"]
    assert report["target"].endswith("train.py")


def test_a_module_hashing_its_own_state_runs_unchanged(tmp_path):
    """torchmetrics' Metric (Lightning's self.log) hashes state that does not exist yet while
    nn.Module.__init__ runs: recording construction sites must not call it."""
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent("""\
        import torch
        from torch import nn

        class Metric(nn.Module):
            def __init__(self):
                super().__init__()
                self._defaults = {"total": 0}

            def __hash__(self):
                return hash(tuple(self._defaults))

        metric = Metric()
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
        print("done", hash(metric) == hash(("total",)))
        """)
    )
    report, result = run_json(script, tmp_path=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "done True" in result.stdout
    assert report["measurements"]["run"]["steps"] == 3
