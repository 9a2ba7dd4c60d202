"""`netdoctor.watch`: the doctor inside a training loop the test itself writes. In process and
small, so every behaviour a user relies on is checked directly: hooks and wrappers gone after
close(), the user's results bit for bit unchanged, the loop rules (ND501-ND507) on their sick
and healthy patterns, NaN localisation, stop_on, and internal errors kept out of the loop."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netdoctor
from netdoctor.errors import StopTraining, UserError
from netdoctor.watcher.doctor import Doctor
from netdoctor.watcher.schedule import Schedule
from netdoctor.watcher.settings import WatchOptions


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster and steadier on a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def global_state(model: nn.Module | None = None) -> dict:
    """Everything netdoctor may touch while watching: global hook tables, wrapped functions,
    the torch-function mode stack, and the model's own hook tables."""
    from torch.nn.modules import module as m
    from torch.optim import lr_scheduler
    from torch.optim import optimizer as o

    state = {
        "forward_pre": dict(m._global_forward_pre_hooks),
        "forward": dict(m._global_forward_hooks),
        "always": set(m._global_forward_hooks_always_called),
        "opt_pre": dict(o._global_optimizer_pre_hooks),
        "opt_post": dict(o._global_optimizer_post_hooks),
        "backward": torch.autograd.backward,
        "jit_script": torch.jit.script,
        "train": nn.Module.__dict__["train"],
        "getstate": nn.Module.__dict__["__getstate__"],
        "rnn_getstate": nn.RNNBase.__dict__["__getstate__"],
        "scale": torch.amp.GradScaler.__dict__["scale"],
        "scaler_step": torch.amp.GradScaler.__dict__["step"],
        "unscale": torch.amp.GradScaler.__dict__["unscale_"],
        "scaler_update": torch.amp.GradScaler.__dict__["update"],
        "clip_norm": torch.nn.utils.clip_grad_norm_,
        "clip_value": torch.nn.utils.clip_grad_value_,
        "clip_norm_module": torch.nn.utils.clip_grad.clip_grad_norm_,
        "init": nn.Module.__dict__["__init__"],
        "opt_init": torch.optim.Optimizer.__dict__["__init__"],
        "scheduler_step": lr_scheduler.LRScheduler.__dict__["step"],
        "losses": {
            n: getattr(F, n)
            for n in (
                "cross_entropy",
                "nll_loss",
                "mse_loss",
                "binary_cross_entropy",
                "binary_cross_entropy_with_logits",
                "l1_loss",
            )
        },
        "modes": torch._C._len_torch_function_stack(),
    }
    if model is not None:
        state["model"] = [
            (
                name,
                dict(mod._forward_pre_hooks),
                dict(mod._forward_hooks),
                set(mod._forward_hooks_always_called),
            )
            for name, mod in model.named_modules()
        ]
    return state


