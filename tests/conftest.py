"""Shared helpers: fixture paths and two ways to run the CLI.

- `invoke(...)` runs `netdoctor` in this process with click's CliRunner (fast: torch and the
  fixtures are imported once). Use it for most tests.
- `run_cli(...)` runs `python -m netdoctor` in a fresh subprocess. Use it where the test is about
  the process itself: exit codes as the shell sees them, what reaches stderr (no traceback), and
  which modules get imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

# Under pytest-xdist (one worker per core) each worker and the processes it starts run torch on
# one intra-op thread: two workers with a thread pool each would fight for the same cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
SICK = FIXTURES / "sick"
HEALTHY = FIXTURES / "healthy"
RULE_DOCS = REPO / "rules"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The subprocess must import this checkout's netdoctor even when it is not installed.
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("NO_COLOR", "1")
    env["COLUMNS"] = "120"
    return env


def run_cli(
    *args: Any, cwd: str | os.PathLike | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """`python -m netdoctor ARGS...` in a fresh process (cwd defaults to the repo root)."""
    return subprocess.run(
        [sys.executable, "-m", "netdoctor", *map(str, args)],
        cwd=str(cwd or REPO),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_cli(*args: Any, cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """Like run_cli but returns at once (to run several slow processes side by side)."""
    return subprocess.Popen(
        [sys.executable, "-m", "netdoctor", *map(str, args)],
        cwd=str(cwd or REPO),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_python(
    code: str, cwd: str | os.PathLike | None = None, extra_args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`python [extra_args] -c CODE` in a fresh process."""
    return subprocess.run(
        [sys.executable, *extra_args, "-c", code],
        cwd=str(cwd or REPO),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextmanager
def chdir(path: str | os.PathLike) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def invoke(*args: Any, cwd: str | os.PathLike | None = None) -> Result:
    """`netdoctor ARGS...` in this process (cwd defaults to the repo root). The result has
    .exit_code, .stdout and .stderr (separate streams)."""
    from netdoctor.cli import main

    with chdir(cwd or REPO):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def check_json(*args: Any, cwd: str | os.PathLike | None = None) -> tuple[dict, Result]:
    """`netdoctor check ARGS --format json` in process; returns (parsed report, result)."""
    result = invoke("check", *args, "--format", "json", cwd=cwd)
    assert result.stdout, f"no report (exit {result.exit_code}): {result.stderr}"
    return json.loads(result.stdout), result


def findings_of(report: dict, rule: str | None = None) -> list[dict]:
    """Findings of a single-target report, or of every report of a multi-target one."""
    reports = report.get("reports", [report])
    found = [f for r in reports for f in r["findings"]]
    return [f for f in found if rule is None or f["rule"] == rule]


def line_of(path: Path, needle: str) -> int:
    """1-based number of the first line of `path` containing `needle`."""
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in text:
            return number
    raise AssertionError(f"{needle!r} not found in {path}")


@pytest.fixture(autouse=True, scope="session")
def _no_real_downloads(tmp_path_factory) -> Iterator[None]:
    """No test reaches the internet: a built-in set missing from a test's data folder would be
    downloaded from the public mirrors, so every test (and every CLI subprocess, which inherits
    the environment) gets a mirror that is an empty local folder instead. Tests about downloads
    set their own mirror (a local HTTP server)."""
    empty = tmp_path_factory.mktemp("no-mirror")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NETDOCTOR_DATA_MIRROR", empty.as_uri())
        yield
