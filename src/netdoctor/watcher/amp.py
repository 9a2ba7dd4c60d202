"""Mixed precision inside the user's loop: the doctor's AMP part.

What it records (`measure.facts.ScalerFacts`, `PrecisionFacts`; judged by ND601-ND604):

* per GradScaler: each `scaler.step` and whether it skipped the optimizer step (torch ran no
  optimizer step inside it), the loss of a skipped step (non-finite: the forward overflowed, and
  the NaN localisation names the module; finite: the gradients did), the scale after each
  `update()` (read on the step's one host sync, never a sync of its own), the user's `unscale_`
  calls, a `clip_grad_norm_` / `clip_grad_value_` that ran while the gradients were still
  multiplied by the scale (a loss was scaled since the last update and not unscaled), and steps
  whose backward ran on the plain loss instead of the scaled one;
* per optimizer whose parameters are float16/bfloat16 (a model cast with `.half()` or
  `.to(torch.bfloat16)` and trained as such): their share, an Adam-style `eps` too small for
  float16, and on deep steps how many elements that had a nonzero gradient the update left
  unchanged (their update rounded away). This copies the low-precision parameters once per deep
  step; fp32 parameters under autocast, the healthy setup, cost nothing.

Gradients are judged unscaled without help from here: `scaler.step` unscales before it calls
`optimizer.step()`, whose hooks measure them (`measurement`).
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from netdoctor.findings import Location
from netdoctor.loading.provenance import user_location
from netdoctor.measure.facts import LoopFacts, PrecisionFacts, ScalerFacts
from netdoctor.watcher.events import (
    BackwardStart,
    GradClipped,
    LossScaled,
    Part,
    ScalerStep,
    ScalerUpdate,
    StepEnd,
    StepStart,
    Unscaled,
)
from netdoctor.watcher.localize import Localization
from netdoctor.watcher.optimizers import PendingScalars, WatchedOptimizer
from netdoctor.watcher.services import DirtyRules

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(eq=False)
class _Scaler:
    facts: ScalerFacts
    ref: weakref.ref[Any]
    scaled: bool = False  # a loss scaled since the last update()
    unscaled: bool = False  # the user's unscale_() since the last update()
    scaled_backwards: int = 0  # backwards of a scaled loss since the last step()


@dataclass(eq=False)
class _Snapshot:
    """Low-precision parameters before a deep step's update."""

    optimizer: WatchedOptimizer
    facts: PrecisionFacts
    params: list[torch.nn.Parameter]
    before: list[torch.Tensor]