def data(n=512, d=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, x[:, :classes].argmax(dim=1)


def mlp(d=16, classes=4, dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(d, 32), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(32, classes))


def train(
    model, opt, steps, x, y, *, zero=True, loss_fn=None, batch=32, every_zero=1, every_step=1
):
    """A plain loop; `every_zero`/`every_step`: clear / step once per that many backwards."""
    loss_fn = loss_fn or F.cross_entropy
    for i in range(steps):
        idx = torch.arange(i * batch, (i + 1) * batch) % len(x)
        if zero and i % every_zero == 0:
            opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        if (i + 1) % every_step == 0:
            opt.step()


def rules(doctor) -> list[str]:
    return [f.rule for f in doctor.findings]


# ------------------------------------------------------------------------------ hygiene


def test_close_leaves_no_hook_and_restores_every_wrapper():
    x, y = data()
    model = mlp(dropout=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = global_state(model)
    doctor = netdoctor.watch(model, opt, every=2)
    assert global_state(model) != before  # it did attach
    train(model, opt, 6, x, y)
    doctor.close()
    assert global_state(model) == before
    doctor.close()  # idempotent
    assert doctor.findings == []  # the report is still there


def test_discovery_mode_close_restores_everything():
    before = global_state()
    with netdoctor.watch() as doctor:
        x, y = data()
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        train(model, opt, 5, x, y)
    assert global_state() == before
    assert [m.facts.label for m in doctor.models] == ["Sequential"]
    assert doctor.optimizers[0].facts.steps == 5


def test_an_exception_inside_a_measured_forward_leaves_no_mode_behind():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            x = torch.relu(self.fc(x))  # inside the activation mode on a deep step
            raise ValueError("boom")

    model = Fails()
    before = global_state(model)
    doctor = netdoctor.watch(model, static=False)
    with pytest.raises(ValueError, match="boom"):
        model(torch.randn(2, 4))
    assert torch._C._len_torch_function_stack() == before["modes"]
    doctor.close()
    assert global_state(model) == before


def test_watching_changes_no_result_bit_for_bit():
    """Dropout draws random numbers, BatchNorm updates buffers, a NaN replay re-runs a forward:
    the weights, the buffers and the random state afterwards are the same as without
    netdoctor."""

    def run(watched: bool):
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4)
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x, y = data()
        doctor = netdoctor.watch(model, opt, every=3) if watched else None
        for i in range(12):
            idx = torch.randint(0, len(x), (32,))
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if i == 10:
                loss = loss * float("nan")  # a NaN step: localised by a replayed forward
            loss.backward()
            if i != 10:
                opt.step()
        if doctor is not None:
            doctor.close()
        return model.state_dict(), torch.get_rng_state(), doctor

    (plain, rng_plain, _), (watched, rng_watched, doctor) = run(False), run(True)
    assert plain.keys() == watched.keys()
    for k in plain:
        assert torch.equal(plain[k], watched[k]), k
    assert torch.equal(rng_plain, rng_watched)
    assert "ND401" in rules(doctor)


def test_second_watcher_is_refused_and_options_are_checked():
    model = mlp()
    with netdoctor.watch(model):
        with pytest.raises(UserError, match="another netdoctor watcher"):
            netdoctor.watch(model)
    with pytest.raises(TypeError, match="unknown option"):
        netdoctor.watch(model, evrey=3)
    with pytest.raises(UserError, match="stop_on"):
        netdoctor.watch(model, stop_on="sometimes")
    with pytest.raises(UserError, match="every"):
        netdoctor.watch(model, every=0)


def test_internal_error_becomes_a_note_not_an_exception(monkeypatch):
    from netdoctor.watcher import measurement

    def broken(*args, **kwargs):
        raise RuntimeError("instrument broke")

    # the total gradient norm, measured apart on cheap steps and from the meters on deep ones
    monkeypatch.setattr(measurement, "total_grad_norm", broken)
    monkeypatch.setattr(measurement, "_norm_from_meters", broken)
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with netdoctor.watch(model, opt, static=False) as doctor:
        train(model, opt, 5, x, y)
    notes = doctor.diagnose().notes
    assert any(
        "internal netdoctor error" in n and "instrument broke" in n and "(5 times)" in n
        for n in notes
    ), notes


def test_schedule_is_cheap_and_log_spaced():
    s = Schedule(every=50, warm=4)
    deep = [i for i in range(1, 401) if s.is_deep(i)]
    assert deep == [1, 2, 3, 4, 8, 16, 32, 50, 100, 150, 200, 250, 300, 350, 400]
    assert [i for i in range(1, 11) if Schedule(every=1).is_deep(i)] == list(range(1, 11))
    assert [i for i in deep if s.restarts_window(i)] == [16, 32, 50, 100, 200, 400]


@pytest.mark.parametrize("every", [1, 3])
def test_norms_and_update_ratios_match_a_direct_computation(every):
    """The total gradient norm (from the per-parameter norms on deep steps, measured apart on
    the others) and the update ratios (the weight snapshot's buffers reused across consecutive
    deep steps) are what the test computes itself from the gradients and weights."""
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    norms, ratios = [], []
    with netdoctor.watch(model, opt, every=every, static=False) as doctor:
        doctor.schedule.warm = 1
        for i in range(7):
            idx = torch.arange(i * 32, (i + 1) * 32)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            norms.append(
                float(
                    torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in model.parameters()])
                    )
                )
            )
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            if doctor.schedule.is_deep(i + 1):
                ratios.append(
                    [float((p.detach() - b).norm()) for p, b in zip(model.parameters(), before)]
                )
    wo = doctor.optimizers[0]
    assert wo.facts.grad_norm == pytest.approx(norms, rel=1e-5)
    assert wo.deep_steps == [i for i in range(1, 8) if doctor.schedule.is_deep(i)]
    traces = wo.meters[0][1].traces
    for k, tr in enumerate(traces):
        expected = [r[k] / max(w, tr.reference_norm) for r, w in zip(ratios, tr.weight_norm)]
        assert tr.update_ratio == pytest.approx(expected, rel=1e-4, abs=1e-9), tr.name


