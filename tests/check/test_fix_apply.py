"""Fixes as patches a user applies: every diff fix of the sick fixtures cures its finding on a
copy of the file and leaves a model that runs; `check --diff` merges a file's fixes into one
patch `git apply` takes; `check --fix` / `--unsafe-fixes` write them in place and re-check."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import SICK, chdir, invoke
from netdoctor.check import CheckOptions, check
from netdoctor.findings import Finding, Fix, Location, Report, Severity
from netdoctor.fixes.apply import fix_until_clean, merge, writable

SHAPES = {"alexnet.py": (1, 224, 224), "tied_embedding.py": (16,)}
TOKENS = {"tied_embedding.py"}  # models of token ids (long, below their 1000-token vocabulary)
FIXABLE_FIXTURES = sorted(p.name for p in SICK.glob("*.py"))


def reports_of(target: str, shape) -> list[Report]:
    dtype = "long" if target.partition(":")[0].rpartition("/")[2] in TOKENS else "float32"
    reports, _ = check(target, CheckOptions(input_shape=shape, input_dtype=dtype))
    return reports


def runs(target: str, shape) -> None:
    from netdoctor.loading.target import load

    for loaded in load(target).models:
        model = loaded.model.eval()
        tokens = target.rpartition("/")[2] in TOKENS
        x = torch.randint(0, 1000, (2, *shape)) if tokens else torch.randn(2, *shape)
        with torch.no_grad():
            out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape[0] == 2 and torch.isfinite(out).all(), loaded.target


def diff_fixes(reports: list[Report]) -> list[tuple[str, Finding]]:
    return [
        (r.target.rpartition(":")[2], f)
        for r in reports
        for f in r.findings
        if f.fix and f.fix.kind == "diff"
    ]


@pytest.mark.parametrize("filename", FIXABLE_FIXTURES)
def test_each_patch_cures_its_finding_and_the_model_still_runs(filename, tmp_path):
    """Apply one fix at a time to a fresh copy of the fixture: that rule fires fewer times on
    that model (or not at all), and every model in the file still builds and runs forward."""
    shape = SHAPES.get(filename, (1, 28, 28))
    with chdir(SICK):
        fixes = diff_fixes(reports_of(filename, shape))
    if filename == "forward_error.py":  # its ND002 fix is the only one: the file is broken
        assert [f.rule for _, f in fixes] == ["ND002"]
    for i, (cls, finding) in enumerate(fixes):
        copy = tmp_path / str(i) / filename
        copy.parent.mkdir()
        copy.write_text(finding.fix.new_source, encoding="utf-8")
        with chdir(copy.parent):
            before = sum(
                1
                for f in next(r for r in reports_of(f"{SICK / filename}:{cls}", shape)).findings
                if f.rule == finding.rule
            )
            after = [f for r in reports_of(f"{filename}:{cls}", shape) for f in r.findings]
            runs(filename, shape)
        still = [f for f in after if f.rule == finding.rule]
        assert len(still) < before, (finding.rule, finding.module, [f.message for f in still])
        assert not any(f.rule == "ND002" for f in after), [f.message for f in after]


# ------------------------------------------------------------------------- --fix end to end


def copy_fixture(tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copy(SICK / name, target)
    return target


def test_fix_inserts_batchnorm_into_alexnet_and_keeps_the_file_formatting(tmp_path):
    path = copy_fixture(tmp_path, "alexnet.py")
    original = path.read_text()
    result = invoke(
        "check", "alexnet.py:AlexNet", "--input-shape", "1,224,224", "--fix", cwd=tmp_path
    )
    fixed = path.read_text()
    assert "fixed alexnet.py: ND101 deep-plain-stack" in result.stderr
    assert fixed.count("nn.BatchNorm2d(") == 5 and fixed.count("nn.BatchNorm1d(4096)") == 2
    # The second round fixes what the first made redundant: conv/linear bias before BatchNorm.
    assert "ND109" in result.stderr and fixed.count("bias=False") == 7
    # Comments, the docstring and untouched lines are kept byte for byte.
    assert fixed.startswith(original.split("class AlexNet")[0])
    kept = [
        line
        for line in original.splitlines()
        if "nn.Conv2d" not in line and "nn.Linear(" not in line
    ]
    assert all(line in fixed.splitlines() for line in kept)
    assert "no problems found" in result.stdout and result.exit_code == 0
    again = invoke(
        "check",
        "alexnet.py:AlexNet",
        "--input-shape",
        "1,224,224",
        "--format",
        "json",
        cwd=tmp_path,
    )
    assert json.loads(again.stdout)["findings"] == []
    with chdir(tmp_path):
        runs("alexnet.py:AlexNet", (1, 224, 224))


def test_fix_leaves_behaviour_changing_fixes_to_unsafe_fixes(tmp_path):
    path = copy_fixture(tmp_path, "softmax_output.py")
    original = path.read_text()
    safe = invoke("check", "softmax_output.py", "--input-shape", "1,28,28", "--fix", cwd=tmp_path)
    assert path.read_text() == original
    assert "0 fixes applied" in safe.stderr and "fixable with --unsafe-fixes" in safe.stderr
    assert "ND105 softmax-output" in safe.stdout  # still reported

    unsafe = invoke(
        "check", "softmax_output.py", "--input-shape", "1,28,28", "--unsafe-fixes", cwd=tmp_path
    )
    assert "ND105 softmax-output" in unsafe.stderr
    code = path.read_text().split('"""', 2)[2]  # after the module docstring
    assert "nn.Softmax(" not in code and "F.softmax(" not in code and "F.log_softmax(" not in code
    assert unsafe.exit_code == 0 and "no problems found" in unsafe.stdout, unsafe.stdout


