"""The pre-commit hook end to end (docs/ci.md, "pre-commit"): `pre-commit run --all-files` in a
temporary git repository whose .pre-commit-config.yaml points at this checkout.

pre-commit installs a `language: python` hook from a committed revision of its repository, so
the hook repository here is a commit of this checkout's working tree (its tracked and untracked,
not ignored, files copied into a temporary repository): the hook definition and the code that
runs are exactly the ones being tested, committed or not. pre-commit builds the hook's
virtualenv once for the module (PRE_COMMIT_HOME in a temporary folder, removed at the end) and
pip-installs netdoctor there with its dependencies; PIP_CONSTRAINT pins torch to the version
installed here, so pip takes that build (the CPU wheel) instead of resolving `torch>=2.2` to a
multi-GB CUDA one. The first run takes 45 to 65 s on 2 cores (mostly torch's install); each run
after it, about 2 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO, run_cli

pytest.importorskip("pre_commit", reason="pre-commit is not installed (pip install -e '.[test]')")

pytestmark = pytest.mark.slow

GIT = ["git", "-c", "user.name=netdoctor-test", "-c", "user.email=test@example.com"]
# Generous: the first run builds the hook's virtualenv (torch included) on a loaded 2-core CI.
INSTALL_TIMEOUT = 1200

SIGMOID_CHAIN = '''\
"""Three sigmoids in series: ND102 (a warning), nothing else."""
from torch import nn


class SigmoidChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(16, 32),
            nn.Sigmoid(),
            nn.Linear(32, 32),
            nn.Sigmoid(),
            nn.Linear(32, 32),
            nn.Sigmoid(),
            nn.Linear(32, 4),
        )

    def forward(self, x):
        return self.layers(x)
'''

HEALTHY = SIGMOID_CHAIN.replace("Sigmoid()", "ReLU()").replace(
    "Three sigmoids in series: ND102 (a warning), nothing else.", "A ReLU MLP: no finding."
)


def git(*args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [*GIT, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=True
    )
    return proc.stdout


@pytest.fixture(scope="module")
def hook_repo(tmp_path_factory) -> tuple[Path, str]:
    """This checkout's working tree, committed in a temporary repository: (path, commit)."""
    try:
        listed = git("ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=REPO)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"this checkout is not a git repository with git available: {e}")
    root = tmp_path_factory.mktemp("hook-repo")
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is left out
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    git("init", "-q", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "this checkout's working tree", cwd=root)
    return root, git("rev-parse", "HEAD", cwd=root).strip()


@pytest.fixture(scope="module")
def hook_env(tmp_path_factory):
    """The environment of the `pre-commit` processes: a private cache for the hook's virtualenv
    (1 GB with torch; removed afterwards) and torch pinned to the installed build."""
    folder = tmp_path_factory.mktemp("pre-commit-home")
    constraints = folder / "constraints.txt"
    constraints.write_text(f"torch=={metadata.version('torch')}\n", encoding="utf-8")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the hook must run the netdoctor installed in its virtualenv
    env.update(
        PRE_COMMIT_HOME=str(folder / "cache"),
        PIP_CONSTRAINT=str(constraints),
        PIP_NO_INPUT="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        NO_COLOR="1",
        COLUMNS="100",
    )
    yield env
    shutil.rmtree(folder / "cache", ignore_errors=True)


def make_project(
    root: Path, model: str, hook_repo: tuple[Path, str], args: str = "", pyproject: str = ""
) -> Path:
    """A git repository with model.py and a .pre-commit-config.yaml using the netdoctor hook
    (with `args`), and a pyproject.toml when given."""
    repo, rev = hook_repo
    root.mkdir()
    (root / "model.py").write_text(model, encoding="utf-8")
    if pyproject:
        (root / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    (root / ".pre-commit-config.yaml").write_text(
        "repos:\n"
        f"  - repo: {repo}\n"
        f"    rev: {rev}\n"
        "    hooks:\n"
        "      - id: netdoctor\n" + (f"        args: {args}\n" if args else ""),
        encoding="utf-8",
    )
    git("init", "-q", cwd=root)
    git("add", "-A", cwd=root)
    return root


def pre_commit_run(project: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pre_commit", "run", "--all-files", "--color", "never"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    output = proc.stdout + proc.stderr
    if "No matching distribution found for torch" in output:
        pytest.skip(f"pip cannot install torch {metadata.version('torch')} into the hook's env")
    return proc


def test_the_hook_fails_on_a_warning_and_shows_the_finding(tmp_path, hook_repo, hook_env):
    project = make_project(tmp_path / "project", SIGMOID_CHAIN, hook_repo)
    proc = pre_commit_run(project, hook_env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "netdoctor check" in output and "Failed" in output, output
    assert "- exit code: 1" in output, output  # netdoctor's gate, not an install failure
    assert "ND102 saturating-activation-chain [warning] model.py:10" in output, output
    assert "3 sigmoid activations in series" in output, output
    assert "0 errors, 1 warning, 0 info" in output, output


def test_a_healthy_model_passes(tmp_path, hook_repo, hook_env):
    project = make_project(tmp_path / "project", HEALTHY, hook_repo)
    proc = pre_commit_run(project, hook_env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "netdoctor check" in output and "Passed" in output, output


def test_add_ignore_accepts_the_findings_and_the_hook_passes(tmp_path, hook_repo, hook_env):
    project = make_project(tmp_path / "project", SIGMOID_CHAIN, hook_repo)
    added = run_cli("check", "model.py", "--add-ignore", cwd=project)
    assert added.returncode == 0, added.stderr
    assert "added 1 ignore comment to 1 file" in added.stderr
    assert "nn.Sigmoid(),  # netdoctor: ignore[ND102]" in (project / "model.py").read_text()
    git("add", "-A", cwd=project)
    proc = pre_commit_run(project, hook_env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Passed" in output, output


def test_args_relax_the_gate_back_to_errors(tmp_path, hook_repo, hook_env):
    """`args: [--fail-on, error]` comes after the hook's `--fail-on warning`: the last wins."""
    project = make_project(tmp_path / "project", SIGMOID_CHAIN, hook_repo, "[--fail-on, error]")
    proc = pre_commit_run(project, hook_env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Passed" in output, output


def test_a_rule_set_to_info_in_pyproject_passes(tmp_path, hook_repo, hook_env):
    pyproject = '[tool.netdoctor.rules.ND102]\nseverity = "info"\n'
    project = make_project(tmp_path / "project", SIGMOID_CHAIN, hook_repo, pyproject=pyproject)
    proc = pre_commit_run(project, hook_env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Passed" in output, output


def test_fail_on_in_pyproject_does_not_relax_the_hook(tmp_path, hook_repo, hook_env):
    """docs/ci.md: the hook's --fail-on is a command-line flag, so it beats the config's."""
    pyproject = '[tool.netdoctor]\nfail-on = "error"\n'
    project = make_project(tmp_path / "project", SIGMOID_CHAIN, hook_repo, pyproject=pyproject)
    proc = pre_commit_run(project, hook_env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "ND102 saturating-activation-chain [warning]" in output, output
