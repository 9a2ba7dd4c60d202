"""Loops that update the weights by hand: no optimizer, `p.data.add_(p.grad, alpha=-lr)` or
`p -= lr * p.grad` under `torch.no_grad()` after the backward (pytorch/examples'
word_language_model and regression, most textbook loops).

Such an update calls nothing netdoctor can hook, so a step is recognised by what it does: a
backward, then weights that changed before the next forward or backward. While no optimizer has
stepped, the first few backwards each keep a small sample of the weights they reached (the
parameters `WatchedOptimizer` samples: small, so a clone costs nothing); the next forward or
backward compares it. Weights that changed make the loop a manual-update loop: from then on a
stand-in optimizer (`ManualUpdate`) holds those parameters and is stepped by the watcher itself,
its step starting when a backward returns (the gradients exist, the update has not run) and
ending at the next watched forward, backward, or the end of training (the update is done). Every
part of the doctor then measures and judges these steps as an optimizer's.

Backwards that update nothing (a saliency map, an adversarial input) stay unmeasured: after
`PROBES` backwards without a change the search stops. A loop that accumulates gradients over
several backwards before its manual update is measured per backward (documented limitation).

The stand-in's learning rate is estimated from each update along the gradient,
`lr = -<dw, g> / <g, g>` on the sampled parameters (exact for plain SGD), read on the next
step's host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import FrameType

import torch
from torch import nn

from netdoctor.errors import StopTraining
from netdoctor.loading.provenance import user_frame
from netdoctor.watcher.optimizers import PendingScalars, WatchedOptimizer
from netdoctor.watcher.registry import Registry

PROBES = 8  # backwards looked at for a change of the weights before giving up
MANUAL = "manual update"  # how reports name the stand-in optimizer


class ManualUpdate(torch.optim.Optimizer):
    """Stands for the loop's own update of `params`; the watcher starts and ends its steps.
    Its one param group's lr is the estimate of the latest update (nan until one is known).
    Never stepped."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__(params, {"lr": math.nan})

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        raise RuntimeError("a ManualUpdate stands for the user's own update: it never steps")


class _Sample:
    """A few parameters' values and gradients, copied when a backward returns."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.values = [p.detach().clone() for p in params]
        self.grads: list[torch.Tensor | None] = []
        self.regrad()

    def regrad(self) -> None:
        self.grads = [p.grad.detach().clone() if p.grad is not None else None for p in self.params]

    def moved(self) -> torch.Tensor:
        """A device bool: whether any sampled parameter changed since the copy."""
        flags = [torch.ne(p.detach(), v).any() for p, v in zip(self.params, self.values)]
        return torch.stack(flags).any()

    def step_along_gradient(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(-<dw, g>, <g, g>) over the sampled parameters: their ratio is the lr of an SGD
        update. None when no sampled parameter had a gradient."""
        pairs = [
            (p, v, g) for p, v, g in zip(self.params, self.values, self.grads) if g is not None
        ]
        if not pairs:
            return None
        num = sum((-(p.detach().float() - v.float()) * g.float()).sum() for p, v, g in pairs)
        den = sum((g.float() * g.float()).sum() for _, _, g in pairs)
        return torch.as_tensor(num), torch.as_tensor(den)


