"""Judgement that depends on the optimizer: Adam-family updates do not scale with the gradient,
so a gradient far above its weight (a loss summed over the batch, as pytorch/examples' VAE) is no
explosion there, while under SGD the same gradients are one (ND402)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import netdoctor


def _summed_loss_run(optimizer_cls, lr):
    """Gradients 1000s of times their weights' norm: small weights, a loss summed over 512."""
    torch.manual_seed(0)
    x, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    opt = optimizer_cls(model.parameters(), lr=lr)
    with netdoctor.watch(model, opt, every=1) as doctor:
        for _ in range(12):
            opt.zero_grad()
            F.cross_entropy(model(x), y, reduction="sum").backward()
            opt.step()
    return doctor


def test_adam_on_a_summed_loss_is_no_explosion():
    """Adam's update does not scale with the gradient: a gradient far above its weight is no
    explosion there (pytorch/examples' VAE); with SGD the same gradients are one."""
    assert not [f for f in _summed_loss_run(torch.optim.Adam, 1e-3).findings if f.rule == "ND402"]
    sgd = _summed_loss_run(torch.optim.SGD, 1e-9).findings
    assert [f for f in sgd if f.rule == "ND402"]
