"""TensorBoard export (`netdoctor run --tensorboard DIR`, `netdoctor.watch(..., tensorboard=...)`,
the trainer callbacks with the trainer's own TensorBoard logger): the event files are read back
with TensorBoard's own reader, and their tags and steps are checked against what the watcher
measured (the report's curves, the deep-step schedule, the step a finding was announced at).

A writer that fails is a note in the report, never an exception in the loop; netdoctor's own
writer leaves no thread behind, and a user's writer stays the user's (open)."""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_integrations import needs_lightning, needs_transformers, run_script
from test_watch import global_state
from torch import nn

import netdoctor
from conftest import FIXTURES, invoke, run_python
from netdoctor.errors import UserError
from netdoctor.watcher.schedule import Schedule

LOOPS = FIXTURES / "loops"
tensorboard = pytest.importorskip("tensorboard", reason="pip install netdoctor[tensorboard]")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def events(folder: Path):
    """TensorBoard's own reader over a run folder, keeping every event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def steps(acc, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def texts(acc, tag: str) -> dict[int, str]:
    """A text summary's step -> text (the writer stores it under TAG/text_summary)."""
    return {
        e.step: e.tensor_proto.string_val[0].decode("utf-8")
        for e in acc.Tensors(f"{tag}/text_summary")
    }


def deep_steps(n: int, every: int = 50) -> list[int]:
    schedule = Schedule(every)
    return [s for s in range(1, n + 1) if schedule.is_deep(s)]


def close_to(a: list[float], b: list[float]) -> bool:
    """Equal as TensorBoard keeps them (float32)."""
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12) for x, y in zip(a, b)
    )


def our_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t is not threading.main_thread()}


