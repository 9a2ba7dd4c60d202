"""The trainer callbacks: `netdoctor.integrations.lightning.DoctorCallback` in a Lightning fit and
`netdoctor.integrations.transformers.DoctorCallback` in a Hugging Face Trainer, on the scripts of
fixtures/loops (run in this process, as `python script.py` would).

Healthy fits must be clean, write their JSON report to `output` and end with the very same
weights as without the callback; the sick ones must be found (and stopped with `stop_on`); no
hook may outlive the fit; importing the integrations must import neither trainer."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from test_watch import global_state

from conftest import FIXTURES, invoke, line_of, run_python

LOOPS = FIXTURES / "loops"

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError:
        pl = None
try:
    import transformers
except ImportError:
    transformers = None

needs_lightning = pytest.mark.skipif(
    pl is None, reason="PyTorch Lightning is not installed (pip install netdoctor[lightning])"
)
needs_transformers = pytest.mark.skipif(
    transformers is None,
    reason="transformers is not installed (pip install netdoctor[transformers])",
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_script(script: Path, *args) -> None:
    """The script as `python script.py ARGS` runs it (in this process)."""
    saved = list(sys.argv)
    sys.argv = [str(script), *map(str, args)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved


def loud(report: dict) -> list[tuple[str, str]]:
    return [
        (f["rule"], f["message"])
        for f in report["findings"]
        if f["severity"] in ("warning", "error")
    ]


def same_weights(a: Path, b: Path) -> list[str]:
    """The keys whose tensors differ (empty: bit for bit the same)."""
    x, y = torch.load(a), torch.load(b)
    assert x.keys() == y.keys()
    return [k for k in x if not torch.equal(x[k], y[k])]


# ------------------------------------------------------------------------------ import hygiene


def test_importing_the_integrations_imports_no_trainer_and_no_torch():
    result = run_python(
        "import sys, netdoctor, netdoctor.integrations, netdoctor.integrations.lightning, "
        "netdoctor.integrations.transformers\n"
        "print(sorted(m for m in ('torch', 'lightning', 'pytorch_lightning', 'transformers') "
        "if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module, blocked, extra",
    [
        ("lightning", ("lightning", "pytorch_lightning"), "lightning"),
        ("transformers", ("transformers",), "transformers"),
    ],
)
def test_a_missing_trainer_library_names_the_extra_to_install(module, blocked, extra):
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in blocked)
    result = run_python(
        f"import sys; {block}\n"
        f"try:\n    from netdoctor.integrations.{module} import DoctorCallback\n"
        "except ImportError as e:\n    print(e)\n"
    )
    assert result.returncode == 0, result.stderr
    assert f"pip install netdoctor[{extra}]" in result.stdout, result.stdout


def test_options_are_checked_when_the_callback_is_built():
    from netdoctor.errors import UserError
    from netdoctor.integrations.session import TrainerSession

    with pytest.raises(TypeError, match="unknown option"):
        TrainerSession({"evrey": 3}, "DoctorCallback")
    with pytest.raises(UserError, match="stop_on"):
        TrainerSession({"stop_on": "sometimes"}, "DoctorCallback")
    with pytest.raises(TypeError, match="stop_action"):
        TrainerSession({"stop_action": "raise"}, "DoctorCallback")


# ------------------------------------------------------------------------------ Lightning


@needs_lightning
@pytest.mark.slow
def test_lightning_fit_is_clean_reports_json_and_trains_as_without_netdoctor(tmp_path):
    script = LOOPS / "lightning_healthy.py"
    before = global_state()
    run_script(script, "--steps", 30, "--no-doctor", "--save", tmp_path / "bare.pt")
    run_script(
        script,
        "--steps",
        30,
        "--report",
        tmp_path / "report.json",
        "--save",
        tmp_path / "watched.pt",
    )
    assert global_state() == before  # every hook and wrapper gone after the fit
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["command"] == "run" and report["target"] == "Classifier"
    assert not loud(report), loud(report)
    run = report["measurements"]["run"]
    assert run["steps"] == 30 and run["optimizers"][0]["class"] == "AdamW"
    assert [m["label"] for m in run["models"]] == ["Classifier"]  # training_step calls self(x)
    assert run["models"][0]["deep_steps"] > 0
    assert not [n for n in report["notes"] if "internal netdoctor error" in n]
    assert same_weights(tmp_path / "bare.pt", tmp_path / "watched.pt") == []


@needs_lightning
@pytest.mark.slow
def test_lightning_layer_left_out_of_configure_optimizers_is_found_and_stops(tmp_path, capsys):
    script = LOOPS / "lightning_unoptimized.py"
    run_script(script, "--steps", 12, "--report", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    f = next(f for f in report["findings"] if f["rule"] == "ND502")
    assert (
        "Classifier.head's parameters receive gradients, but no optimizer holds any" in f["message"]
    )
    assert f["location"]["line"] == line_of(script, "self.head = nn.Linear(64, 10)")
    assert "ND106" not in [f["rule"] for f in report["findings"]]  # the encoder is a part
    capsys.readouterr()

    run_script(script, "--stop-on", "error")  # no output: the text report is printed
    out, err = capsys.readouterr()
    assert "netdoctor: step 2: ND502 params-not-optimized [error]" in err
    assert "trained 2 steps" in out  # of 40: trainer.should_stop after the step that found it
    assert "ND502 params-not-optimized [error]" in out
    assert "training stopped at step 2 by stop-on error: ND502" in " ".join(out.split())


@needs_lightning
@pytest.mark.slow
def test_lightning_callback_inside_netdoctor_run_joins_the_run(tmp_path):
    """One attachment, one report: the run's (the callback writes none of its own)."""
    script = LOOPS / "lightning_healthy.py"
    run_script(script, "--steps", 20, "--no-doctor", "--save", tmp_path / "bare.pt")
    out = tmp_path / "run.json"
    result = invoke(
        "run",
        "--format",
        "json",
        "-o",
        out,
        script,
        "--steps",
        20,
        "--report",
        tmp_path / "callback.json",
        "--save",
        tmp_path / "run.pt",
    )
    assert result.exit_code == 0, result.stderr
    assert "not attached" not in result.stderr  # it joined, it did not fail to attach
    report = json.loads(out.read_text())
    assert not loud(report), loud(report)
    assert report["target"].endswith("lightning_healthy.py")
    assert [m["label"] for m in report["measurements"]["run"]["models"]] == ["Classifier"]
    assert report["measurements"]["run"]["optimizers"][0]["steps"] == 20
    assert not (tmp_path / "callback.json").exists()
    assert same_weights(tmp_path / "bare.pt", tmp_path / "run.pt") == []


