"""What an optimizer step measures, for the doctor (`Doctor._step_pre` calls `measure_step`).

Every step: the learning rate of each param group, the total gradient norm (fused foreach
norms), the loss backward ran on and the step's accuracy, gathered in one host sync
(`optimizers.PendingScalars`). On deep steps also every parameter's gradient, weight and update
norms (the shared `measure.params.ParamMeter`, one per optimizer and model; the total gradient
norm is then their root sum of squares, not a second pass over the gradients), on the same host
sync, and ND502's check for parameters that receive gradients but are in no optimizer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from netdoctor.loading.provenance import assignment_site
from netdoctor.measure.params import ParamMeter
from netdoctor.watcher.optimizers import PendingScalars, WatchedOptimizer, total_grad_norm

if TYPE_CHECKING:
    from netdoctor.watcher.doctor import BackwardRecord, Doctor


def measure_step(
    doctor: Doctor,
    wo: WatchedOptimizer,
    step: int,
    deep: bool,
    backwards: list[BackwardRecord],
    with_grad: list,
) -> tuple[float, float | None, bool]:
    """Learning rates, total gradient norm, the step's loss and accuracy -- plus, on deep
    steps, every parameter's norms -- in one host sync. Returns (loss, gradient norm or None
    when no parameter had one, whether the per-parameter meters ran)."""
    f = wo.facts
    f.lr.append(wo.lrs())
    step_meters = meters(doctor, wo) if deep else []
    prepared = [meter.prepare() for _, meter in step_meters]
    norm = _norm_from_meters(step_meters, prepared, with_grad) if step_meters else None
    if norm is None:
        norm = total_grad_norm([p.grad for p in with_grad])
    grad_seen, wo.grad_seen = wo.grad_seen, set()
    doctor._unscaled.clear()
    for rec in backwards:
        if rec.loss is not None:
            doctor.pending.add(
                rec.loss.float().mean() if rec.loss.numel() > 1 else rec.loss,
                lambda v, r=rec: setattr(r, "value", v),
            )
    result: dict[str, float] = {}
    if norm is not None:
        doctor.pending.add(norm, lambda v: result.__setitem__("norm", v))
    acc = doctor.losses.step_accuracy()
    for i in range(0, len(acc) - 1, 2):
        doctor.pending.add(
            acc[i], lambda v: result.__setitem__("correct", result.get("correct", 0.0) + v)
        )
        doctor.pending.add(
            acc[i + 1], lambda v: result.__setitem__("counted", result.get("counted", 0.0) + v)
        )

    if step_meters:  # the meters' norms ride on the step's one host sync
        items = doctor.pending.take()
        scalars = [t for t, _ in items] + [t for part in prepared for t in part]
        values = PendingScalars.stack(scalars).tolist() if scalars else []
        for (_, then), v in zip(items, values):
            then(v)
        at = len(items)
        for (_, meter), part in zip(step_meters, prepared):
            meter.record(values[at : at + len(part)])
            at += len(part)
        for _, meter in step_meters:  # a gradient backward gave, cleared before the step
            for p, trace in zip(meter.params, meter.traces):
                if p.grad is None and id(p) in grad_seen:
                    trace.steps_with_grad += 1
        wo.deep_steps.append(step)
    else:
        doctor.pending.resolve()

    # the loss: what backward ran on since the last step, else a trainer's logged one
    values = [r.value for r in backwards if r.value is not None]
    loss = (
        sum(values) / len(values)
        if values
        else (doctor.observed[-1] if doctor.observed else math.nan)
    )
    wo.loss_unseen = not values and not doctor.observed
    doctor.observed.clear()
    f.loss.append(loss)
    wo.loss_fns.append({r.fn for r in backwards})
    grad_norm = result.get("norm")
    f.grad_norm.append(math.nan if grad_norm is None else grad_norm)
    counted = result.get("counted", 0.0)
    wo.accuracy.append(result["correct"] / counted if deep and counted else None)
    if deep:
        unoptimized_check(doctor, wo)
    return loss, grad_norm, bool(step_meters)


def _norm_from_meters(step_meters: list, prepared: list[list], with_grad: list) -> Any:
    """The total gradient norm from the per-parameter norms the meters just computed, when
    they cover exactly the parameters that have a gradient (else None: measured apart)."""
    ids = [id(p) for _, meter in step_meters for p, h in zip(meter.params, meter.have) if h]
    if len(ids) != len(with_grad) or set(ids) != {id(p) for p in with_grad} or not ids:
        return None
    norms = [t for (_, meter), part in zip(step_meters, prepared) for t in part[: meter.n_grads]]
    return torch.linalg.vector_norm(PendingScalars.stack(norms))


def meters(
    doctor: Doctor, wo: WatchedOptimizer, build: bool = True
) -> list[tuple[Any, ParamMeter]]:
    """One ParamMeter per (optimizer, model): per-parameter norms on deep steps."""
    sig = (len(wo.trainable), len(doctor.models))
    if build and wo.meter_signature != sig:
        wo.meters = []
        for wm in doctor.models:
            if wm.compiled or wo not in wm.optimizers:
                continue
            named = [
                (wm.params_by_id[id(p)][0], p) for p in wo.trainable if id(p) in wm.params_by_id
            ]
            if not named:
                continue
            model = wm.model
            types = (
                {n: type(m).__name__ for n, m in model.named_modules()} if model is not None else {}
            )
            wo.meters.append((wm, ParamMeter(named, types)))
        wo.meter_signature = sig
    return wo.meters


def unoptimized_check(doctor: Doctor, wo: WatchedOptimizer) -> None:
    """ND502 facts: trainable parameters with a gradient that no optimizer holds."""
    if wo is not doctor.primary:
        return
    held: set[int] = set()
    for other in doctor.optimizers:
        held |= {id(p) for p in other.params}
    for wm in doctor.models:
        model = wm.model
        if model is None or wm.compiled:
            continue
        wm.refresh_params()
        wm.facts.grad_checks += 1
        for pid, (name, p) in wm.params_by_id.items():
            if p.requires_grad and p.grad is not None and pid not in held:
                wm.facts.unoptimized[name] = wm.facts.unoptimized.get(name, 0) + 1
                module = name.rpartition(".")[0]
                if module not in wm.facts.unoptimized_sites:
                    try:
                        loc = doctor.provenance.site(
                            model.get_submodule(module)
                        ) or assignment_site(model, module)
                    except AttributeError:
                        loc = None
                    if loc is not None:
                        wm.facts.unoptimized_sites[module] = loc
                doctor._dirty.add("ND502")