def tiny_loop(doctor_options: dict, steps: int = 12, copies: bool = False):
    """A sigmoid MLP trained `steps` steps under `netdoctor.watch(**doctor_options)`."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 2, (256,))
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with netdoctor.watch(model, optimizer, announce=False, **doctor_options) as doctor:
        for step in range(steps):
            idx = torch.randint(0, 256, (32,))
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            if copies and step == 4:  # a deep step's window: no trace on the user's objects
                copy.deepcopy(model)
                copy.deepcopy(optimizer)
                pickle.loads(pickle.dumps(model))
    return doctor, model


# ------------------------------------------------------------------------------ netdoctor run


@pytest.mark.slow
def test_run_events_load_with_tensorboards_reader_at_the_steps_the_watcher_measured(tmp_path):
    script = LOOPS / "no_zero_grad.py"
    folder = tmp_path / "tb"
    out = tmp_path / "report.json"
    before = our_threads()
    result = invoke("run", "--tensorboard", folder, "--format", "json", "-o", out, script)
    assert result.exit_code == 1, result.stderr  # ND501 is an error
    assert our_threads() == before  # the writer's thread joined
    report = json.loads(out.read_text())
    curves = report["measurements"]
    n = report["measurements"]["run"]["steps"]
    assert n == 40
    files = list(folder.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = events(folder)

    # every step: the report's own curves, at the steps 1..n
    for tag, curve in (
        ("netdoctor/loss", "loss_curve"),
        ("netdoctor/grad_norm", "grad_norm_curve"),
        ("netdoctor/lr", "lr_curve"),
    ):
        assert steps(acc, tag) == list(range(1, n + 1)), tag
        assert close_to([e.value for e in acc.Scalars(tag)], curves[curve]), tag

    # the deep steps only: per layer and as histograms across the layers
    deep = deep_steps(n)
    assert report["measurements"]["run"]["models"][0]["deep_steps"] == len(deep)
    tags = acc.Tags()
    for tag in (
        "netdoctor/layers/grad_norm/0.weight",
        "netdoctor/layers/grad_norm/2.weight",
        "netdoctor/layers/update_ratio/0.weight",
        "netdoctor/activations/zero_share/1",
        "netdoctor/accuracy",
    ):
        assert tag in tags["scalars"], tags["scalars"]
        assert steps(acc, tag) == deep, tag
    assert all(0 <= e.value <= 1 for e in acc.Scalars("netdoctor/activations/zero_share/1"))
    for tag in ("netdoctor/hist/grad_norm_log10", "netdoctor/hist/update_ratio_log10"):
        assert [e.step for e in acc.Histograms(tag)] == deep, tag
        assert all(e.histogram_value.num == 2 for e in acc.Histograms(tag))  # two weights

    # the finding, at the step it was confirmed (announced on stderr), with its fix
    announced = re.search(r"netdoctor: step (\d+): ND501 grads-not-cleared", result.stderr)
    assert announced, result.stderr
    found = texts(acc, "netdoctor/findings/ND501")
    assert list(found) == [int(announced.group(1))]
    text = found[int(announced.group(1))]
    assert text.startswith("**ND501 grads-not-cleared** [error]")
    assert "no_zero_grad.py:" in text and "gradients are never cleared" in text
    fix = next(f for f in report["findings"] if f["rule"] == "ND501")["fix"]
    assert f"**Fix:** {fix['summary']}" in text
    # the whole report at the last step
    final = texts(acc, "netdoctor/report")
    assert list(final) == [n] and "ND501 grads-not-cleared" in final[n]


def test_run_without_tensorboard_installed_is_one_line_and_exit_2(tmp_path):
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "from netdoctor.cli import main\n"
        f"main(['run', '--tensorboard', {str(tmp_path / 'tb')!r}, "
        f"{str(LOOPS / 'plain.py')!r}])\n"
    )
    result = run_python(code)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "netdoctor: error: TensorBoard export needs the tensorboard package: pip install "
        "'netdoctor[tensorboard]' (or pip install tensorboard)"
    ]
    assert not (tmp_path / "tb").exists()


def test_run_tensorboard_onto_a_file_is_one_line_and_exit_2(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    result = invoke("run", "--tensorboard", taken, LOOPS / "plain.py")
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == f"netdoctor: error: tensorboard: {taken} is a file, not a directory"
    )


# ------------------------------------------------------------------------------ watch()


def test_watch_writes_to_a_directory_and_leaves_no_thread_and_no_trace(tmp_path):
    before = our_threads()
    state = global_state()
    doctor, model = tiny_loop({"tensorboard": tmp_path / "tb", "every": 5}, copies=True)
    assert our_threads() == before and global_state() == state
    assert not [n for n in doctor.notes if "TensorBoard" in n]
    acc = events(tmp_path / "tb")
    assert steps(acc, "netdoctor/loss") == list(range(1, 13))
    assert close_to(
        [e.value for e in acc.Scalars("netdoctor/loss")], doctor.facts.optimizers[0].loss
    )
    deep = deep_steps(12, every=5)
    assert deep == [1, 2, 3, 4, 5, 10]
    assert steps(acc, "netdoctor/layers/grad_norm/0.weight") == deep
    assert steps(acc, "netdoctor/activations/saturated_share/1") == deep
    assert [e.step for e in acc.Histograms("netdoctor/hist/saturated_share")] == deep
    assert list(texts(acc, "netdoctor/report")) == [12]
    # the model pickles and copies as a plain module
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in copy.deepcopy(model).modules())


def test_watch_writes_into_a_users_writer_and_leaves_it_open(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "mine"))
    writer.add_scalar("mine/before", 1.0, 0)
    doctor, _ = tiny_loop({"tensorboard": writer, "every": 5})
    writer.add_scalar("mine/after", 2.0, 99)  # still open: netdoctor only flushed it
    writer.close()
    assert len(list((tmp_path / "mine").glob("events.out.tfevents.*"))) == 1
    acc = events(tmp_path / "mine")
    assert steps(acc, "mine/before") == [0] and steps(acc, "mine/after") == [99]
    assert steps(acc, "netdoctor/loss") == list(range(1, 13))
    assert steps(acc, "netdoctor/grad_norm") == list(range(1, 13))


def test_a_loop_that_raises_still_gets_its_events_flushed_and_the_writer_closed(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = our_threads()
    with pytest.raises(RuntimeError, match="data loader died"):
        with netdoctor.watch(model, optimizer, announce=False, tensorboard=tmp_path / "tb"):
            for step in range(1, 20):
                if step == 6:
                    raise RuntimeError("data loader died")
                optimizer.zero_grad()
                F.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 2, (16,))).backward()
                optimizer.step()
    assert our_threads() == before
    acc = events(tmp_path / "tb")
    assert steps(acc, "netdoctor/loss") == [1, 2, 3, 4, 5]
    assert list(texts(acc, "netdoctor/report")) == [5]


def test_the_gradscalers_scale_is_the_one_each_step_was_scaled_by(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    used = []
    with netdoctor.watch(model, optimizer, announce=False, tensorboard=tmp_path / "tb"):
        for _ in range(7):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 2, (16,)))
            used.append(scaler.get_scale())
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    assert used == [1024.0, 1024.0, 2048.0, 2048.0, 4096.0, 4096.0, 8192.0]
    acc = events(tmp_path / "tb")
    assert steps(acc, "netdoctor/amp/scale") == list(range(1, 8))
    assert [e.value for e in acc.Scalars("netdoctor/amp/scale")] == used


class BrokenWriter:
    """A writer on a full disk."""

    def add_scalar(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    add_histogram = add_text = add_scalar

    def flush(self):
        pass


def test_a_writer_that_fails_is_a_note_never_an_exception_in_the_loop():
    doctor, _ = tiny_loop({"tensorboard": BrokenWriter()})
    assert doctor.facts.optimizers[0].steps == 12  # the loop ran to its end
    notes = [n for n in doctor.diagnose().notes if "TensorBoard" in n]
    assert notes == [
        "TensorBoard export stopped at step 1: OSError: [Errno 28] No space left on device "
        "(the events before it were written)"
    ]
    assert not doctor.errors  # not an internal error


@pytest.mark.parametrize(
    "value, message",
    [
        (True, "tensorboard must be a directory or a SummaryWriter"),
        (3, "tensorboard must be a directory or a SummaryWriter"),
        ("", "tensorboard must name a directory"),
    ],
)
def test_bad_tensorboard_option_fails_at_the_watch_call(value, message):
    model = nn.Linear(2, 2)
    with pytest.raises(UserError, match=message):
        netdoctor.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), tensorboard=value)


def test_watch_without_tensorboard_installed_raises_an_import_error_at_the_call(tmp_path):
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "import torch, netdoctor\n"
        "m = torch.nn.Linear(2, 2)\n"
        "o = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "try:\n"
        f"    netdoctor.watch(m, o, tensorboard={str(tmp_path)!r})\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ImportError: TensorBoard export needs the tensorboard package")


# ------------------------------------------------------------------------------ callbacks


@needs_lightning
@pytest.mark.slow
def test_lightning_callback_writes_into_the_trainers_tensorboard_logger(tmp_path):
    before = our_threads()
    state = global_state()
    run_script(
        LOOPS / "lightning_healthy.py",
        "--steps",
        30,
        "--tensorboard",
        tmp_path / "logs",
        "--report",
        tmp_path / "report.json",
    )
    assert global_state() == state and our_threads() == before
    run = tmp_path / "logs" / "fit" / "version_0"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the logger's own writer
    acc = events(run)
    tags = acc.Tags()["scalars"]
    assert "val_acc" in tags  # Lightning's own, beside netdoctor's
    assert steps(acc, "netdoctor/loss") == list(range(1, 31))
    report = json.loads((tmp_path / "report.json").read_text())
    assert close_to(
        [e.value for e in acc.Scalars("netdoctor/loss")], report["measurements"]["loss_curve"]
    )
    assert steps(acc, "netdoctor/layers/grad_norm/net.0.weight") == deep_steps(30)
    assert steps(acc, "netdoctor/activations/zero_share/net.2") == deep_steps(30)
    assert list(texts(acc, "netdoctor/report")) == [30]


@needs_transformers
@pytest.mark.slow
def test_hf_callback_writes_where_the_trainers_tensorboard_callback_does(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "logs"))
    before = our_threads()
    run_script(
        LOOPS / "hf_trainer_bert.py",
        "--steps",
        8,
        "--tensorboard",
        "--report",
        tmp_path / "report.json",
    )
    assert our_threads() == before  # the writer netdoctor reopened after the Trainer's close
    acc = events(tmp_path / "logs")
    tags = acc.Tags()["scalars"]
    assert "train/train_loss" in tags  # the Trainer's own, beside netdoctor's
    assert steps(acc, "netdoctor/loss") == list(range(1, 9))
    assert steps(acc, "netdoctor/layers/grad_norm/classifier.weight") == deep_steps(8)
    assert list(texts(acc, "netdoctor/report")) == [8]


def test_callback_with_tensorboard_false_leaves_the_trainers_logger_alone():
    from netdoctor.integrations.session import TrainerSession

    session = TrainerSession({"tensorboard": False, "announce": False}, "DoctorCallback")
    model = nn.Linear(2, 2)
    session.start("Linear", models=[model], tensorboard=BrokenWriter())
    try:
        assert session.doctor is not None and session.doctor.export is None
    finally:
        session.finish()
