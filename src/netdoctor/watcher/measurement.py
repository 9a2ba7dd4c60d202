"""What an optimizer step measures: the doctor's per-step measurement part.

Every step: the learning rate of each param group, the total gradient norm (fused foreach
norms), the loss backward ran on and the step's accuracy, gathered in one host sync
(`optimizers.PendingScalars`). On deep steps also every parameter's gradient, weight and update
norms (the shared `measure.params.ParamMeter`, one per optimizer and model; the total gradient
norm is then their root sum of squares, not a second pass over the gradients), on the same host
sync, and every layer's activations (each watched model's `ActivationRecorder`, attached for the
forwards of a deep step).

The loss: each backward is recorded with the tensor it ran on (unscaled when `GradScaler.scale`
made it), the loss function that produced it and the watched models' forward counters (for the
NaN localisation); a trainer's logged loss stands in for a step whose backward netdoctor did not
see (`observe_loss`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch

from netdoctor.measure.params import ParamMeter
from netdoctor.watcher.events import (
    BackwardEnd,
    BackwardRecord,
    BackwardStart,
    Close,
    ForwardEnd,
    ForwardStart,
    LossScaled,
    Part,
    StepEnd,
    StepMeasured,
    StepStart,
)
from netdoctor.watcher.losses import LossWatch
from netdoctor.watcher.optimizers import PendingScalars, WatchedOptimizer, total_grad_norm
from netdoctor.watcher.registry import Registry
from netdoctor.watcher.schedule import Schedule
from netdoctor.watcher.services import Guard


class Measurement(Part):
    """See the module docstring. `sampling()`: whether the coming training step is deep."""

    def __init__(
        self,
        registry: Registry,
        losses: LossWatch,
        pending: PendingScalars,
        guard: Guard,
        schedule: Schedule,
        sampling: Callable[[], bool],
    ):
        self.registry = registry
        self.losses = losses
        self.pending = pending
        self.guard = guard
        self.schedule = schedule
        self.sampling = sampling
        self.backwards: list[BackwardRecord] = []  # since the last step
        self.observed: list[float] = []  # a trainer's logged losses, for the coming step
        # id(scaled loss) -> (its weakref, the loss, id(the loss))
        self._unscaled: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor, int]] = {}

    # -- public ----------------------------------------------------------------------------
    def observe_loss(self, value: float, after_step: bool) -> None:
        """A trainer's logged loss, used only for a step whose backward netdoctor did not see:
        the coming step's, or with `after_step` the step just taken."""
        if not after_step:
            self.observed.append(value)
            return
        wo = self.registry.primary
        if wo is not None and wo.loss_unseen and wo.facts.loss:
            wo.facts.loss[-1] = value
            wo.loss_unseen = False

    def meters(self, wo: WatchedOptimizer, build: bool = True) -> list[tuple[Any, ParamMeter]]:
        """One ParamMeter per (optimizer, model): per-parameter norms on deep steps."""
        models = self.registry.models
        sig = (len(wo.trainable), len(models))
        if build and wo.meter_signature != sig:
            wo.meters = []
            for wm in models:
                if wm.compiled or wo not in wm.optimizers:
                    continue
                named = [
                    (wm.params_by_id[id(p)][0], p) for p in wo.trainable if id(p) in wm.params_by_id
                ]
                if not named:
                    continue
                model = wm.model
                types = (
                    {n: type(m).__name__ for n, m in model.named_modules()}
                    if model is not None
                    else {}
                )
                wo.meters.append((wm, ParamMeter(named, types)))
            wo.meter_signature = sig
        return wo.meters

    # -- forwards and backwards -------------------------------------------------------------
    def on_forward_start(self, event: ForwardStart) -> None:
        wm = event.model
        owner = wm.owner
        step = (owner.facts.steps if owner is not None else 0) + 1
        if wm.recorder is not None and self.schedule.is_deep(step):
            wm.begin_measure(step)

    def on_forward_end(self, event: ForwardEnd) -> None:
        if event.model.measuring:
            self.guard.run(event.model.end_measure)

    def on_backward(self, event: BackwardStart) -> None:
        for wm in self.registry.models:  # the forward is over: its per-layer hooks come off
            wm.detach_recorder()
        t = event.tensor
        source = t  # the tensor a loss function returned, when netdoctor saw it
        unscaled = self._unscaled.pop(id(t), None) if t is not None else None
        if unscaled is not None and unscaled[0]() is t:  # GradScaler.scale(loss)
            loss: torch.Tensor | None = unscaled[1]
            source_id: int | None = unscaled[2]
        else:
            loss = (
                t.detach() if t is not None and t.is_floating_point() and t.numel() <= 1 else None
            )
            source_id = id(source) if source is not None else None
        taken = {id(c) for r in self.backwards for c in r.calls}
        calls = [c for c in self.losses.recent if id(c) not in taken]
        self.backwards.append(
            BackwardRecord(
                loss=loss,
                fn=self.losses.outputs.get(source_id) if source_id is not None else None,
                forwards={id(wm): wm.forwards for wm in self.registry.models},
                calls=calls,
            )
        )

    def on_backward_end(self, event: BackwardEnd) -> None:
        """On deep steps: which parameters backward gave a gradient (a zero_grad() between
        backward and step must not read as "no gradient ever reached them")."""
        if not self.sampling():
            return
        for wo in self.registry.optimizers:
            wo.grad_seen |= {id(p) for p in wo.trainable if p.grad is not None}

    def on_loss_scaled(self, event: LossScaled) -> None:
        """Remember the unscaled loss for the backward of the scaled one (the scale changes
        during training; the loss curve must not)."""
        scaled, loss = event.scaled, event.loss
        self._unscaled[id(scaled)] = (weakref.ref(scaled), loss.detach(), id(loss))

    # -- the step --------------------------------------------------------------------------
    def on_step_start(self, event: StepStart) -> None:
        for wm in self.registry.models:  # no per-layer hook stays through a step
            wm.detach_recorder()

    def measure(self, start: StepStart) -> StepMeasured:
        """Learning rates, total gradient norm, the step's loss and accuracy -- plus, on deep
        steps, every parameter's norms -- in one host sync."""
        wo, step, deep = start.optimizer, start.step, start.deep
        backwards, self.backwards = self.backwards, []
        with_grad = [p for p in wo.trainable if p.grad is not None]
        f = wo.facts
        f.lr.append(wo.lrs())
        step_meters = self.meters(wo) if deep else []
        prepared = [meter.prepare() for _, meter in step_meters]
        norm = _norm_from_meters(step_meters, prepared, with_grad) if step_meters else None
        if norm is None:
            norm = total_grad_norm(cast(list[torch.Tensor], [p.grad for p in with_grad]))
        grad_seen, wo.grad_seen = wo.grad_seen, set()
        self._unscaled.clear()
        pending = self.pending
        for rec in backwards:
            if rec.loss is not None:
                pending.add(
                    rec.loss.float().mean() if rec.loss.numel() > 1 else rec.loss,
                    _value_of(rec),
                )
        result: dict[str, float] = {}

        def into(key: str) -> Callable[[float], None]:
            return lambda v: result.__setitem__(key, result.get(key, 0.0) + v)

        if norm is not None:
            pending.add(norm, lambda v: result.__setitem__("norm", v))
        acc = self.losses.step_accuracy()
        for i in range(0, len(acc) - 1, 2):
            pending.add(acc[i], into("correct"))
            pending.add(acc[i + 1], into("counted"))

        if step_meters:  # the meters' norms ride on the step's one host sync
            items = pending.take()
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
            pending.resolve()

        # the loss: what backward ran on since the last step, else a trainer's logged one
        seen = [r.value for r in backwards if r.value is not None]
        loss = sum(seen) / len(seen) if seen else (self.observed[-1] if self.observed else math.nan)
        wo.loss_unseen = not seen and not self.observed
        self.observed.clear()
        f.loss.append(loss)
        wo.loss_fns.append({r.fn for r in backwards})
        grad_norm = result.get("norm")
        f.grad_norm.append(math.nan if grad_norm is None else grad_norm)
        counted = result.get("counted", 0.0)
        wo.accuracy.append(result["correct"] / counted if deep and counted else None)
        return StepMeasured(
            wo, step, deep, backwards, with_grad, loss, grad_norm, measured=bool(step_meters)
        )

    def skip(self) -> tuple[list[BackwardRecord], float]:
        """A step the GradScaler skipped: the backwards since the last step and their mean loss
        (one host sync), taken as a step would take them; the per-layer hooks come off and the
        activations a deep forward recorded are kept, as after a step."""
        backwards, self.backwards = self.backwards, []
        self._unscaled.clear()
        for rec in backwards:
            if rec.loss is not None:
                self.pending.add(
                    rec.loss.float().mean() if rec.loss.numel() > 1 else rec.loss,
                    _value_of(rec),
                )
        self.pending.resolve()
        seen = [r.value for r in backwards if r.value is not None]
        loss = sum(seen) / len(seen) if seen else math.nan
        self.observed.clear()
        for wm in self.registry.models:
            wm.end_measure()
            wm.detach_recorder()
            if wm.recorder is not None and wm.measured_step is not None:
                wm.recorder.flush_step()  # a real forward: its activations (and headroom) count
        self.losses.end_step()
        return backwards, loss

    def after_step(self, wo: WatchedOptimizer, step: int) -> bool | None:
        """After the update of a step the meters measured: their update ratios, and whether
        the update moved a parameter (None when the meters did not measure this step)."""
        if not (wo.deep_steps and wo.deep_steps[-1] == step):
            return None
        moved = False
        keep = self.schedule.is_deep(step + 1)  # the snapshot's buffers serve the next
        for _, meter in self.meters(wo, build=False):
            meter.keep = keep
            meter.after_step()
            moved |= any(t.update_ratio and t.update_ratio[-1] > 0 for t in meter.traces)
        for wm in self.registry.models:
            if wm.owner is wo and wm.recorder is not None:
                wm.recorder.flush_step()
                if self.schedule.restarts_window(step):
                    wm.recorder.new_window()
        return moved

    def on_step_end(self, event: StepEnd) -> None:
        # A closure optimizer (LBFGS) evaluates the loss again inside its step, after the step
        # was measured at the closure's first return: those evaluations belong to this step,
        # not to the next one's loss.
        self.backwards = []
        self._unscaled.clear()
        self.losses.end_step()

    def on_close(self, event: Close) -> None:
        for m in self.registry.models:
            m.end_measure()
        self.pending.resolve()


def _value_of(rec: BackwardRecord) -> Callable[[float], None]:
    def then(v: float) -> None:
        rec.value = v

    return then


def _norm_from_meters(
    step_meters: list[tuple[Any, ParamMeter]], prepared: list[list[Any]], with_grad: list[Any]
) -> Any:
    """The total gradient norm from the per-parameter norms the meters just computed, when
    they cover exactly the parameters that have a gradient (else None: measured apart)."""
    ids = [id(p) for _, meter in step_meters for p, h in zip(meter.params, meter.have) if h]
    if len(ids) != len(with_grad) or set(ids) != {id(p) for p in with_grad} or not ids:
        return None
    norms = [t for (_, meter), part in zip(step_meters, prepared) for t in part[: meter.n_grads]]
    return torch.linalg.vector_norm(PendingScalars.stack(norms))