class AmpWatch(Part):
    """See the module docstring."""

    def __init__(
        self,
        facts: LoopFacts,
        localization: Localization,
        pending: PendingScalars,
        dirty: DirtyRules,
    ):
        self.facts = facts
        self.localization = localization
        self.pending = pending
        self.dirty = dirty
        self._scalers: dict[int, _Scaler] = {}
        self._scaled: dict[int, tuple[weakref.ref[torch.Tensor], _Scaler]] = {}
        self._plain_backwards = 0  # backwards of an unscaled tensor since the last scaler step
        self._plain_site: Location | None = None
        self._precision: dict[int, tuple[int, PrecisionFacts | None]] = {}
        self._snapshot: _Snapshot | None = None

    # -- GradScaler ----------------------------------------------------------------------
    def _scaler(self, scaler: Any) -> _Scaler:
        known = self._scalers.get(id(scaler))
        if known is not None and known.ref() is scaler:
            return known
        name = type(scaler).__name__
        taken = sum(1 for s in self.facts.scalers if s.label.split("#")[0] == name)
        enabled = bool(scaler.is_enabled()) if hasattr(scaler, "is_enabled") else True
        facts = ScalerFacts(f"{name}#{taken + 1}" if taken else name, enabled=enabled)
        if enabled:
            facts.initial_scale = float(scaler.get_scale())
        self.facts.scalers.append(facts)
        state = _Scaler(facts, weakref.ref(scaler))
        self._scalers[id(scaler)] = state
        return state

    def on_loss_scaled(self, event: LossScaled) -> None:
        if event.scaler is None:
            return
        state = self._scaler(event.scaler)
        if not state.facts.enabled:
            return
        state.scaled = True
        if state.facts.scale_site is None:
            state.facts.scale_site = user_location()
        self._scaled[id(event.scaled)] = (weakref.ref(event.scaled), state)

    def on_backward(self, event: BackwardStart) -> None:
        t = event.tensor
        if t is None or not self._scalers:
            return
        entry = self._scaled.pop(id(t), None)
        if entry is not None and entry[0]() is t:
            entry[1].scaled_backwards += 1
            return
        self._plain_backwards += 1
        if self._plain_site is None:
            self._plain_site = user_location()

    def on_unscaled(self, event: Unscaled) -> None:
        state = self._scaler(event.scaler)
        state.unscaled = True
        state.facts.unscale_calls += 1

    def on_grad_clipped(self, event: GradClipped) -> None:
        for state in list(self._scalers.values()):
            f = state.facts
            scaler = state.ref()
            if scaler is None or not f.enabled or not state.scaled:
                continue
            f.clips += 1
            if state.unscaled:
                continue
            f.scaled_clips += 1
            if f.clip_site is None:  # the first one, read once (a sync, on a broken loop)
                f.clip_site = user_location()
                f.clip_kind = event.kind
                f.clip_limit = event.limit
                result = event.result
                if isinstance(result, torch.Tensor) and result.numel() == 1:
                    f.clip_seen_norm = float(result)
                f.clip_scale = float(scaler.get_scale())
            self.dirty.mark("ND602")

    def on_scaler_step(self, event: ScalerStep) -> None:
        state = self._scaler(event.scaler)
        f = state.facts
        if not f.enabled:
            return
        f.steps += 1
        if f.step_site is None:
            f.step_site = user_location()
        if state.scaled_backwards:
            f.scaled_backward_steps += 1
        elif self._plain_backwards:
            f.unscaled_backward_steps += 1
            f.unscaled_backward_site = f.unscaled_backward_site or self._plain_site
            self.dirty.mark("ND603")
        state.scaled_backwards = 0
        self._plain_backwards = 0
        self._scaled.clear()
        if not event.skipped:
            return
        f.skipped.append(f.steps)
        f.skipped_losses.append(event.loss)
        if not math.isfinite(event.loss) and f.overflow_module is None:
            for found in self.localization.events.values():
                if found.step == event.step and found.module:
                    f.overflow_module = found.module
                    break
        self.dirty.mark("ND601")

    def on_scaler_update(self, event: ScalerUpdate) -> None:
        state = self._scaler(event.scaler)
        state.scaled = state.unscaled = False
        f = state.facts
        if not f.enabled:
            return
        scale = getattr(event.scaler, "_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            # a copy: update() changes the scale in place; read on the next host sync
            self.pending.add(scale.detach().clone(), f.scale.append)
        else:
            f.scale.append(float(event.scaler.get_scale()))
        self.dirty.mark("ND601")

    # -- low-precision weights -----------------------------------------------------------
    def _precision_of(self, wo: WatchedOptimizer) -> PrecisionFacts | None:
        trainable = wo.trainable
        known = self._precision.get(id(wo))
        if known is not None and known[0] == len(trainable):
            return known[1]
        low = [p for p in trainable if p.dtype in LOW_PRECISION]
        facts: PrecisionFacts | None = None
        if low:
            dtype = Counter(p.dtype for p in low).most_common(1)[0][0]
            groups = wo.optimizer.param_groups if wo.optimizer is not None else []
            eps = [
                g["eps"]
                for g in groups
                if isinstance(g.get("eps"), (int, float)) and not isinstance(g.get("eps"), bool)
            ]
            facts = PrecisionFacts(
                optimizer=wo.facts.label,
                dtype=str(dtype).removeprefix("torch."),
                low_params=len(low),
                low_elements=sum(p.numel() for p in low),
                params=len(trainable),
                eps=float(min(eps)) if eps else None,
                site=wo.facts.site or wo.facts.step_site,
            )
            previous = known[1] if known is not None else None
            if previous is not None and previous in self.facts.precision:
                self.facts.precision.remove(previous)
            self.facts.precision.append(facts)
            self.dirty.mark("ND604")
        self._precision[id(wo)] = (len(trainable), facts)
        return facts

    def on_step_start(self, event: StepStart) -> None:
        self._snapshot = None
        facts = self._precision_of(event.optimizer)
        if facts is None or not event.deep:
            return
        params = [
            p for p in event.optimizer.trainable if p.dtype in LOW_PRECISION and p.grad is not None
        ]
        if params:
            before = [p.detach().clone() for p in params]
            self._snapshot = _Snapshot(event.optimizer, facts, params, before)

    def on_step_end(self, event: StepEnd) -> None:
        snap, self._snapshot = self._snapshot, None
        if snap is None or snap.optimizer is not event.optimizer:
            return
        counts: list[torch.Tensor] = []
        with torch.no_grad():
            for p, before in zip(snap.params, snap.before):
                grad = p.grad
                if grad is None or grad.shape != p.shape:
                    continue
                moving = grad != 0
                counts.append(moving.sum())
                counts.append(((p.detach() == before) & moving).sum())
        if not counts:
            return
        values = torch.stack(counts).tolist()
        snap.facts.with_grad += int(sum(values[0::2]))
        snap.facts.unchanged += int(sum(values[1::2]))
        snap.facts.measured_steps += 1
        self.dirty.mark("ND604")