def test_the_measurement_time_note_counts_the_activation_measurements():
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with netdoctor.watch(model, opt, every=1, static=False) as doctor:
        train(model, opt, 4, x, y)
    recorded = doctor.models[0].recorder.seconds
    assert recorded > 0
    assert doctor.measure_seconds >= recorded
    assert any("netdoctor's measurements took" in n for n in doctor.diagnose().notes)


# ------------------------------------------------------------------------------ ND501


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ({"zero": False}, True),  # zero_grad() forgotten
        ({"every_zero": 4, "every_step": 1}, True),  # steps every backward, clears every 4th
        ({"every_zero": 4, "every_step": 4}, False),  # accumulation: clear and step every 4
        ({}, False),
    ],
)
def test_nd501_grads_not_cleared(pattern, expected):
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with netdoctor.watch(model, opt, static=False) as doctor:
        train(model, opt, 24, x, y, **pattern)
    assert ("ND501" in rules(doctor)) is expected, rules(doctor)


def test_nd501_accumulation_cleared_after_the_step_is_fine():
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with netdoctor.watch(model, opt, static=False) as doctor:
        for i in range(24):
            loss = F.cross_entropy(model(x[i * 8 : (i + 1) * 8]), y[i * 8 : (i + 1) * 8]) / 3
            loss.backward()
            if (i + 1) % 3 == 0:
                opt.step()
                opt.zero_grad(set_to_none=False)  # zeroed in place, not set to None
    assert "ND501" not in rules(doctor)


# ------------------------------------------------------------------------------ ND502, ND503


def test_nd502_optimizer_of_frozen_parameters():
    x, y = data()
    model = mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # meant: the trainable head
    with netdoctor.watch(model, opt, static=False) as doctor:
        train(model, opt, 4, x, y)
    found = [f for f in doctor.findings if f.rule == "ND502"]
    assert any("every one is frozen" in f.message for f in found), found


def test_nd503_learning_rate_zero():
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with netdoctor.watch(model, opt, static=False) as doctor:
        train(model, opt, 8, x, y)
    f = next(f for f in doctor.findings if f.rule == "ND503")
    assert "learning rate is 0" in f.message
    assert f.evidence["reasons"] == {"lr-zero": 8}


def test_nd503_warmup_from_zero_is_fine():
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 5))  # lr 0 at step 1
    with netdoctor.watch(model, opt, static=False) as doctor:
        for i in range(30):
            opt.zero_grad()
            F.cross_entropy(model(x[i * 16 : (i + 1) * 16]), y[i * 16 : (i + 1) * 16]).backward()
            opt.step()
            sched.step()
    assert not {"ND503", "ND505"} & set(rules(doctor))


# ------------------------------------------------------------------------------ ND504


def test_nd504_not_for_a_frozen_part_kept_in_eval_mode():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())
            self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 4))

        def forward(self, x):
            return self.head(self.backbone(x))

    x, y = data()
    for freeze, expected in ((True, False), (False, True)):
        torch.manual_seed(0)
        model = Net()
        if freeze:
            model.backbone.requires_grad_(False)
            model.backbone.eval()
        else:
            model.eval()  # the whole model: a validation's eval() never undone
        params = model.head.parameters() if freeze else model.parameters()
        opt = torch.optim.SGD(params, lr=0.05)
        with netdoctor.watch(model, opt, static=False) as doctor:
            train(model, opt, 6, x, y)
        assert ("ND504" in rules(doctor)) is expected, (freeze, rules(doctor))


