"""Committed JSON reports: what netdoctor says about every fixture, in tests/snapshots/.

One file per (command, target), named by the target (`Target.name`):

* every rule's `fixture` and `healthy` counterpart (`netdoctor.rules.base.Fixture`: a check, a
  probe or a run), named by the Fixture's `name` or derived from its target;
* `check/` for every model of fixtures/sick and fixtures/healthy, as discovered;
* `probe/` for the probe fixtures of PROBES (the verified fixes the tests describe);
* `run/` for every script of fixtures/loops.

A report is compared after `normalize`: what changes from run to run (timings, netdoctor's own
cost) is masked, floats are rounded to 6 significant digits. The per-step `curves` (what the
html report draws: thousands of floats that pin no judgement) are left out; tests/report and
tests/cli/test_html_cli.py test them.

Update after a deliberate change of output (and say why in the commit):

    NETDOCTOR_UPDATE_SNAPSHOTS=1 python -m pytest tests/rules/test_snapshots.py
    python tests/snapshot.py [check|probe|run|NAME ...]   # the same, in parallel processes

A missing snapshot is written by the test that needs it (which then fails: check it, commit it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # run as a script: this checkout's netdoctor
    sys.path.insert(0, str(REPO / "src"))
SNAPSHOTS = REPO / "tests" / "snapshots"
FIXTURES = REPO / "fixtures"
UPDATE = os.environ.get("NETDOCTOR_UPDATE_SNAPSHOTS") == "1"

_MASK = "<masked>"
_TIMING_KEYS = {
    "timings_s",
    "hook_seconds",
    "static_seconds",
    "exchange_seconds",
    "seconds",
    "wall_s",
}
_TIMED_NOTES = (re.compile(r"^netdoctor's measurements took "), re.compile(r"took [\d.]+ ?s"))


@dataclass(frozen=True)
class Target:
    """One snapshot: `netdoctor COMMAND ARGS... --format json`, stored as COMMAND/NAME.json."""

    command: str  # "check" | "probe" | "run"
    name: str  # the file's stem: fixture file and class, or loop script
    args: tuple[str, ...]
    torchrun: bool = False  # `run` under torchrun, 2 gloo ranks

    @property
    def path(self) -> Path:
        return SNAPSHOTS / self.command / f"{self.name}.json"


# -- what is snapshotted --------------------------------------------------------------------


def snapshot_name(target: str) -> str:
    """fixtures/sick/bad_init.py:TinyInitMLP -> sick__bad_init__TinyInitMLP;
    fixtures/loops/plain.py -> plain (a loop script: its stem)"""
    path, _, cls = target.partition(":")
    parts = Path(path).with_suffix("").parts[1:]  # without "fixtures"
    if parts and parts[0] == "loops" and not cls:
        return parts[-1]
    return "__".join([*parts, cls] if cls else parts)


TORCHRUN = {"ddp", "ddp_bypass", "fsdp"}  # loop scripts that run on 2 ranks


def target_of(fixture: Any) -> Target:
    """The snapshot of a rule's Fixture: named by its `name`, else by its target."""
    name = fixture.name or snapshot_name(fixture.args[0])
    torchrun = fixture.command == "run" and Path(fixture.args[0]).stem in TORCHRUN
    return Target(fixture.command, name, tuple(fixture.args), torchrun)


def rule_targets() -> dict[str, tuple[Target, Target]]:
    """{rule ID: (its fixture, its healthy counterpart)}, from the rule units."""
    from netdoctor.rules.registry import all_rules

    out = {}
    for rule_id, rule in all_rules().items():
        if rule.fixture is None or rule.healthy is None:
            raise AssertionError(f"{rule_id} names no fixture and healthy counterpart")
        out[rule_id] = (target_of(rule.fixture), target_of(rule.healthy))
    return out


def check_targets() -> list[Target]:
    """Every model of fixtures/sick and fixtures/healthy: the committed snapshots name them
    (`discover_check_targets` finds them afresh). Variants with flags are rules' fixtures."""
    out = []
    for path in sorted((SNAPSHOTS / "check").glob("*.json")):
        target = json.loads(path.read_text(encoding="utf-8"))["target"]
        if path.stem == snapshot_name(target) and target.startswith(
            ("fixtures/sick/", "fixtures/healthy/")
        ):
            out.append(Target("check", path.stem, (target,)))
    return out