def test_fix_output_keeps_stdout_machine_readable(tmp_path):
    copy_fixture(tmp_path, "bias_before_bn.py")
    result = invoke(
        "check",
        "bias_before_bn.py",
        "--input-shape",
        "1,28,28",
        "--fix",
        "--format",
        "json",
        cwd=tmp_path,
    )
    assert json.loads(result.stdout)["findings"] == []
    assert "3 fixes applied to 1 file, 0 findings left" in result.stderr


def test_fix_and_diff_together_is_a_usage_error(tmp_path):
    result = invoke("check", str(SICK / "alexnet.py"), "--fix", "--diff")
    assert result.exit_code == 2 and "use one of the two" in result.stderr


# ---------------------------------------------------------------------------- --diff


def test_diff_merges_every_fix_of_a_file_into_one_patch_git_applies(tmp_path):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git not installed")
    names = ["bias_before_bn.py", "sigmoid_mlp.py", "double_relu.py", "list_layers.py"]
    for name in names:
        copy_fixture(tmp_path, name)
    result = invoke("check", *names, "--input-shape", "1,28,28", "--diff", cwd=tmp_path)
    patch = result.stdout
    assert patch.count("--- a/") == len(names), patch  # one patch per file
    (tmp_path / "all.patch").write_text(patch)
    subprocess.run([git, "init", "-q"], cwd=tmp_path, check=True)
    applied = subprocess.run(
        [git, "apply", "all.patch"], cwd=tmp_path, capture_output=True, text=True
    )
    assert applied.returncode == 0, applied.stderr
    after = invoke("check", *names, "--input-shape", "1,28,28", "--format", "json", cwd=tmp_path)
    left = {
        (r["target"].split(":")[0], f["rule"])
        for r in json.loads(after.stdout)["reports"]
        for f in r["findings"]
    }
    cured = {
        ("bias_before_bn.py", "ND109"),
        ("sigmoid_mlp.py", "ND101"),
        ("sigmoid_mlp.py", "ND102"),
        ("double_relu.py", "ND111"),
        ("list_layers.py", "ND104"),
    }
    assert not left & cured, left
    with chdir(tmp_path):
        for name in names:
            runs(name, (1, 28, 28))


# ------------------------------------------------------------------- merging and safety


def finding(rule: str, new_source: str, path: str = "m.py", safe: bool = True) -> Finding:
    return Finding(
        rule,
        rule.lower(),
        Severity.WARNING,
        "msg",
        module=rule,
        location=Location(path, 1),
        fix=Fix("summary", "patch", "diff", path, safe, new_source=new_source),
    )