# ------------------------------------------------------------------------------ ND505


def test_nd505_epoch_scheduler_stepped_per_batch_and_cosine_to_zero():
    x, y = data()
    for per_batch, expected in ((True, True), (False, False)):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = (
            torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
            if per_batch
            else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
        )
        with netdoctor.watch(model, opt, static=False) as doctor:
            for i in range(40):
                opt.zero_grad()
                F.cross_entropy(model(x[i * 8 : (i + 1) * 8]), y[i * 8 : (i + 1) * 8]).backward()
                opt.step()
                sched.step()
        assert ("ND505" in rules(doctor)) is expected, rules(doctor)


# ------------------------------------------------------------------------------ ND506, ND507


@pytest.mark.parametrize(
    "head, loss, expected",
    [
        ("softmax", "cross_entropy", True),
        ("log_softmax", "cross_entropy", False),  # idempotent under log-softmax: no pairing bug
        ("softmax", "nll_loss", True),
        ("log_softmax", "nll_loss", False),
        ("none", "nll_loss", True),  # logits into NLL
        ("none", "cross_entropy", False),
    ],
)
def test_nd506_class_losses(head, loss, expected):
    x, y = data()
    model = mlp()
    post = {
        "softmax": lambda t: t.softmax(1),
        "log_softmax": lambda t: t.log_softmax(1),
        "none": lambda t: t,
    }[head]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with netdoctor.watch(model, opt, static=False) as doctor:
        # looked up at call time, as `F.cross_entropy(...)` in a loop is
        train(model, opt, 6, x, y, loss_fn=lambda out, t: getattr(F, loss)(post(out), t))
    assert ("ND506" in rules(doctor)) is expected, rules(doctor)


def test_nd506_sigmoid_into_bce_with_logits():
    x, y = data()
    yb = (y == 0).float().unsqueeze(1)
    for sigmoid, expected in ((True, True), (False, False)):
        model = mlp(classes=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with netdoctor.watch(model, opt, static=False) as doctor:
            train(
                model,
                opt,
                6,
                x,
                yb,
                loss_fn=lambda out, t, s=sigmoid: F.binary_cross_entropy_with_logits(
                    out.sigmoid() if s else out, t
                ),
            )
        assert ("ND506" in rules(doctor)) is expected


def test_nd507_broadcast_and_same_shapes():
    x, _ = data()
    target = x.sum(dim=1)
    for squeeze, expected in ((False, True), (True, False)):
        model = mlp(classes=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with (
            netdoctor.watch(model, opt, static=False) as doctor,
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            train(
                model,
                opt,
                4,
                x,
                target,
                loss_fn=lambda out, t, s=squeeze: F.mse_loss(out.squeeze(-1) if s else out, t),
            )
        assert ("ND507" in rules(doctor)) is expected
        # torch's own warning still reaches the user
        assert any("target size" in str(w.message) for w in caught) is expected


# ------------------------------------------------------------------------------ loss, NaN, stop


def test_observe_loss_when_backward_is_not_seen():
    from torch.autograd import backward as captured  # bound before netdoctor wraps it

    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with netdoctor.watch(model, opt, static=False) as doctor:
        for i in range(5):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32])
            captured(loss)
            doctor.observe_loss(loss)
            opt.step()
    curve = doctor.diagnose().measurements["loss_curve"]
    assert len(curve) == 5 and all(math.isfinite(v) for v in curve)


def test_stop_on_error_raises_stop_training_before_the_update():
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 0
    with netdoctor.watch(model, opt, stop_on="error", announce=False) as doctor:
        for i in range(20):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[:32]), y[:32])
            if i == 3:
                loss = loss / 0.0 * 0.0  # NaN
            loss.backward()
            try:
                opt.step()
            except Exception:  # a loop that swallows ordinary errors does not swallow this
                pass
            steps += 1
    assert steps == 3  # stopped inside the 4th step
    assert doctor.should_stop and doctor.stopped_by.rule == "ND401"
    assert all(torch.isfinite(p).all() for p in model.parameters())  # NaN update not applied