def discover_check_targets() -> list[Target]:
    """The models `netdoctor check fixtures/sick fixtures/healthy` discovers, one target each
    (built, not checked)."""
    from netdoctor.loading.target import load

    old = os.getcwd()
    os.chdir(REPO)
    try:
        models = [
            m for folder in ("fixtures/sick", "fixtures/healthy") for m in load(folder).models
        ]
    finally:
        os.chdir(old)
    return [Target("check", snapshot_name(m.target), (m.target,)) for m in models]


# The probe fixtures: every sick fixture whose verified fix the tests describe, the README's
# first command, and healthy models that must stay clean. `--steps 100` keeps the time budget
# (which depends on the machine) out of it. (The rules' fixtures add their own.)
PROBES: dict[str, tuple[str, ...]] = {
    "sick__lenet_sigmoid__LeNet": ("fixtures/sick/lenet_sigmoid.py:LeNet",),
    "sick__sigmoid_mlp__SigmoidMLP": ("fixtures/sick/sigmoid_mlp.py:SigmoidMLP",),
    "sick__zero_init__ZeroHiddenMLP": ("fixtures/sick/zero_init.py:ZeroHiddenMLP",),
    "sick__bad_init__TinyInitMLP": ("fixtures/sick/bad_init.py:TinyInitMLP",),
    "sick__bad_init__DeepTanhMLP": ("fixtures/sick/bad_init.py:DeepTanhMLP",),
    "sick__bad_init__DeepReLUMLP": ("fixtures/sick/bad_init.py:DeepReLUMLP",),
    "sick__relu_logits__ReluLogitsNet": ("fixtures/sick/relu_logits.py:ReluLogitsNet",),
    "sick__softmax_output__SoftmaxNet": ("fixtures/sick/softmax_output.py:SoftmaxNet",),
    "sick__untraceable_plain__GatedDeepNet": ("fixtures/sick/untraceable_plain.py:GatedDeepNet",),
    "sick__bn_momentum__KerasMomentumNet__momentum0": (
        "fixtures/sick/bn_momentum.py:KerasMomentumNet",
        "-a",
        "momentum=0",
    ),
    "sick__mlp__MLP": ("fixtures/sick/mlp.py:MLP",),
    "sick__detached__DetachedFeatures": ("fixtures/sick/detached.py:DetachedFeatures",),
    "sick__linear_collapse__CollapsedMLP": ("fixtures/sick/linear_collapse.py:CollapsedMLP",),
    "healthy__lenet_relu__LeNet": ("fixtures/healthy/lenet_relu.py:LeNet",),
    "healthy__mlp_normalized__MLP": ("fixtures/healthy/mlp_normalized.py:MLP",),
}


def probe_targets() -> list[Target]:
    return [
        Target("probe", name, (*args, "--data", "synthetic", "--steps", "100"))
        for name, args in PROBES.items()
    ]


def run_targets() -> list[Target]:
    """Every script of fixtures/loops, as it runs with no arguments."""
    return [
        Target("run", path.stem, (f"fixtures/loops/{path.name}",), path.stem in TORCHRUN)
        for path in sorted((FIXTURES / "loops").glob("*.py"))
    ]


def all_targets() -> list[Target]:
    """Every snapshot, once: the rules' fixtures first, then the other check models, probe
    fixtures and loop scripts. Two targets of one name must be the same command."""
    found: dict[tuple[str, str], Target] = {}
    named = [t for pair in rule_targets().values() for t in pair]
    for t in named + check_targets() + probe_targets() + run_targets():
        seen = found.setdefault((t.command, t.name), t)
        if seen != t:
            raise AssertionError(f"two targets named {t.command}/{t.name}: {seen} and {t}")
    return list(found.values())


def other_targets() -> list[Target]:
    """The targets no rule names as its fixture or healthy counterpart."""
    named = {t for pair in rule_targets().values() for t in pair}
    return [t for t in all_targets() if t not in named]


# -- comparing ------------------------------------------------------------------------------


