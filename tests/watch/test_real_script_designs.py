"""Designs that real training scripts use and the watcher must read right (found by
benchmarks/real_scripts.py on pytorch/examples): a GAN discriminator's output sigmoid saturates
as soon as it tells real from fake (dcgan), which is a confident prediction, not a unit that
blocks the gradient, while the same saturation on a hidden sigmoid still is one (ND405); an
LBFGS step evaluates its closure many times (time_sequence_prediction)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netdoctor


def _discriminator(hidden_sigmoid: bool) -> list[str]:
    torch.manual_seed(0)
    act = nn.Sigmoid() if hidden_sigmoid else nn.LeakyReLU(0.2)
    model = nn.Sequential(nn.Linear(16, 64), act, nn.Linear(64, 1), nn.Sigmoid())
    if hidden_sigmoid:
        with torch.no_grad():
            model[0].weight.mul_(30.0)  # hidden pre-activations deep in saturation
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    real, fake = torch.randn(512, 16) + 3.0, torch.randn(512, 16) - 3.0
    y = torch.cat([torch.ones(64), torch.zeros(64)])
    with netdoctor.watch(model, opt) as doctor:
        for i in range(60):
            k = i % 8
            x = torch.cat([real[k * 64 : (k + 1) * 64], fake[k * 64 : (k + 1) * 64]])
            opt.zero_grad()
            F.binary_cross_entropy(model(x).view(-1), y).backward()
            opt.step()
    return [f.module or "" for f in doctor.findings if f.rule == "ND405"]


def test_a_saturated_output_sigmoid_is_a_confident_prediction():
    assert _discriminator(hidden_sigmoid=False) == []


def test_a_saturated_hidden_sigmoid_is_still_found():
    assert _discriminator(hidden_sigmoid=True) == ["1"]


def test_lbfgs_steps_are_measured_at_their_first_evaluation():
    """LBFGS evaluates its closure many times per step (time_sequence_prediction): the loss of
    a step is the closure's first evaluation, the later ones do not leak into the next step's
    loss, and a quasi-Newton step's large update is no 'too large' update ratio (ND406)."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.8)
    first: list[float] = []
    with netdoctor.watch(model, opt) as doctor:
        for _ in range(4):
            calls: list[float] = []

            def closure(calls: list[float] = calls):
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                calls.append(loss.item())
                return loss

            opt.step(closure)
            first.append(calls[0])
            assert len(calls) > 1
    (facts,) = doctor.facts.optimizers
    assert facts.loss == [pytest.approx(v, rel=1e-6) for v in first]
    assert not [f for f in doctor.findings if f.severity.name in ("WARNING", "ERROR")]
