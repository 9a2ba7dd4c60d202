"""Loops that update the weights by hand (no optimizer): a step is a backward followed by a
change of the weights (`watcher.manual`). Such loops are measured and judged like optimizer
loops; backwards that change nothing (a saliency map) and optimizer loops are left as they
were."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import netdoctor
from netdoctor.findings import Severity


def _data():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    return x, (x @ torch.randn(16, 4)).argmax(dim=1)


def _manual_loop(steps: int, lr: float, clear: bool, **options):
    x, y = _data()
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with netdoctor.watch(net, every=1, **options) as doctor:
        for _ in range(steps):
            if clear:
                net.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= lr * p.grad
    return doctor, net


def test_a_manual_update_loop_is_measured_step_by_step():
    doctor, _ = _manual_loop(30, 0.5, clear=True)
    (wo,) = doctor.optimizers
    f = wo.facts
    assert f.manual and f.label == "manual update"
    assert f.steps == 29  # found at the first update, measured from the second
    assert all(math.isfinite(v) for v in f.loss) and f.loss[-1] < f.loss[0]
    assert all(math.isfinite(v) and v > 0 for v in f.grad_norm)
    # the lr, estimated from each update along the gradient, is the loop's own
    assert all(abs(lrs[0] - 0.5) < 1e-3 for lrs in f.lr), f.lr
    assert f.changed_steps == 29 and not f.unchanged_steps
    assert not [x for x in doctor.findings if x.severity >= Severity.WARNING]


def test_a_manual_update_loop_without_zero_grad_is_found_with_the_models_name():
    doctor, _ = _manual_loop(12, 0.01, clear=False)
    (finding,) = [x for x in doctor.findings if x.rule == "ND501"]
    assert finding.location is not None and finding.location.line is not None
    assert (
        "loss.backward()"
        in open(finding.location.path).read().splitlines()[finding.location.line - 1]
    )
    assert finding.fix is not None and "net.zero_grad()" in finding.fix.summary
    assert finding.fix.kind == "diff"
    assert "+            net.zero_grad()" in (finding.fix.patch or "")


def test_the_same_weights_with_and_without_netdoctor():
    x, y = _data()
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    start = {k: v.clone() for k, v in net.state_dict().items()}

    def train() -> dict:
        net.load_state_dict(start)
        for _ in range(10):
            net.zero_grad()
            F.cross_entropy(net(x), y).backward()
            for p in net.parameters():
                p.data.add_(p.grad, alpha=-0.1)
        return {k: v.clone() for k, v in net.state_dict().items()}

    bare = train()
    with netdoctor.watch(net, every=1):
        watched = train()
    assert all(torch.equal(bare[k], watched[k]) for k in bare)


def test_backwards_that_change_no_weight_are_not_steps():
    """A saliency map: gradients with respect to the input, the weights untouched."""
    x, _ = _data()
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with netdoctor.watch(net, every=1) as doctor:
        for _ in range(12):
            xi = x.clone().requires_grad_(True)
            net(xi).max(dim=1).values.sum().backward()
    assert doctor.optimizers == []
    assert not doctor.findings


def test_an_optimizer_loop_gets_no_manual_stand_in():
    x, y = _data()
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with netdoctor.watch(net, opt, every=1) as doctor:
        for _ in range(6):
            opt.zero_grad()
            for chunk in range(2):  # gradient accumulation: two backwards per step
                F.cross_entropy(net(x[chunk::2]), y[chunk::2]).backward()
            opt.step()
    assert [wo.facts.label for wo in doctor.optimizers] == ["SGD"]
    assert doctor.optimizers[0].facts.steps == 6