def normalize(value: Any, key: str | None = None) -> Any:
    """The report with run-to-run noise masked: timing fields, notes that quote netdoctor's own
    time, floats beyond 6 significant digits, and this checkout's own folder in paths; without
    a report's `curves`."""
    if key in _TIMING_KEYS:
        return _MASK if not isinstance(value, dict) else {k: _MASK for k in value}
    if isinstance(value, dict):
        report = "findings" in value and "target" in value
        return {k: normalize(v, k) for k, v in value.items() if not (report and k == "curves")}
    if isinstance(value, list):
        if key == "notes":
            return [
                _MASK
                if isinstance(n, str) and any(p.search(n) for p in _TIMED_NOTES)
                else normalize(n)
                for n in value
            ]
        return [normalize(v) for v in value]
    if isinstance(value, str):
        return value.replace(f"{REPO}{os.sep}", "")  # a path of this checkout, relative
    if isinstance(value, float):
        return (
            float(f"{value:.6g}") if value == value and abs(value) != float("inf") else repr(value)
        )
    return value


def read(target: Target) -> Any:
    return json.loads(target.path.read_text(encoding="utf-8"))


def committed(command: str, name: str) -> Any:
    """A committed report, to test what it says (the snapshot tests keep it equal to what
    netdoctor reports now): non-finite floats, stored as "nan"/"inf"/"-inf", are floats again."""

    def restore(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        if value in ("nan", "inf", "-inf"):
            return float(value)
        return value

    return restore(json.loads((SNAPSHOTS / command / f"{name}.json").read_text(encoding="utf-8")))


def write(target: Target, report: Any) -> None:
    target.path.parent.mkdir(parents=True, exist_ok=True)
    target.path.write_text(
        json.dumps(normalize(report), indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )


def assert_matches(target: Target, report: Any) -> None:
    """The report equals the committed snapshot (or, with NETDOCTOR_UPDATE_SNAPSHOTS=1,
    becomes it)."""
    if UPDATE or not target.path.is_file():
        write(target, report)
        if not UPDATE:
            raise AssertionError(
                f"{target.path.relative_to(REPO)} was missing: written; check it and commit it"
            )
        return
    expected = read(target)
    got = json.loads(json.dumps(normalize(report), sort_keys=True))
    if got != expected:
        raise AssertionError(
            f"{target.command} {' '.join(target.args)} differs from "
            f"{target.path.relative_to(REPO)}:\n" + _diff(expected, got)
        )


def _diff(expected: Any, got: Any) -> str:
    import difflib

    a = json.dumps(expected, indent=1, sort_keys=True).splitlines()
    b = json.dumps(got, indent=1, sort_keys=True).splitlines()
    return "\n".join(list(difflib.unified_diff(a, b, "snapshot", "now", lineterm="", n=2))[:80])


# -- producing ------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(NO_COLOR="1", COLUMNS="120", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def produce(target: Target, timeout: float = 600) -> tuple[Any, subprocess.CompletedProcess]:
    """Run the target's command in a fresh process from the repository root: (JSON report,
    the finished process)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        if target.command == "run":
            cli = ["-m", "netdoctor", "run", "--format", "json", "-o", str(out), *target.args]
        else:
            cli = [
                "-m",
                "netdoctor",
                target.command,
                *target.args,
                "--format",
                "json",
                "-o",
                str(out),
            ]
        if target.torchrun:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(_free_port()),
                *cli,
            ]
        else:
            cmd = [sys.executable, *cli]
        proc = subprocess.run(
            cmd,
            cwd=str(REPO),
            env=environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if not out.is_file():
            raise RuntimeError(
                f"{target.name}: no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        return json.loads(out.read_text(encoding="utf-8")), proc


def main(argv: list[str]) -> int:
    """Write the snapshots named (a command: all of its targets; else a snapshot's name;
    default: all), two processes at a time. Check models are discovered afresh."""
    committed = set(check_targets())
    targets = discover_check_targets() + [t for t in all_targets() if t not in committed]
    if argv:
        targets = [t for t in targets if t.command in argv or t.name in argv]

    def one(target: Target) -> str:
        report, _ = produce(target)
        write(target, report)
        return f"{target.command}/{target.name}"

    with ThreadPoolExecutor(max_workers=2) as pool:
        for name in pool.map(one, targets):
            print(name, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
