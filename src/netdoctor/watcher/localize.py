"""Where the first NaN/Inf of a watched run came from, found at the optimizer step that would
have consumed it (before the update spreads it into the weights): the doctor's NaN localisation
part.

In order: the backward whose loss was non-finite; a loss function of that step whose input was
finite but whose output was not (the loss itself: every target `ignore_index`, log of 0); else a
replay of the watched model's forward that fed it (`measure.nonfinite.localize_forward`, with
the call's own arguments, random state and autocast, the model's buffers restored and the
user's random state untouched) to name the producing module; a finite loss with a non-finite
gradient names the first parameter backward reached.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from netdoctor.loading.forward import preserved_attributes, preserved_buffers
from netdoctor.measure.facts import LoopFacts
from netdoctor.measure.nonfinite import first_bad_grad, localize_forward, tensor_stats
from netdoctor.measure.params import ParamMeter
from netdoctor.measure.record import NonFinite
from netdoctor.watcher.events import BackwardRecord, Part, ScalerStep, StepMeasured
from netdoctor.watcher.losses import LossWatch
from netdoctor.watcher.models import ForwardCall, WatchedModel
from netdoctor.watcher.optimizers import WatchedOptimizer
from netdoctor.watcher.registry import Registry
from netdoctor.watcher.services import DirtyRules, Guard

# the first non-finite step's kind, as the ranks exchange it (`ranks.NONFINITE_KINDS`)
LOSS_NAN, LOSS_INF, GRADIENT_NAN, GRADIENT_INF = 1.0, 2.0, 3.0, 4.0


def _finite(t: torch.Tensor | None) -> bool:
    if t is None or not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t.detach()).all())


class Localization(Part):
    """The first non-finite step and where it came from. `events`: id(WatchedModel) it belongs
    to, or 0 for the loop itself -> the event (`measure.record.NonFinite`)."""

    def __init__(
        self,
        registry: Registry,
        losses: LossWatch,
        facts: LoopFacts,
        guard: Guard,
        dirty: DirtyRules,
    ):
        self.registry = registry
        self.losses = losses
        self.facts = facts
        self.guard = guard
        self.dirty = dirty
        self.events: dict[int, NonFinite] = {}
        self.step: int | None = None  # the first step with a non-finite loss or gradient
        self.code = 0.0  # its kind: LOSS_NAN, LOSS_INF, GRADIENT_NAN or GRADIENT_INF

    def first(self) -> tuple[int, float] | None:
        """(the first non-finite step, its kind), or None."""
        return (self.step, self.code) if self.step is not None else None

    def on_step_measured(self, event: StepMeasured) -> None:
        loss, grad_norm = event.loss, event.grad_norm
        if self.step is not None or (
            math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        ):
            return
        self.step = event.step
        if not math.isfinite(loss):
            self.code = LOSS_NAN if math.isnan(loss) else LOSS_INF
        elif grad_norm is not None and math.isnan(grad_norm):
            self.code = GRADIENT_NAN
        else:
            self.code = GRADIENT_INF
        where, found = self.localize(event.optimizer, event.step, event.backwards, loss)
        self.events[where] = found
        self.dirty.mark("ND401")

    def on_scaler_step(self, event: ScalerStep) -> None:
        """A step the GradScaler skipped with a non-finite loss: the forward overflowed (in
        fp16, past 65504) -- the scaler hides it by skipping, so it is localised here, with the
        forward replayed under the autocast it ran in."""
        wo = event.optimizer
        if self.step is not None or not event.skipped or wo is None or math.isfinite(event.loss):
            return
        self.step = event.step
        self.code = LOSS_NAN if math.isnan(event.loss) else LOSS_INF
        where, found = self.localize(wo, event.step, event.backwards, event.loss)
        self.events[where] = found
        self.dirty.mark("ND401")

    def localize(
        self, wo: WatchedOptimizer, step: int, backwards: list[BackwardRecord], loss: float
    ) -> tuple[int, NonFinite]:
        """(id of the WatchedModel it belongs to, or 0 for the loop itself; the event)."""
        models = self.registry.models
        owner = next((wm for wm in models if wm.owner is wo), None)
        owner_id = id(owner) if owner is not None else 0
        bad = next(
            (r for r in backwards if r.value is not None and not math.isfinite(r.value)), None
        )
        if bad is None and not math.isfinite(loss) and backwards:
            bad = backwards[-1]
        if bad is None:
            return owner_id, _bad_gradient(wo, owner, step)
        for call in bad.calls:
            out, inp = call.output, call.input  # the input only while the user still holds it
            if out is None or _finite(out):
                continue
            if self.losses.all_ignored(call):
                call.facts.all_ignored += 1
                n = call.target.numel() if call.target is not None else 0
                detail = (
                    f"every one of the {n} targets of this batch equals ignore_index "
                    f"({call.ignore_index}), so the mean over the remaining 0 targets is "
                    "0/0 = NaN"
                )
            elif inp is not None and _finite(inp):
                detail = ""
            else:
                continue  # the input was already non-finite (or is gone): replay the model
            return owner_id, NonFinite(
                step,
                "loss",
                detail=detail,
                location=call.facts.site,
                output_stats=tensor_stats(inp) if inp is not None else None,
            )
        for wm in sorted(models, key=lambda m: m is not owner):
            index = bad.forwards.get(id(wm))
            fc = next((c for c in reversed(wm.calls) if c.index == index), None) if index else None
            model = wm.model
            if fc is None or model is None or wm.compiled or wm.communicates:
                continue
            event = self._replay(model, fc, step)
            if event.reproduced:
                return id(wm), event
        return owner_id, NonFinite(
            step,
            "loss",
            detail="the model's outputs were finite but the loss computed from them was not",
            location=self.facts.backward_site,
        )

    def _replay(self, model: nn.Module, call: ForwardCall, step: int) -> NonFinite:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        devices = [device] if device.type == "cuda" else []
        autocast = (
            torch.autocast(call.autocast[0], dtype=call.autocast[1])
            if call.autocast
            else nullcontext()
        )
        with (
            self.guard.busy_scope(),
            torch.random.fork_rng(devices=devices),
            autocast,
            preserved_attributes(model),
            preserved_buffers([model]),
        ):
            return localize_forward(
                model, tuple(call.args), None, None, step, call.rng, device, kwargs=call.kwargs
            )


def _bad_gradient(wo: WatchedOptimizer, owner: WatchedModel | None, step: int) -> NonFinite:
    """A finite loss, a non-finite gradient: the parameter backward reached first."""
    if owner is None:
        return NonFinite(step, "gradient", detail="the loss was finite but a gradient was not")
    named = [(owner.params_by_id[id(p)][0], p) for p in wo.trainable if id(p) in owner.params_by_id]
    model = owner.model
    types = {n: type(m).__name__ for n, m in model.named_modules()} if model is not None else {}
    meter = ParamMeter(named, types)
    meter.before_step()
    meter.discard()
    order = (
        list(owner.recorder.order)
        if owner.recorder is not None and owner.recorder.order
        else list(dict.fromkeys(n.rpartition(".")[0] for n, _ in named))
    )
    return first_bad_grad(meter.traces, step, order)
