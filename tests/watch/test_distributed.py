"""torchrun: `torchrun --nproc_per_node 2 -m netdoctor run SCRIPT` on the gloo backend (two CPU
processes), as a user runs it: rank 0 writes the one report; a healthy DDP loop reports nothing
and trains bit for bit as without netdoctor; a module called outside its DDP wrapper is ND508,
once, at that line; a NaN on one rank is named with its rank; a rank that raises, and ranks that
run out of batches at different steps, never hang the job.

The torchrun jobs are slow to start (three processes import torch each), so they run a few at a
time in the background (`jobs`) while the tests wait for theirs; every job has a deadline. The
fast tests at the end check the pieces in this process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import FIXTURES, REPO, RULE_DOCS, _env, line_of
from netdoctor import docs
from netdoctor.findings import Finding, Location, Report, Severity

LOOPS = FIXTURES / "loops"
HTML = importlib.util.find_spec("plotly") is not None  # the [html] extra
DEADLINE = 300  # seconds a torchrun job may take on a loaded 2-core machine
RUNNING = 3  # torchrun jobs at a time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Jobs:
    """torchrun jobs started in the background, at most RUNNING at a time, in the order asked."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.queued: list[tuple[str, list[str]]] = []
        self.running: dict[str, tuple[subprocess.Popen, float]] = {}
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def add(self, name: str, *args: object) -> None:
        self.queued.append((name, [str(a) for a in args]))

    def _start(self, name: str, args: list[str]) -> None:
        env = _env()
        env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            *args,
        ]
        proc = subprocess.Popen(
            cmd,
            cwd=str(REPO),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.running[name] = (proc, time.monotonic())

    def _poll(self) -> None:
        for name, (proc, started) in list(self.running.items()):
            if proc.poll() is None and time.monotonic() - started < DEADLINE:
                continue
            if proc.poll() is None:  # past its deadline: the whole process group goes
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            self.done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            self.done[name].seconds = time.monotonic() - started
            del self.running[name]
        while self.queued and len(self.running) < RUNNING:
            self._start(*self.queued.pop(0))

    def result(self, name: str) -> subprocess.CompletedProcess:
        while name not in self.done:
            self._poll()
            time.sleep(0.2)
        return self.done[name]

    def close(self) -> None:
        for proc, _ in self.running.values():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchrun")
    bad, good = (folder / "nd508_bad.py", folder / "nd508_good.py")
    examples = docs.examples((RULE_DOCS / "ND508.md").read_text(encoding="utf-8"))
    bad.write_text(examples["bad"], encoding="utf-8")
    good.write_text(examples["good"], encoding="utf-8")
    config = folder / "pyproject.toml"
    config.write_text("[tool.netdoctor.run]\ndist-timeout = 5\n", encoding="utf-8")
    run = ("-m", "netdoctor", "run", "--format", "json")
    j = Jobs(folder)
    j.add(
        "bypass", *run, "-o", folder / "bypass.json", "--stop-on", "error", LOOPS / "ddp_bypass.py"
    )
    j.add(
        "healthy",
        *run,
        "-o",
        folder / "healthy.json",
        "--tensorboard",
        folder / "healthy_tb",
        LOOPS / "ddp.py",
        "--save",
        folder / "watched.pt",
    )
    j.add("bare", LOOPS / "ddp.py", "--save", folder / "bare.pt")
    html = ("--html", folder / "nan.html") if HTML else ()  # the page, besides the json
    j.add(
        "nan",
        *run,
        "-o",
        folder / "nan.json",
        *html,
        "--fail-on",
        "never",
        LOOPS / "ddp.py",
        "--nan-at",
        "1:6",
        "--steps",
        "12",
    )
    j.add("raise", *run, "-o", folder / "raise.json", LOOPS / "ddp.py", "--raise-at", "1:5")
    j.add(
        "uneven",
        *run,
        "-o",
        folder / "uneven.json",
        "--config",
        config,
        "--every",
        "5",
        LOOPS / "ddp.py",
        "--uneven",
        "8",
    )
    j.add(
        "fsdp",
        *run,
        "-o",
        folder / "fsdp.json",
        LOOPS / "fsdp.py",
        "--norms",
        folder / "norms.json",
    )
    j.add("doc_bad", *run, "-o", folder / "doc_bad.json", bad)
    j.add("doc_good", *run, "-o", folder / "doc_good.json", good)
    yield j
    j.close()


def report_of(jobs: Jobs, name: str) -> tuple[dict, subprocess.CompletedProcess]:
    result = jobs.result(name)
    assert result.seconds < DEADLINE, f"{name} hung: {result.stderr[-3000:]}"
    path = jobs.folder / f"{name}.json"
    assert path.is_file(), f"{name}: no report (exit {result.returncode}): {result.stderr[-3000:]}"
    return json.loads(path.read_text()), result


def loud(report: dict) -> list[tuple[str, str]]:
    return [
        (f["rule"], f["message"])
        for f in report["findings"]
        if f["severity"] in ("warning", "error")
    ]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bypassing_the_ddp_wrapper_is_nd508_once_at_that_line_and_every_rank_stops(jobs):
    report, result = report_of(jobs, "bypass")
    script = LOOPS / "ddp_bypass.py"
    found = [f for f in report["findings"] if f["rule"] == "ND508"]
    assert len(found) == 1, report["findings"]
    f = found[0]
    assert Path(f["location"]["path"]).name == script.name
    assert f["location"]["line"] == line_of(script, "model.module(x[idx])")
    assert f["evidence"]["ranks"] == [1] and f["evidence"]["step"] == 2
    assert f["evidence"]["difference"] > 100 * f["evidence"]["tolerance"]
    assert "+    loss = F.cross_entropy(model(x[idx]), y[idx])" in f["fix"]["patch"]
    assert not f["fix"]["safe"]
    # --stop-on error: confirmed from the exchange on both ranks alike, both stop at step 2
    assert report["measurements"]["run"]["stopped"] == "stop-on"
    assert report["measurements"]["run"]["steps"] == 2
    assert report["measurements"]["run"]["ranks"]["per_rank"]["1"]["steps"] == 2
    assert result.stderr.count("step 2: ND508 replicas-diverged") == 1  # announced once
    assert "[rank 1]" not in result.stderr  # by rank 0
    assert result.returncode != 0  # an error, --fail-on error: rank 0 exits 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_healthy_ddp_reports_nothing_and_trains_exactly_as_without_netdoctor(jobs):
    report, result = report_of(jobs, "healthy")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not loud(report), loud(report)
    assert not [n for n in report["notes"] if "internal netdoctor error" in n]
    ranks = report["measurements"]["run"]["ranks"]
    assert ranks["world_size"] == 2 and ranks["backend"] == "gloo" and ranks["missing"] == []
    assert ranks["exchanges"] == 7 and ranks["compared_tensors"] == 6
    assert ranks["largest_difference"] == 0.0  # DDP's replicas are bitwise equal
    assert "[rank 1]" not in result.stderr and result.stdout.count("step 40: loss") == 1
    bare = jobs.result("bare")
    assert bare.returncode == 0, bare.stderr[-3000:]
    before = torch.load(jobs.folder / "bare.pt")
    after = torch.load(jobs.folder / "watched.pt")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_under_torchrun_rank_0_alone_writes_the_tensorboard_events(jobs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report, result = report_of(jobs, "healthy")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = jobs.folder / "healthy_tb"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1, list(folder.iterdir())
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    loss = acc.Scalars("netdoctor/loss")
    assert [e.step for e in loss] == list(range(1, report["measurements"]["run"]["steps"] + 1))
    assert [e.value for e in loss] == pytest.approx(report["measurements"]["loss_curve"])
    assert [e.step for e in acc.Tensors("netdoctor/report/text_summary")] == [len(loss)]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_nan_on_one_rank_is_named_with_its_rank(jobs):
    report, result = report_of(jobs, "nan")
    nd401 = [f for f in report["findings"] if f["rule"] == "ND401"]
    assert len(nd401) == 1, report["findings"]
    f = nd401[0]
    assert f["evidence"]["ranks"] == [1] and f["evidence"]["kind"] == "input"
    assert f["message"].startswith("rank 1: step 6: the input batch holds 1 NaN")
    assert "into the gradients of rank 0 in the same step" in f["message"]
    assert not [x for x in report["findings"] if x["rule"] == "ND402"]  # rank 0's symptom
    assert any(
        "rank 0: gradient NaN at step 6; rank 1: loss NaN at step 6" in n for n in report["notes"]
    ), report["notes"]
    assert "netdoctor [rank 1]: step 6: ND401" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not HTML, reason="the html report needs plotly (the [html] extra)")
def test_the_html_report_of_the_job_names_each_rank_and_its_outliers(jobs):
    report, _ = report_of(jobs, "nan")
    page = (jobs.folder / "nan.html").read_text(encoding="utf-8")
    ranks = page[page.index("<h2>Ranks</h2>") : page.index("<h2>Notes</h2>")]
    assert "<tr><td>0</td><td>12</td><td>finished</td>" in ranks
    assert "<tr><td>1</td><td>12</td><td>finished</td>" in ranks
    assert "world size 2 · backend gloo" in ranks
    assert ">ND401 non-finite</a>: only on rank 1</li>" in ranks
    assert report["measurements"]["run"]["ranks"]["per_rank"]["1"]["steps"] == 12


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_rank_that_raises_does_not_hang_the_others(jobs):
    report, result = report_of(jobs, "raise")
    assert result.returncode != 0
    assert "RuntimeError: rank 1 failed at step 5" in result.stderr  # its traceback, as Python
    assert any(
        n.startswith(
            "rank 1 ended with an exception after 4 step(s): RuntimeError: rank 1 failed at step 5"
        )
        for n in report["notes"]
    ), report["notes"]
    assert report["measurements"]["run"]["stopped"] in ("exception", "terminated")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ranks_with_different_numbers_of_steps_never_wait_past_the_timeout(jobs):
    report, result = report_of(jobs, "uneven")  # rank 1: 32 batches, rank 0: 40, under join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert not loud(report), loud(report)
    assert report["measurements"]["run"]["steps"] == 40
    assert report["measurements"]["run"]["ranks"]["per_rank"]["1"]["steps"] == 32
    assert any(
        n.startswith(
            "the ranks stopped comparing at step 35: no answer from the other ranks within 5 s"
        )
        for n in report["notes"]
    ), report["notes"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nd508_doc_example_triggers_and_its_fix_does_not(jobs):
    bad, _ = report_of(jobs, "doc_bad")
    assert [f["rule"] for f in bad["findings"]] == ["ND508"], bad["findings"]
    good, result = report_of(jobs, "doc_good")
    assert result.returncode == 0 and not loud(good), loud(good)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp2_sharded_model_is_clean_and_its_norm_is_reduced_over_the_shards(jobs):
    report, result = report_of(jobs, "fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not loud(report), loud(report)
    assert not [n for n in report["notes"] if "internal netdoctor error" in n], report["notes"]
    assert any("static rules skipped: its forward communicates" in n for n in report["notes"])
    reduced = report["measurements"]["run"]["ranks"]["sharded_grad_norm"]
    clipped = json.loads((jobs.folder / "norms.json").read_text())  # torch's own reduction
    assert [s for s, _ in reduced] == [1, 2, 3, 4, 8, 16, 32]
    for step, norm in reduced:
        assert math.isclose(norm, clipped[str(step)], rel_tol=1e-5), (step, norm, clipped)


# -- in this process -----------------------------------------------------------------------


def test_checksums_see_a_small_perturbation_that_the_norm_hides():
    from netdoctor.watcher.replicas import checksums

    torch.manual_seed(0)
    w = torch.randn(256, 300)
    moved = w + 1e-4 * w.norm() / math.sqrt(w.numel()) * torch.randn_like(w).sign()
    (n0, h0), (n1, h1) = [checksums([t]) for t in (w, moved)]
    assert checksums([w.clone()]) == [n0, h0]  # equal bits, equal checksums
    scale = w.norm().item()
    assert abs(h1 - h0) / scale > 1e-5  # about the size of the perturbation (1e-4)
    assert abs(n1 - n0) / scale < 1e-6  # the norm barely moves
    assert checksums([w[:, :7].contiguous()])  # shorter than the pattern, uneven tails


def test_compare_names_the_first_diverging_tensor_and_its_ranks():
    from netdoctor.watcher.replicas import Compared, compare

    names = [Compared("Net", "a.weight", False), Compared("Net", "b.weight", True)]
    same = [[2.0, 1.0, 3.0, 0.5]] * 3
    assert compare(same, names, 4, 1e-6) == (0.0, None)
    rows = [[2.0, 1.0, 3.0, 0.5], [2.0, 1.0, 3.0, 0.5], [2.0, 1.0, 3.0, 0.8]]
    largest, d = compare(rows, names, 8, 1e-6)
    assert d.parameter == "b.weight" and d.ranks == [2] and d.step == 8 and d.tensors == 1
    assert d.added_after_wrap and math.isclose(d.difference, 0.3 / 3.0)
    assert compare(rows, names, 8, 0.5)[1] is None  # below the tolerance


def _finding(rule: str, message: str, **kw) -> Finding:
    return Finding(rule, "x", Severity.ERROR, message, **kw)


def test_merge_reports_a_shared_finding_once_and_names_the_ranks_of_the_others():
    from netdoctor.measure.facts import DistributedFacts
    from netdoctor.watcher.ranks import merge

    site = Location("train.py", 12)
    report = Report("train.py", [_finding("ND501", "cleared never", location=site)], command="run")
    summaries = {
        1: {
            "findings": [
                _finding("ND501", "cleared never", location=site),
                _finding("ND506", "probabilities"),
            ],
            "notes": [],
            "steps": 9,
            "stopped": None,
            "error": None,
            "nonfinite": None,
        },
        2: {
            "findings": [_finding("ND501", "cleared never", location=site)],
            "notes": [],
            "steps": 4,
            "stopped": "exception",
            "error": "ValueError: boom",
            "nonfinite": (3, 1.0),
        },
    }
    facts = DistributedFacts(rank=0, world_size=4, backend="nccl", exchanges=3)
    merge(report, summaries, [3], facts, None, 60.0)
    rules = {f.rule: f for f in report.findings}
    assert sorted(rules) == ["ND501", "ND506"]
    assert rules["ND501"].message == "cleared never" and "ranks" not in rules["ND501"].evidence
    assert rules["ND506"].message == "rank 1: probabilities"
    assert rules["ND506"].evidence["ranks"] == [1]
    notes = "\n".join(report.notes)
    assert "rank 2: loss NaN at step 3" in notes
    assert "rank 2 ended with an exception after 4 step(s): ValueError: boom" in notes
    assert "rank 3 sent no report within 60 s" in notes


def test_ddp_in_one_process_is_watched_through_its_inner_module(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import netdoctor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        with netdoctor.watch(announce=False) as doctor:
            model = DDP(net)  # built while watched: its line is recorded
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
            for step in range(6):
                opt.zero_grad()
                out = model(x) if step < 3 else model.module(x)  # the last three bypass it
                nn.functional.cross_entropy(out, y).backward()
                opt.step()
        assert [m.facts.label for m in doctor.models] == ["Sequential"]
        assert doctor.models[0].model is net  # the inner module, not the wrapper
        assert doctor.exchange.world_size == 1  # one rank: nothing to compare
        (wrapper,) = doctor.replicas.wrappers
        assert wrapper.site is not None and wrapper.site.line == line_of(
            Path(__file__), "model = DDP(net)  # built while watched"
        )
        (bypass,) = doctor.replicas.bypasses()
        assert bypass.calls == 3 and bypass.site.line == line_of(
            Path(__file__), "out = model(x) if step < 3 else model.module(x)"
        )
        report = doctor.diagnose()
        assert not [n for n in report.notes if "static rules" in n or "internal" in n], report.notes
        assert not wrapper.handles and not net._forward_pre_hooks  # every hook removed
    finally:
        dist.destroy_process_group()
