"""The loop facts part: what the ND5xx rules read about the user's loop (`measure.facts.LoopFacts`),
gathered from the events, with the rules whose facts changed marked for the live judgement.

* ND501: at each backward after an optimizer's first step, whether its sampled parameters still
  hold the consumed gradient (`WatchedOptimizer.before_backward`); judged at the next step;
* ND502: trainable parameters with a gradient that no optimizer holds (on deep steps), and an
  optimizer of frozen parameters;
* ND503: why a step may change nothing (lr 0, no gradient, zero gradient), and whether it did
  (the deep meters' update ratios, else a sampled snapshot compared after the update);
* ND504: Dropout/BatchNorm modules in eval mode in a forward that a backward used, and the line
  of the `.eval()` that put them there;
* ND505: where and when each lr scheduler is stepped (judged on doubling intervals);
* ND506/ND507: judged when the loss calls examined or broadcasting change (`losses.LossWatch`
  fills their facts).
"""

from __future__ import annotations

import math

from netdoctor.findings import Location
from netdoctor.loading.provenance import assignment_site, user_location
from netdoctor.measure.facts import LoopFacts, SchedulerFacts
from netdoctor.watcher.events import (
    BackwardStart,
    ForwardStart,
    Part,
    SchedulerStep,
    StepEnd,
    StepMeasured,
    StepStart,
    TrainMode,
)
from netdoctor.watcher.optimizers import PendingScalars, WatchedOptimizer
from netdoctor.watcher.registry import Registry
from netdoctor.watcher.schedule import Schedule
from netdoctor.watcher.services import DirtyRules


