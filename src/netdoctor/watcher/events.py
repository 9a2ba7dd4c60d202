"""The watcher's event protocol: what the doctor's parts are told, and when.

The doctor (`doctor.Doctor`) turns torch's global hooks and wrappers (`attach`), the root-module
hooks of each watched model (`registry`) and its own lifecycle into typed events, and hands each
one to every part that overrides its hook (`Part`), in the parts' order (`Dispatcher`) -- the
named hook points of a Lightning `Callback` or a pytest hookspec. A part keeps its own state and
shares nothing private: what another part needs is a public method or a small shared object
(`services.Guard`, `services.DirtyRules`, `optimizers.PendingScalars`, `measure.facts.LoopFacts`).

The hooks, in the order a training step meets them:

* `on_forward_start(ForwardStart)` / `on_forward_end(ForwardEnd)`: a watched model's root forward
  with gradients enabled (its replay record is kept before the parts hear of it); the end is
  delivered even while netdoctor is busy (a measurement begun must end);
* `on_backward(BackwardStart)` / `on_backward_end(BackwardEnd)`: `torch.autograd.backward`;
* `on_loss_scaled(LossScaled)`: `GradScaler.scale(loss)`;
* `on_unscaled(Unscaled)`, `on_grad_clipped(GradClipped)`: the user's `scaler.unscale_(opt)`
  and a `clip_grad_norm_` / `clip_grad_value_` call;
* `on_scaler_step(ScalerStep)`: `scaler.step(opt)` returned -- after the optimizer step's own
  events when it stepped, or alone when the scaler skipped the step (an inf/NaN gradient: that
  iteration's loss and backwards are handed over then, and the NaN localisation runs);
* `on_scaler_update(ScalerUpdate)`: `scaler.update()` returned;
* `on_step_start(StepStart)`: an optimizer step, before anything is measured (the one-off
  static checks, the process group looked for);
* `on_step_measured(StepMeasured)`: the step's measurements, one host sync (`measurement`), for
  the loop facts and the NaN localisation; then, on deep steps under torchrun, the ranks'
  exchange, and the live judgement, which may stop training there (called, not dispatched: they
  answer);
* `on_step_end(StepEnd)`: after the update;
* `on_train_mode(TrainMode)`, `on_scheduler_step(SchedulerStep)`: `Module.train`/`.eval()` and an
  lr scheduler's `step`, anywhere in the loop;
* `on_close(Close)`: the doctor is closing, before any hook is removed.

Every event but `on_forward_end` is delivered only while netdoctor is not busy with its own
forwards (a static check's trace, a replay), and inside the doctor's guard (`services.Guard`: an
internal error is a note, never an exception in the user's loop; a handler that fails ends that
event's delivery). `on_forward_end` runs in torch's forward hook: each handler guards its own
work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netdoctor.watcher.losses import LossCall
from netdoctor.watcher.models import WatchedModel
from netdoctor.watcher.optimizers import WatchedOptimizer


# -- the events -----------------------------------------------------------------------------
@dataclass(slots=True)
class ForwardStart:
    """A watched model's root forward begins, with gradients enabled."""

    model: WatchedModel
    module: nn.Module  # the root module called (the live object behind `model`)
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(slots=True)
class ForwardEnd:
    """A watched model's root forward returned or raised (`output` None then)."""

    model: WatchedModel
    output: Any


@dataclass(slots=True)
class BackwardStart:
    """A backward begins. `tensor`: the one tensor it runs on (None for several)."""

    tensor: torch.Tensor | None

    @staticmethod
    def of(tensors: Any) -> BackwardStart:
        if isinstance(tensors, torch.Tensor):
            return BackwardStart(tensors)
        if (
            isinstance(tensors, (list, tuple))
            and len(tensors) == 1
            and isinstance(tensors[0], torch.Tensor)
        ):
            return BackwardStart(tensors[0])
        return BackwardStart(None)


@dataclass(slots=True)
class BackwardEnd:
    """A backward returned."""


@dataclass(slots=True)
class LossScaled:
    """`GradScaler.scale(loss)` returned `scaled`."""

    loss: torch.Tensor
    scaled: torch.Tensor
    scaler: Any = None


@dataclass(slots=True)
class Unscaled:
    """The user called `scaler.unscale_(optimizer)` (not the call `scaler.step` makes)."""

    scaler: Any
    optimizer: Any


@dataclass(slots=True)
class GradClipped:
    """`clip_grad_norm_` (`kind` "norm") or `clip_grad_value_` ("value") ran on `parameters`
    with `limit`; `result`: what it returned (the total norm before clipping, a device
    tensor: reading it syncs)."""

    kind: str
    parameters: list[Any]
    limit: float | None
    result: Any


@dataclass(eq=False)
class ScalerStep:
    """`scaler.step(optimizer)` returned. `skipped`: it did not call `optimizer.step()` (an
    inf/NaN among the gradients); `optimizer`: the watched one, when it is watched; `step`: the
    optimizer's step this was (for a skipped one, the step that did not happen). For a skipped
    step, `backwards` and `loss` are that iteration's (the step measurement that would have
    taken them never runs)."""

    scaler: Any
    optimizer: WatchedOptimizer | None
    skipped: bool
    step: int
    backwards: list[BackwardRecord] = field(default_factory=list)
    loss: float = float("nan")


@dataclass(slots=True)
class ScalerUpdate:
    """`scaler.update()` returned."""

    scaler: Any


@dataclass(slots=True)
class StepStart:
    """A watched optimizer's step begins (`step`: its own count, 1-based, already counted),
    before its update. `deep`: the schedule's per-layer step."""

    optimizer: WatchedOptimizer
    step: int
    deep: bool


