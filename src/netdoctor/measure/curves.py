"""The report's curves (`netdoctor.curves.Curves`) read off a measured training run: the
per-layer gradient norms and update ratios and the activation shares on the measured steps.
The probe and the watcher add what only they know (the loss, learning rate and scale per
step). Torch-free."""

from __future__ import annotations

import math

from netdoctor.curves import ActivationCurve, Curves, LayerCurve, finite_or_none
from netdoctor.measure.record import TrainingRun


def measured_steps(run: TrainingRun) -> list[int]:
    """The 1-based steps the per-layer traces hold one value each for."""
    return list(run.measured_steps) or list(range(1, run.steps_run + 1))


def run_curves(run: TrainingRun) -> Curves:
    """Curves of `run`: the loss and accuracy of every step, the layers and activations on
    the measured steps, and the total gradient norm over the weight layers per step (None on
    the steps not measured: a GradScaler's skipped ones)."""
    steps = measured_steps(run)
    layers = [
        LayerCurve(
            name=p.module if p.name.endswith(".weight") else p.name,
            grad_norm=finite_or_none(p.grad_norm),
            update_ratio=finite_or_none(p.update_ratio),
        )
        for p in run.weight_layers()
    ]
    activations = [
        ActivationCurve(
            name=a.name,
            kind=a.kind,
            share=finite_or_none(a.zero_fraction if a.kind == "relu" else a.saturation),
            dead_fraction=a.dead_fraction,
        )
        for a in run.activations
        if not a.is_output
    ]
    return Curves(
        loss=finite_or_none(run.loss),
        accuracy=finite_or_none(run.accuracy),
        grad_norm=_total_grad_norm(layers, steps, run.steps_run),
        measured_steps=steps,
        layers=layers,
        activations=activations,
    )


def _total_grad_norm(layers: list[LayerCurve], steps: list[int], n: int) -> list[float | None]:
    """sqrt of the sum of the layers' squared gradient norms, per step 1..n (None where no
    layer had a finite one)."""
    at = {step: i for i, step in enumerate(steps)}
    out: list[float | None] = []
    for step in range(1, n + 1):
        i = at.get(step)
        sq = [] if i is None else [c.grad_norm[i] for c in layers if i < len(c.grad_norm)]
        finite = [v for v in sq if v is not None]
        out.append(math.sqrt(sum(v * v for v in finite)) if finite else None)
    return out