def test_stop_training_is_a_base_exception_and_flag_mode_only_flags():
    assert issubclass(StopTraining, BaseException) and not issubclass(StopTraining, Exception)
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with netdoctor.watch(model, opt, stop_on="error", stop_action="flag", announce=False) as doctor:
        train(model, opt, 6, x, y, zero=False)  # ND501
    assert doctor.should_stop and doctor.stopped_by.rule == "ND501"
    assert doctor.optimizers[0].facts.steps == 6


def test_announces_a_confirmed_error_once_on_stderr(capsys):
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with netdoctor.watch(model, opt, static=False):
        train(model, opt, 10, x, y, zero=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "ND501" in line]) == 1, err
    assert err[0].startswith("netdoctor: step 3: ND501 grads-not-cleared [error] at ")


def test_report_formats_and_output_file(tmp_path):
    import json

    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = tmp_path / "report.json"
    with netdoctor.watch(
        model, opt, static=False, output=str(out), format="json", name="toy"
    ) as doctor:
        train(model, opt, 6, x, y, zero=False)
    data_ = json.loads(out.read_text())
    assert data_["command"] == "run" and data_["target"] == "toy"
    assert [f["rule"] for f in data_["findings"]] == ["ND501"]
    assert "ND501 grads-not-cleared" in doctor.report(format="text", color=False)
    assert doctor.exit_code() == 1 and doctor.exit_code("never") == 0


def test_a_step_with_a_closure_is_measured_after_its_backward():
    """LBFGS (and Lightning's automatic optimization) run forward and backward inside the
    closure the step calls: measured when its first call returns, results unchanged."""

    def run(watched: bool):
        torch.manual_seed(0)
        x = torch.randn(128, 8)
        y = x @ torch.randn(8, 1)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
        doctor = netdoctor.watch(model, opt, static=False) if watched else None

        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(6):
            opt.step(closure)
        if doctor is not None:
            doctor.close()
        return [p.detach().clone() for p in model.parameters()], doctor

    (plain, _), (watched, doctor) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched))
    facts = doctor.optimizers[0].facts
    assert facts.steps == 6 and all(math.isfinite(v) for v in facts.loss)
    assert facts.loss[-1] < facts.loss[0]
    assert doctor.findings == []


def test_nd504_ignores_a_validation_forward_without_no_grad():
    """A validation pass that forgets no_grad() runs an eval-mode forward with gradients, but
    no backward uses it: no training step in eval mode."""
    x, y = data()
    model = mlp(dropout=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with netdoctor.watch(model, opt, static=False) as doctor:
        for _ in range(4):  # epochs
            model.train()
            train(model, opt, 3, x, y)
            model.eval()
            model(x[:64])  # validation, gradients enabled
    assert "ND504" not in rules(doctor)


def test_grad_scaler_loss_is_recorded_unscaled():
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    seen = []
    with netdoctor.watch(model, opt, static=False) as doctor:
        for i in range(6):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32])
            seen.append(loss.item())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert doctor.optimizers[0].facts.loss == pytest.approx(seen, rel=1e-6)
    assert doctor.findings == []


def test_a_copy_or_a_saved_watched_model_carries_no_netdoctor_hook(tmp_path):
    """EMA models are deep copies, checkpoints of whole modules are pickles: neither may drag
    the doctor along (or fail on it)."""
    import copy

    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with netdoctor.watch(model, opt, static=False):
        train(model, opt, 3, x, y)
        ema = copy.deepcopy(model)
        torch.save(model, tmp_path / "model.pt")
        assert model._forward_pre_hooks  # still watched
    assert not ema._forward_pre_hooks and not ema._forward_hooks
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert not loaded._forward_pre_hooks and not loaded._forward_hooks
    assert torch.equal(loaded(x[:4]), model(x[:4]))


class _ScriptedLoss(nn.Module):
    def forward(self, x, y):
        return F.mse_loss(x, y) + F.cross_entropy(x.unsqueeze(0), y.argmax().unsqueeze(0))