class ManualSteps:
    """Finds a manual-update loop and steps its stand-in optimizer (see the module docstring).

    `start_step(opt)` / `end_step(opt)`: the doctor's own step start (measurements, judgement;
    may return `StopTraining`) and end, as for an optimizer's step hooks. `optimizer_steps()`:
    the optimizer steps torch ran so far (any makes this a loop with an optimizer)."""

    def __init__(
        self,
        registry: Registry,
        pending: PendingScalars,
        start_step: Callable[[torch.optim.Optimizer], StopTraining | None],
        end_step: Callable[[torch.optim.Optimizer], None],
        optimizer_steps: Callable[[], int],
    ):
        self.registry = registry
        self.pending = pending
        self._start_step = start_step
        self._end_step = end_step
        self._optimizer_steps = optimizer_steps
        self.optimizer: ManualUpdate | None = None  # the stand-in, once the loop is found
        self.watched: WatchedOptimizer | None = None
        self.probes = 0
        self.done = False  # an optimizer steps, or no backward changed the weights
        self._sample: _Sample | None = None
        self._open = False  # a stand-in step began and has not ended yet
        self._params: list[nn.Parameter] = []  # with a gradient at the latest searched backward
        self._model_name: str | None = None  # the user's name for the model there

    # -- the doctor's calls ----------------------------------------------------------------
    def after_backward(self) -> StopTraining | None:
        """A backward returned: a stand-in step begins, or a sample is kept for the search."""
        if self.optimizer is not None:
            if self._open:  # a second backward before any forward (accumulation): one step
                return None
            self._sample = self._take(self._sampled())
            self._open = True
            return self._start_step(self.optimizer)
        if self.done or self._searching_over():
            return None
        with_grad = self._with_grad()
        if with_grad:
            self._sample = self._take(WatchedOptimizer._sample(with_grad))
            self._params = with_grad
            self._model_name = self._name_in(user_frame(1))
        return None

    def after_clip(self) -> None:
        """The gradients were clipped in place before the update: the lr estimate compares
        the update with the clipped gradients."""
        if self._sample is not None:
            self._sample.regrad()

    def before_next(self) -> None:
        """A watched forward or a backward begins (or training ends): the update, if any, is
        done. Ends the open stand-in step, or checks the sample of the search."""
        if self._open:
            self._open = False
            self._estimate_lr()
            self._end_step(self.optimizer)  # type: ignore[arg-type]
            return
        sample, self._sample = self._sample, None
        if sample is None or self.optimizer is not None:
            return
        if self._searching_over():
            return
        self.probes += 1
        if not bool(sample.moved()):  # one host sync, for the first few backwards only
            return
        self._found(sample)

    # -- internals ---------------------------------------------------------------------------
    def _searching_over(self) -> bool:
        if self._optimizer_steps() or self.probes >= PROBES:
            self.done = True
            self._sample = None
        return self.done

    def _with_grad(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        out: list[nn.Parameter] = []
        for wm in self.registry.models:
            for _, p in wm.params_by_id.values():
                if p.requires_grad and p.grad is not None and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _sampled(self) -> list[nn.Parameter]:
        wo = self.watched
        sampled = [p for p in (wo.sampled if wo is not None else []) if p.grad is not None]
        return sampled or WatchedOptimizer._sample(
            [p for p in (wo.trainable if wo is not None else []) if p.grad is not None]
        )

    @staticmethod
    def _take(params: list[nn.Parameter]) -> _Sample | None:
        return _Sample(params) if params else None

    def _found(self, sample: _Sample) -> None:
        """The weights changed after the backward: the loop updates them by hand."""
        self.optimizer = ManualUpdate(self._params)
        self.watched = self.registry.add_manual(self.optimizer, MANUAL, self._model_name)
        ratio = sample.step_along_gradient()
        if ratio is not None and float(ratio[1]) > 0:
            self.optimizer.param_groups[0]["lr"] = float(ratio[0]) / float(ratio[1])

    def _estimate_lr(self) -> None:
        """The lr of the step just ended, read on the next host sync: recorded as that step's
        lr and kept as the stand-in's for the steps after it."""
        sample, self._sample = self._sample, None
        wo, opt = self.watched, self.optimizer
        if sample is None or wo is None or opt is None:
            return
        ratio = sample.step_along_gradient()
        if ratio is None:
            return
        index = len(wo.facts.lr) - 1
        values: list[float] = []

        def then_num(v: float) -> None:
            values.append(v)

        def then_den(v: float) -> None:
            if not values or v <= 0 or not math.isfinite(values[0] / v):
                return
            lr = values[0] / v
            opt.param_groups[0]["lr"] = lr
            if 0 <= index < len(wo.facts.lr):
                wo.facts.lr[index] = [lr]

        self.pending.add(ratio[0], then_num)
        self.pending.add(ratio[1], then_den)

    def _name_in(self, frame: FrameType | None) -> str | None:
        """The user's name for a watched model in the frame that called backward (its locals,
        then its globals): what a fix's `model.zero_grad()` is spelled with."""
        models = [wm.model for wm in self.registry.models if wm.model is not None]
        if frame is None or not models:
            return None
        for scope in (frame.f_locals, frame.f_globals):
            for name, value in scope.items():
                if name.isidentifier() and any(value is m for m in models):
                    return str(name)
        return None