@needs_lightning
@pytest.mark.slow
def test_lightning_fit_that_raises_still_reports_and_leaves_no_hook(tmp_path):
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from netdoctor.integrations.lightning import DoctorCallback

    class Breaks(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(8, 3)

        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise ValueError("bad batch")
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), batch_size=8)
    before = global_state()
    callback = DoctorCallback(output=str(tmp_path / "report.json"), format="json")
    trainer = pl.Trainer(
        max_steps=10,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    with pytest.raises(ValueError, match="bad batch"):
        trainer.fit(Breaks(), data)
    assert global_state() == before
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["measurements"]["run"]["stopped"] == "exception"
    assert report["measurements"]["run"]["steps"] == 3
    assert callback.doctor.closed and callback.exit_code() == 0


@needs_lightning
def test_lightning_hooks_report_on_rank_zero_only_and_stop_every_rank(tmp_path, capsys):
    """The hooks as a 2-process DDP fit calls them on rank 1: nothing is written or printed
    there, and a stop decided by any rank (the strategy's reduce_boolean_decision) stops this
    one too."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from torch import nn

    from netdoctor.integrations.lightning import DoctorCallback

    module = nn.Sequential(nn.Linear(8, 3))
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    decisions = []

    def reduce_boolean_decision(flag, all=True):
        decisions.append((flag, all))
        return len(decisions) >= 2  # the other rank found something at the 2nd step

    trainer = SimpleNamespace(
        optimizers=[opt],
        is_global_zero=False,
        global_step=0,
        world_size=2,
        should_stop=False,
        strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision),
    )
    callback = DoctorCallback(output=str(tmp_path / "report.json"), stop_on="error")
    callback.on_fit_start(trainer, module)
    for step in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(module(torch.randn(8, 8)), torch.randint(0, 3, (8,)))
        loss.backward()
        opt.step()
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, module, {"loss": loss.detach()}, None, step)
        assert trainer.should_stop == (step == 1)
    callback.on_fit_end(trainer, module)
    assert decisions == [(False, False), (False, False)]
    assert not (tmp_path / "report.json").exists()
    assert capsys.readouterr().out == ""
    assert callback.doctor.closed and callback.doctor.optimizers[0].facts.steps == 2


# ------------------------------------------------------------------------------ HF Trainer


@needs_transformers
@pytest.mark.slow
def test_hf_trainer_is_clean_reports_json_and_trains_as_without_netdoctor(tmp_path):
    script = LOOPS / "hf_trainer_bert.py"
    before = global_state()
    run_script(script, "--steps", 8, "--no-doctor", "--save", tmp_path / "bare.pt")
    run_script(
        script,
        "--steps",
        8,
        "--report",
        tmp_path / "report.json",
        "--save",
        tmp_path / "watched.pt",
    )
    assert global_state() == before
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["target"] == "BertForSequenceClassification"
    assert not loud(report), loud(report)
    run = report["measurements"]["run"]
    # the Trainer builds its optimizer inside train() and hands callbacks none: found at step 1
    assert run["steps"] == 8 and run["optimizers"][0]["class"] == "AdamW"
    assert run["optimizers"][0]["models"] == ["BertForSequenceClassification"]
    assert run["models"][0]["input_shape"] == [24]
    loss = report["measurements"]["loss_curve"]
    # the ModelOutput's loss: about ln 2 at the start for two balanced classes
    assert len(loss) == 8 and abs(loss[0] - 0.69) < 0.2 and all(0 < v < 1.5 for v in loss)
    assert not [n for n in report["notes"] if "internal netdoctor error" in n]
    assert same_weights(tmp_path / "bare.pt", tmp_path / "watched.pt") == []


@needs_transformers
@pytest.mark.slow
def test_hf_softmax_fed_to_cross_entropy_is_found_and_stops(tmp_path, capsys):
    script = LOOPS / "hf_trainer_softmax.py"
    run_script(script, "--steps", 6, "--report", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    f = next(f for f in report["findings"] if f["rule"] == "ND506")
    assert f["message"].startswith("cross_entropy was fed probabilities from a softmax")
    assert f["location"]["line"] == line_of(script, "loss = F.cross_entropy(probs, labels)")
    capsys.readouterr()

    run_script(script, "--stop-on", "error", "--report", tmp_path / "stopped.json")
    out, err = capsys.readouterr()
    assert "netdoctor: step 1: ND506 loss-pairing [error]" in err
    assert "trained 1 steps" in out  # of 20: control.should_training_stop
    stopped = json.loads((tmp_path / "stopped.json").read_text())
    assert stopped["measurements"]["run"]["stopped"] == "stop-on"


@needs_transformers
@pytest.mark.slow
def test_hf_callback_inside_netdoctor_run_joins_the_run(tmp_path):
    script = LOOPS / "hf_trainer_bert.py"
    out = tmp_path / "run.json"
    result = invoke(
        "run",
        "--format",
        "json",
        "-o",
        out,
        script,
        "--steps",
        4,
        "--report",
        tmp_path / "callback.json",
    )
    assert result.exit_code == 0, result.stderr
    assert "not attached" not in result.stderr
    report = json.loads(out.read_text())
    assert not loud(report), loud(report)
    assert [m["label"] for m in report["measurements"]["run"]["models"]] == [
        "BertForSequenceClassification"
    ]
    assert report["measurements"]["run"]["steps"] == 4
    assert not (tmp_path / "callback.json").exists()


@needs_transformers
@pytest.mark.slow
def test_hf_train_that_raises_is_finished_by_close(tmp_path):
    """The Trainer calls no callback when train() raises: close() (or the interpreter's exit)
    removes the hooks and writes the report."""
    import torch.nn.functional as F
    from torch import nn
    from transformers import Trainer, TrainingArguments

    from netdoctor.integrations.transformers import DoctorCallback

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)
            self.calls = 0

        def forward(self, x, labels):
            self.calls += x.shape[0] == 8  # the Trainer's batches (not the static check's)
            if self.calls == 4:
                raise ValueError("bad batch")
            return {"loss": F.cross_entropy(self.fc(x), labels)}

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(8, generator=g), "labels": torch.tensor(i % 3)}

    before = global_state()
    callback = DoctorCallback(output=str(tmp_path / "report.json"), format="json")
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=10,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
    )
    trainer = Trainer(model=Tiny(), args=args, train_dataset=Rows(), callbacks=[callback])
    with pytest.raises(ValueError, match="bad batch"):
        trainer.train()
    assert global_state() != before  # still attached: nothing told the callback
    callback.close()
    assert global_state() == before
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["measurements"]["run"]["stopped"] == "exception"
    assert report["measurements"]["run"]["steps"] == 3