class LoopWatch(Part):
    """See the module docstring."""

    def __init__(
        self,
        facts: LoopFacts,
        registry: Registry,
        pending: PendingScalars,
        schedule: Schedule,
        dirty: DirtyRules,
    ):
        self.facts = facts
        self.registry = registry
        self.pending = pending
        self.schedule = schedule
        self.dirty = dirty
        self.eval_sites: dict[int, Location] = {}  # id(module) -> its last .eval() line
        self._loss_seen: tuple[int, int] = (0, 0)

    # -- events ----------------------------------------------------------------------------
    def on_forward_start(self, event: ForwardStart) -> None:
        event.model.note_modes()

    def on_backward(self, event: BackwardStart) -> None:
        self.facts.backward_calls += 1
        site = user_location()
        if self.facts.backward_site is None:
            self.facts.backward_site = site
        for wo in self.registry.optimizers:
            wo.before_backward(self.pending, site)
        for wm in self.registry.models:
            wm.note_backward()

    def on_train_mode(self, event: TrainMode) -> None:
        if event.mode:
            return
        loc = user_location()
        if loc is not None:
            self.eval_sites[id(event.module)] = loc

    def on_scheduler_step(self, event: SchedulerStep) -> None:
        scheduler = event.scheduler
        if getattr(scheduler, "_step_count", 1) == 0:
            return  # the scheduler's own first step, from its constructor
        site = user_location()
        key = (type(scheduler).__name__, site.path if site else None, site.line if site else None)
        facts = self.facts.schedulers.get(key)
        if facts is None:
            facts = self.facts.schedulers[key] = SchedulerFacts(type(scheduler).__name__, site)
        facts.calls += 1
        it = self.facts.iterations
        facts.first_iteration = it if facts.first_iteration is None else facts.first_iteration
        facts.last_iteration = it

    def on_step_start(self, event: StepStart) -> None:
        f = event.optimizer.facts
        if f.step_site is None:
            f.step_site = user_location()

    def on_step_measured(self, event: StepMeasured) -> None:
        """ND501 (was the gradient cleared since the last step?), ND502, ND503 (why the step
        may change nothing; the change itself is checked after it), ND504 (did its models
        train in eval mode?), then ND505-ND507."""
        wo, step = event.optimizer, event.step
        if event.deep:
            self._unoptimized(wo)
        f = wo.facts
        if wo.judge_stale():
            f.stale_steps.append(step)
            f.stale_backward_site = f.stale_backward_site or wo.last_backward_site
            self.dirty.mark("ND501")
        lrs = [v for v in f.lr[-1] if not math.isnan(v)]
        wo.step_reason = (
            "lr-zero"
            if lrs and all(v == 0 for v in lrs)
            else "no-grad"
            if not event.with_grad
            else "zero-grad"
            if event.grad_norm == 0
            else None
        )
        wo.choose_sample(event.with_grad)
        if not event.measured:  # the deep path measures every parameter's update itself
            wo.snapshot()
        self._eval_facts(wo, step)
        if f.steps == 1 and f.n_trainable == 0:
            self.dirty.mark("ND502")
        if self.schedule.restarts_window(step) and f.lr and f.lr[-1] != f.lr[0]:
            self.dirty.mark("ND505")  # judged on doubling intervals: the curve grows with the run
        verdicts = self._loss_verdicts()
        if verdicts != self._loss_seen:  # a loss call was examined (or broadcast) since
            self._loss_seen = verdicts
            self.dirty.mark("ND506", "ND507")

    def on_step_end(self, event: StepEnd) -> None:
        wo, step = event.optimizer, event.step
        reason = wo.step_reason
        if event.moved is not None:
            self._changed(wo, step, event.moved, reason)
            return
        flag = wo.changed()
        if flag is not None:
            self.pending.add(flag, lambda v: self._changed(wo, step, v > 0.5, reason))
        else:
            self._changed(wo, step, False, reason or "no-grad")

    # -- facts -----------------------------------------------------------------------------
    def _eval_facts(self, wo: WatchedOptimizer, step: int) -> None:
        """ND504: the eval-mode modules of the training forwards of this step's models."""
        f = wo.facts
        for wm in self.registry.models:
            if wo not in wm.optimizers:
                continue
            seen, forwards = wm.take_step_facts()
            if not (forwards and seen):
                continue
            f.eval_steps.append(step)
            f.eval_modules.update(seen)
            if wm.facts.eval_site is None and wm.model is not None:
                wm.facts.eval_site = next(
                    (
                        self.eval_sites[id(m)]
                        for m in wm.model.modules()
                        if id(m) in self.eval_sites
                    ),
                    None,
                )
            if wm.facts.label not in f.eval_models:
                f.eval_models.append(wm.facts.label)
            self.dirty.mark("ND504")

    def _changed(self, wo: WatchedOptimizer, step: int, moved: bool, reason: str | None) -> None:
        f = wo.facts
        if moved:
            f.changed_steps += 1
            return
        f.unchanged_steps.append(step)
        key = reason or "no-change"
        f.unchanged_reasons[key] = f.unchanged_reasons.get(key, 0) + 1
        self.dirty.mark("ND503")

    def _unoptimized(self, wo: WatchedOptimizer) -> None:
        """ND502 facts: trainable parameters with a gradient that no optimizer holds."""
        registry = self.registry
        if wo is not registry.primary:
            return
        held: set[int] = set()
        for other in registry.optimizers:
            held |= {id(p) for p in other.params}
        for wm in registry.models:
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
                            loc = registry.provenance.site(
                                model.get_submodule(module)
                            ) or assignment_site(model, module)
                        except AttributeError:
                            loc = None
                        if loc is not None:
                            wm.facts.unoptimized_sites[module] = loc
                    self.dirty.mark("ND502")

    def _loss_verdicts(self) -> tuple[int, int]:
        """(examined loss calls, broadcasting ones): when they change, ND506/ND507 are judged
        live (examined calls are the first few per line and those of deep steps: rare)."""
        calls = self.facts.losses.values()
        return (sum(c.checked for c in calls), sum(c.broadcast_calls for c in calls))
