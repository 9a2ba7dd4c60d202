"""ND505 on the lr curves of torch's own schedulers (no training: a scheduler stepped on a bare
optimizer gives the very curve `netdoctor run` records): the epoch-sized ones stepped per batch
are found, the ones stepped as designed are not."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler as sched

from netdoctor.rules.loop.nd505_lr_collapse import Options, lr_collapse

STEPS = 300  # 30 epochs of 10 batches, the scheduler stepped after every batch
EPOCHS = 30


def curve(make, lr: float = 0.1, steps: int = STEPS) -> list[float]:
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=lr, momentum=0.9)
    scheduler = make(optimizer)
    out = []
    for _ in range(steps):
        out.append(max(group["lr"] for group in optimizer.param_groups))
        optimizer.step()
        scheduler.step()
    return out


def warmup_cosine(step: int) -> float:
    warmup = STEPS // 10
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (STEPS - warmup)))


SICK = {  # sized in epochs, stepped per batch
    "StepLR": lambda o: sched.StepLR(o, step_size=10, gamma=0.1),
    "MultiStepLR": lambda o: sched.MultiStepLR(o, milestones=[10, 20], gamma=0.01),
    "ExponentialLR": lambda o: sched.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: sched.CosineAnnealingLR(o, T_max=EPOCHS),
    "LinearLR to zero": lambda o: sched.LinearLR(o, 1.0, 1e-4, total_iters=EPOCHS),
    "PolynomialLR": lambda o: sched.PolynomialLR(o, total_iters=EPOCHS, power=2.0),
}
HEALTHY = {  # stepped per batch, as designed
    "CosineAnnealingLR over the run": lambda o: sched.CosineAnnealingLR(o, T_max=STEPS),
    "warmup + cosine (LambdaLR)": lambda o: sched.LambdaLR(o, warmup_cosine),
    "OneCycleLR": lambda o: sched.OneCycleLR(o, max_lr=0.1, total_steps=STEPS),
    "CyclicLR triangular": lambda o: sched.CyclicLR(o, 1e-3, 0.1, step_size_up=20),
    "CyclicLR triangular2": lambda o: sched.CyclicLR(
        o, 1e-3, 0.1, step_size_up=20, mode="triangular2"
    ),
    "CyclicLR exp_range": lambda o: sched.CyclicLR(
        o, 1e-4, 0.1, step_size_up=20, mode="exp_range", gamma=0.999
    ),
    "CosineAnnealingWarmRestarts": lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=50),
    "CosineAnnealingWarmRestarts T_mult=2": lambda o: sched.CosineAnnealingWarmRestarts(
        o, T_0=20, T_mult=2
    ),
    "StepLR per epoch-sized steps": lambda o: sched.StepLR(o, step_size=100, gamma=0.1),
    "ReduceLROnPlateau-like constant": lambda o: sched.ConstantLR(o, factor=1.0),
}


@pytest.mark.parametrize("name", sorted(SICK))
def test_epoch_sized_schedule_stepped_per_batch_is_found(name):
    found = lr_collapse(curve(SICK[name]), Options())
    assert found is not None, name
    assert found.at < STEPS // 4


def test_cosine_past_its_end_is_found_as_a_decay_that_climbs_back():
    found = lr_collapse(curve(SICK["CosineAnnealingLR"]), Options())
    assert found is not None and found.overrun is not None
    assert EPOCHS - 2 <= found.at <= EPOCHS  # below 1/100 of the peak just before T_max
    assert found.overrun.back_step > found.at


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_schedule_stepped_as_designed_is_not_found(name):
    assert lr_collapse(curve(HEALTHY[name]), Options()) is None, name