def test_merge_combines_separate_edits_and_skips_colliding_ones():
    old = "a\nb\nc\nd\n"
    first = finding("ND101", "a\nB\nc\nd\n")  # replaces line 2
    second = finding("ND109", "a\nb\nc\nd\ne\n")  # appends a line
    clash = finding("ND203", "a\nX\nc\nd\n")  # also replaces line 2
    plan = merge("m.py", old, [first, second, clash])
    assert plan.new == "a\nB\nc\nd\ne\n"
    assert [f.rule for f in plan.merged] == ["ND101", "ND109"]
    assert [f.rule for f in plan.skipped] == ["ND203"]


def test_merge_counts_a_patch_offered_twice_once():
    old = "a\nb\n"
    plan = merge("m.py", old, [finding("ND201", "a\nb\nc\n"), finding("ND204", "a\nb\nc\n")])
    assert plan.new == "a\nb\nc\n" and len(plan.merged) == 2 and not plan.skipped


def test_a_round_that_breaks_the_model_is_undone(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("x = 1\n")

    def run_check():
        text = path.read_text()
        if "broken" in text:
            return [
                Report(
                    "m.py:Net",
                    findings=[
                        Finding("ND002", "forward-failure", Severity.ERROR, "forward raised")
                    ],
                )
            ]
        return [Report("m.py:Net", findings=[finding("ND101", "x = 1  # broken\n", str(path))])]

    outcome = fix_until_clean(run_check, unsafe=False, allowed_roots=[tmp_path])
    assert path.read_text() == "x = 1\n"
    assert outcome.applied == [] and "no longer runs" in outcome.messages[0]
    assert [f.rule for f in outcome.reports[0].findings] == ["ND101"]


def test_a_fix_that_does_not_cure_its_finding_is_written_once(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("x = 1\n")

    def run_check():  # the finding survives every fix: the loop must not keep appending
        return [
            Report("m.py:Net", findings=[finding("ND101", path.read_text() + "y = 2\n", str(path))])
        ]

    outcome = fix_until_clean(run_check, unsafe=False, allowed_roots=[tmp_path])
    assert path.read_text() == "x = 1\ny = 2\n" and len(outcome.applied) == 1


def test_files_outside_the_project_are_never_written(tmp_path):
    import sys

    assert writable(str(tmp_path / "model.py"), [tmp_path])
    assert not writable(str(Path(torch.__file__)), [Path("/")])
    assert not writable(str(Path(sys.prefix) / "lib" / "x.py"), [Path("/")])
    assert not writable("/elsewhere/model.py", [tmp_path])


# ------------------------------------------------------------ where a BatchNorm can go

LAYERS = """import torch.nn as nn


class M(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        layers = [nn.Conv2d(1, width, 3), nn.ReLU()]  # one line, two calls
        for _ in range(3):
            layers.append(nn.Conv2d(width, width, 3))
            layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)
"""


def test_batchnorm_goes_after_the_layer_in_a_list_and_after_an_append_in_a_loop():
    from netdoctor.fixes.patch import insert_args_after

    new = insert_args_after(
        LAYERS, {7: "nn.BatchNorm2d(width)", 9: "nn.BatchNorm2d(width)"}, types=("Conv2d",)
    )
    assert (
        "layers = [nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU()]  # one line, "
        "two calls" in new
    )
    assert (
        "            layers.append(nn.Conv2d(width, width, 3))\n"
        "            layers.append(nn.BatchNorm2d(width))\n"
        "            layers.append(nn.ReLU())\n"
    ) in new
    namespace: dict = {}
    exec(compile(new, "m.py", "exec"), namespace)
    body = namespace["M"]().body
    assert [type(m).__name__ for m in body][:3] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert len(body) == 3 * 4  # conv, bn, relu: the block in the list and 3 from the loop


def test_fix_works_on_a_dotted_module_target_in_the_current_folder(tmp_path):
    """`netdoctor check pkg.model:Net --fix` from the project root (no PYTHONPATH, as with
    `python -m`): the module file is patched and re-imported for the re-check."""
    package = tmp_path / "ndfixpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(SICK / "bn_momentum.py", package / "model.py")
    result = invoke(
        "check",
        "ndfixpkg.model:KerasMomentumNet",
        "--input-shape",
        "1,28,28",
        "--fix",
        cwd=tmp_path,
    )
    assert "2 fixes applied to 1 file, 0 findings left" in result.stderr, result.stderr
    assert (package / "model.py").read_text().count(", momentum=0.1)") == 2
    assert result.exit_code == 0