def test_torch_jit_script_still_compiles_the_losses_while_watching():
    x, y = torch.randn(3), torch.randn(3)
    expected = _ScriptedLoss()(x, y)
    with netdoctor.watch(mlp(), static=False):
        wrapped = F.cross_entropy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice
            scripted = torch.jit.script(_ScriptedLoss())
        assert F.cross_entropy is wrapped  # still watching
    assert torch.equal(scripted(x, y), expected)


# ------------------------------------------------------------------------------ for the callbacks


def test_parts_of_one_network_are_judged_as_parts():
    """An encoder ending in ReLU that feeds a head (both in one optimizer) is no model whose
    output is the logits: no ND106 on it, and a stalled loss is reported once, on the head."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
    head = nn.Linear(32, 4)
    opt = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=1e-6)
    x, y = data()
    with netdoctor.watch(announce=False) as doctor:
        for i in range(30):
            opt.zero_grad()
            F.cross_entropy(
                head(encoder(x[i * 16 : (i + 1) * 16]).flatten(1)), y[i * 16 : (i + 1) * 16]
            ).backward()
            opt.step()
    assert [m.facts.feeds for m in doctor.models] == [["Linear"], []]
    found = [(f.rule, (f.evidence or {}).get("model")) for f in doctor.findings]
    assert ("ND407", "Linear") in found and "ND106" not in rules(doctor), found
    assert len([r for r, _ in found if r == "ND407"]) == 1


def test_a_model_alone_ending_in_relu_is_still_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with netdoctor.watch(model, opt, announce=False) as doctor:
        train(model, opt, 5, x, y)
    assert "ND106" in rules(doctor)


def test_scope_names_the_parts_a_trainer_step_calls_and_ignores_the_rest():
    class Lit(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
            self.head = nn.Linear(32, 4)

    lit, other = Lit(), nn.Linear(16, 4)
    opt = torch.optim.SGD(lit.parameters(), lr=0.1)
    doctor = Doctor(
        WatchOptions(announce=False, static=False), discover_optimizers=False, scope=lit
    ).start()
    try:
        doctor.add_optimizer(opt)
        x, y = data()
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(lit.head(lit.encoder(x[:32])) + 0 * other(x[:32]), y[:32]).backward()
            opt.step()
    finally:
        doctor.close()
    assert [m.facts.label for m in doctor.models] == ["Lit.encoder", "Lit.head"]
    site = doctor.models[1].facts.site
    assert (
        site.path == __file__
        and "self.head = nn.Linear(32, 4)" in open(__file__).read().splitlines()[site.line - 1]
    )


def test_after_step_loss_fills_only_a_step_whose_backward_was_unseen():
    from torch.autograd import backward as captured  # bound before netdoctor wraps it

    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with netdoctor.watch(model, opt, static=False) as doctor:
        for i in range(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32])
            (captured if i < 2 else torch.autograd.backward)(loss)
            opt.step()
            doctor.observe_loss(100.0 + i, after_step=True)  # a trainer's batch-end report
    curve = doctor.diagnose().measurements["loss_curve"]
    assert curve[:2] == [100.0, 101.0]
    assert all(v < 10 for v in curve[2:])  # seen: the trainer's value is not used


def test_add_optimizer_looks_through_a_wrapper_whose_step_runs_no_hooks():
    class Wrapper(torch.optim.Optimizer):  # like accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        def step(self, closure=None):
            return self.optimizer.step(closure)

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none)

    x, y = data()
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = Wrapper(inner)
    with netdoctor.watch(model, opt, static=False) as doctor:
        train(model, opt, 3, x, y)
    assert [wo.optimizer for wo in doctor.optimizers] == [inner]
    assert doctor.optimizers[0].facts.steps == 3


def test_running_doctor_is_the_joinable_one_only():
    from netdoctor.watcher.doctor import running_doctor

    model = mlp()
    with netdoctor.watch(model, static=False) as doctor:
        assert running_doctor() is None
        doctor.joinable = True
        assert running_doctor() is doctor
    assert running_doctor() is None