@dataclass(eq=False)  # compared by identity (it holds tensors)
class BackwardRecord:
    """One backward since the last step: the loss it ran on and what preceded it."""

    loss: torch.Tensor | None
    fn: str | None  # the loss function that produced the tensor, when netdoctor saw it
    forwards: dict[int, int]  # id(WatchedModel) -> that model's forward counter
    calls: list[LossCall] = field(default_factory=list)  # loss calls since the last backward
    value: float | None = None


@dataclass(slots=True)
class StepMeasured:
    """What the step measured, before its update (`measurement.Measurement.measure`)."""

    optimizer: WatchedOptimizer
    step: int
    deep: bool
    backwards: list[BackwardRecord]  # the backwards since the optimizer's previous step
    with_grad: list[nn.Parameter]  # its trainable parameters that have a gradient
    loss: float  # the step's loss (nan: none seen)
    grad_norm: float | None  # the total gradient norm (None: no parameter had a gradient)
    measured: bool  # whether the per-parameter meters ran


@dataclass(slots=True)
class StepEnd:
    """A watched optimizer's step returned. `moved`: whether the update changed a parameter,
    when the deep meters measured it (None: the parts' own cheap check decides)."""

    optimizer: WatchedOptimizer
    step: int
    moved: bool | None


@dataclass(slots=True)
class TrainMode:
    """`module.train(mode)` (`.eval()` is `mode=False`), called by the user."""

    module: nn.Module
    mode: bool


@dataclass(slots=True)
class SchedulerStep:
    """An lr scheduler's `step()` (also its constructor's own first one)."""

    scheduler: Any


@dataclass(slots=True)
class Close:
    """The doctor is closing (every hook still installed)."""


# -- the parts ------------------------------------------------------------------------------
class Part:
    """One part of the doctor. Override the hooks it needs; the others are never called."""

    def on_forward_start(self, event: ForwardStart) -> None:
        pass

    def on_forward_end(self, event: ForwardEnd) -> None:
        pass

    def on_backward(self, event: BackwardStart) -> None:
        pass

    def on_backward_end(self, event: BackwardEnd) -> None:
        pass

    def on_loss_scaled(self, event: LossScaled) -> None:
        pass

    def on_unscaled(self, event: Unscaled) -> None:
        pass

    def on_grad_clipped(self, event: GradClipped) -> None:
        pass

    def on_scaler_step(self, event: ScalerStep) -> None:
        pass

    def on_scaler_update(self, event: ScalerUpdate) -> None:
        pass

    def on_step_start(self, event: StepStart) -> None:
        pass

    def on_step_measured(self, event: StepMeasured) -> None:
        pass

    def on_step_end(self, event: StepEnd) -> None:
        pass

    def on_train_mode(self, event: TrainMode) -> None:
        pass

    def on_scheduler_step(self, event: SchedulerStep) -> None:
        pass

    def on_close(self, event: Close) -> None:
        pass


HOOKS = tuple(name for name in vars(Part) if name.startswith("on_"))


class Dispatcher(Part):
    """Hands each event to the parts that override its hook, in the order they were added. The
    handlers are looked up once, when a part is added: an event costs one call per part that
    listens to it."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self._handlers: dict[str, list[Callable[[Any], None]]] = {name: [] for name in HOOKS}

    def add(self, *parts: Part) -> None:
        for part in parts:
            self.parts.append(part)
            for name in HOOKS:
                if getattr(type(part), name) is not getattr(Part, name):
                    self._handlers[name].append(getattr(part, name))

    def on_forward_start(self, event: ForwardStart) -> None:
        for handler in self._handlers["on_forward_start"]:
            handler(event)

    def on_forward_end(self, event: ForwardEnd) -> None:
        for handler in self._handlers["on_forward_end"]:
            handler(event)

    def on_backward(self, event: BackwardStart) -> None:
        for handler in self._handlers["on_backward"]:
            handler(event)

    def on_backward_end(self, event: BackwardEnd) -> None:
        for handler in self._handlers["on_backward_end"]:
            handler(event)

    def on_loss_scaled(self, event: LossScaled) -> None:
        for handler in self._handlers["on_loss_scaled"]:
            handler(event)

    def on_unscaled(self, event: Unscaled) -> None:
        for handler in self._handlers["on_unscaled"]:
            handler(event)

    def on_grad_clipped(self, event: GradClipped) -> None:
        for handler in self._handlers["on_grad_clipped"]:
            handler(event)

    def on_scaler_step(self, event: ScalerStep) -> None:
        for handler in self._handlers["on_scaler_step"]:
            handler(event)

    def on_scaler_update(self, event: ScalerUpdate) -> None:
        for handler in self._handlers["on_scaler_update"]:
            handler(event)

    def on_step_start(self, event: StepStart) -> None:
        for handler in self._handlers["on_step_start"]:
            handler(event)

    def on_step_measured(self, event: StepMeasured) -> None:
        for handler in self._handlers["on_step_measured"]:
            handler(event)

    def on_step_end(self, event: StepEnd) -> None:
        for handler in self._handlers["on_step_end"]:
            handler(event)

    def on_train_mode(self, event: TrainMode) -> None:
        for handler in self._handlers["on_train_mode"]:
            handler(event)

    def on_scheduler_step(self, event: SchedulerStep) -> None:
        for handler in self._handlers["on_scheduler_step"]:
            handler(event)

    def on_close(self, event: Close) -> None:
        for handler in self._handlers["on_close"]:
            handler(event)
