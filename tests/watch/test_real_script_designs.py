"""Designs that real training scripts use and the watcher must read right (found by
benchmarks/real_scripts.py on pytorch/examples): a GAN discriminator's output sigmoid saturates
as soon as it tells real from fake (dcgan), which is a confident prediction, not a unit that
blocks the gradient; the same saturation on a hidden sigmoid still is one (ND405)."""

from __future__ import annotations

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
