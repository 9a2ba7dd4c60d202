"""The Doctor: netdoctor inside the user's own training loop.

It receives the events of `attach.Attachment` (optimizer steps, backward calls, top-level
forwards, `.eval()`, scheduler steps), the root-module hooks of each `models.WatchedModel` and
the loss calls of `losses.LossWatch`, and fills two records:

* per watched model, the shared `measure.record.TrainingRun` (via the same instruments the
  probe uses: `ActivationRecorder`, `ParamMeter`, `localize_forward`), which the ND4xx rules
  read unchanged;
* `facts.LoopFacts`, what only a watcher sees (ND5xx).

Per step: a handful of fused device ops and one host sync; on deep steps (`schedule.Schedule`)
the per-layer instruments. Confirmed severe findings are announced on stderr as soon as they are
confirmed; with `stop_on` the doctor raises `StopTraining` (a BaseException) from the optimizer
step hook, before the update.

Extension points (kept small on purpose, for the integrations and DDP):

* `add_model(module, name=None)` / `add_optimizer(optimizer)`: what a trainer callback calls
  with the model and optimizers the trainer holds (a wrapper such as accelerate's
  `AcceleratedOptimizer` is unwrapped to the optimizer whose `step` runs torch's hooks);
* `scope=module`: model discovery limited to that module and its submodules, named by their
  path in it (a Lightning callback: the parts its `training_step` calls are the models, since
  Lightning calls `training_step`, not the LightningModule's forward);
* `observe_loss(value, after_step=False)`: a trainer's logged loss, for steps whose backward
  netdoctor did not see (`after_step=True`: the loss of the step just taken, as a trainer's
  batch-end hook reports it);
* `running_doctor()`: the doctor of `netdoctor run`, which a `watch()` or a trainer callback in
  the script joins instead of attaching a second time;
* `stop_action="flag"`: `should_stop` is set instead of raising (a callback then sets
  `trainer.should_stop`); `announce_to`: where the one-line announcements go;
* `exchange`: `LocalExchange` in one process; under torchrun the process group the user
  initialised is found at the first optimizer step and `distributed.DistributedExchange` takes
  over. On deep steps the ranks all-gather a small vector (`step_statistics` plus the checksums
  of the DDP-replicated parameters, `replicas`) on netdoctor's own gloo group, with a timeout --
  every rank computes the same schedule, so every rank joins on the same steps -- and ND508
  compares the checksums; at the end every rank but 0 hands rank 0 its diagnosis through the
  job's store and rank 0 writes the one report (`ranks.merge`). Under torchrun a --stop-on
  request waits for the next exchange, so that every rank stops at the same step (a NaN, which
  DDP's all-reduce spreads to every rank's gradients in the same step, stops at once). A
  sharded parameter's (FSDP2, DTensor) norm is the square root of the sum over its shards of the
  squared local norms, a replicated one counts once; see `distributed`;
* `report()` / `findings` / `close()`: at the end of fit.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netdoctor.errors import StopTraining, UserError
from netdoctor.findings import Finding, Location, Report, Severity
from netdoctor.loading.forward import tensors_in
from netdoctor.loading.provenance import (
    Provenance,
    assignment_site,
    class_location,
    user_location,
)
from netdoctor.measure.nonfinite import rng_state
from netdoctor.measure.record import NonFinite
from netdoctor.watcher.attach import Attachment
from netdoctor.watcher.facts import LoopFacts, ModelFacts, OptimizerFacts, SchedulerFacts
from netdoctor.watcher.losses import LossCall, LossWatch
from netdoctor.watcher.measurement import measure_step, meters
from netdoctor.watcher.models import WatchedModel
from netdoctor.watcher.optimizers import PendingScalars, WatchedOptimizer, unwrap_optimizer
from netdoctor.watcher.replicas import Replicas, is_ddp
from netdoctor.watcher.schedule import Schedule
from netdoctor.watcher.settings import WatchOptions

_ACTIVE: list[Doctor] = []  # at most one doctor watches at a time (the hooks are global)
DISCOVERY_STEPS = 2  # top-level forwards are watched for new models at least this long
DISCOVERY_GIVE_UP = 8  # ... and at most this long when some parameters stay unaccounted for
FEED_STEPS = 8  # which watched model feeds which is learnt over the first steps
FEED_SEARCH = 64  # autograd nodes walked back from a forward's inputs to find another model


class LocalExchange:
    """One process: every rank's statistics are this rank's (`distributed.DistributedExchange`
    replaces it under torchrun)."""

    rank = 0
    world_size = 1
    broken = None

    def gather(self, step: int, values: list[float]) -> list[list[float]]:
        return [values]

    def close(self) -> None:
        pass


@dataclass(eq=False)  # compared by identity (it holds tensors)
class BackwardRecord:
    """One backward since the last step: the loss it ran on and what preceded it."""

    loss: torch.Tensor | None
    fn: str | None  # the loss function that produced the tensor, when netdoctor saw it
    forwards: dict[int, int]  # id(WatchedModel) -> that model's forward counter
    calls: list[LossCall] = field(default_factory=list)  # loss calls since the last backward
    value: float | None = None


class Doctor:
    """Watches training from inside: see the module docstring. Build it with
    `netdoctor.watch(...)`, `netdoctor run`, or a trainer callback."""

    def __init__(
        self,
        options: WatchOptions | None = None,
        *,
        discover_models: bool = True,
        discover_optimizers: bool = True,
        target: str | None = None,
        provenance: Provenance | None = None,
        scope: nn.Module | None = None,
    ):
        self.options = options or WatchOptions()
        self.schedule = Schedule(self.options.every)
        self.facts = LoopFacts()
        self.target = target
        self.provenance = provenance or Provenance()
        self.discover_models = discover_models
        self.discover_optimizers = discover_optimizers
        self._scope = weakref.ref(scope) if scope is not None else None
        self.models: list[WatchedModel] = []
        self.optimizers: list[WatchedOptimizer] = []
        self._model_by_id: dict[int, WatchedModel] = {}
        self._opt_by_id: dict[int, WatchedOptimizer] = {}
        self._allowed_optimizers: set[int] = set()
        self._ignored_roots: weakref.WeakSet = weakref.WeakSet()
        self.primary: WatchedOptimizer | None = None
        self.pending = PendingScalars()
        self.losses = LossWatch(
            self.pending, self._sampling, self._guard, lambda: self.busy, self.facts.losses
        )
        self.attachment = Attachment(self)
        self.backwards: list[BackwardRecord] = []
        self.observed: list[float] = []
        self._unscaled: dict[int, tuple] = {}  # id(scaled loss) -> (its weakref, the loss)
        self.nonfinite: dict[int, NonFinite] = {}  # id(WatchedModel) or 0 -> first event
        self.nonfinite_step: int | None = None
        self.static: dict[int, tuple[list[Finding], list[str]]] = {}
        self.eval_sites: dict[int, Location] = {}  # id(module) -> its last .eval() line
        self.exchange: Any = LocalExchange()
        self._connected = False  # the process group was looked for (at the first step)
        self.replicas = Replicas()  # DDP wrappers: what ND508 compares across ranks
        self.stop_request: Finding | None = None  # --stop-on under torchrun: at the next exchange
        self.nonfinite_code = 0.0  # distributed.NONFINITE_KINDS of the first non-finite step
        self.rank_summaries: dict[int, dict] = {}  # rank 0: what the other ranks reported
        self.ranks_missing: list[int] = []  # rank 0: ranks whose summary never came
        self.announce_to: Callable[[str], None] = lambda line: print(
            line, file=sys.stderr, flush=True
        )
        self.announced: set[tuple] = set()
        self._settled: set[str] = set()  # rules already confirmed: not judged live again
        self._loss_seen: tuple[int, int] = (0, 0)
        self.should_stop = False
        self.stopped_by: Finding | None = None
        self.notes: list[str] = []
        self.errors: dict[str, int] = {}
        self.hook_seconds = 0.0  # netdoctor's time inside the user's training ...
        self.static_seconds = 0.0  # ... of which the one-off static checks
        self.exchange_seconds = 0.0  # ... and, under torchrun, the exchanges with other ranks
        self._guards = 0
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.busy_depth = 0
        self._depth = 0  # top-level forward nesting seen by the discovery hooks
        self._dirty: set[str] = set()  # rules whose facts changed since the last judgement
        self._report: Report | None = None
        self.active = False
        self.closed = False
        self.joinable = False  # netdoctor run: a watch() in the script joins this doctor

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Doctor:
        if _ACTIVE:
            raise UserError("another netdoctor watcher is active in this process; close() it first")
        _ACTIVE.append(self)
        self.active = True
        try:
            self.attachment.install(discover_models=self.discover_models)
            self.losses.install()
        except BaseException:
            self._detach()
            raise
        return self

    def close(self) -> None:
        """Remove every hook and wrapper and restore every mode; the report stays available.
        Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.ended = time.perf_counter()
        try:
            for m in self.models:
                m.end_measure()
            self._guard(self._finish_pending)
        finally:
            self._detach()
        self._guard(self._finish_ranks)
        if self.options.output and self.rank == 0:
            self._guard(lambda: self.report(output=self.options.output))

    def _detach(self) -> None:
        try:
            try:
                self.losses.uninstall()
            finally:
                try:
                    self.attachment.remove()
                finally:
                    for m in self.models:
                        m.close()
                    self.replicas.close()
        finally:
            self.active = False
            if self in _ACTIVE:
                _ACTIVE.remove(self)

    def __enter__(self) -> Doctor:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, StopTraining):
            self.facts.stopped = self.facts.stopped or "stop-on"
        elif exc_type is KeyboardInterrupt:
            self.facts.stopped = "interrupted"
        elif exc_type is not None:
            self.facts.stopped = self.facts.stopped or "exception"
        self.close()
        return exc_type is not None and issubclass(exc_type, StopTraining)

    # -- public ------------------------------------------------------------------------
    def add_model(self, model: nn.Module, name: str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise UserError(f"netdoctor.watch: expected an nn.Module, got {type(model).__name__}")
        self._guard(lambda: self._add_model(model, name))

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer = unwrap_optimizer(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(
                f"netdoctor.watch: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not self.discover_optimizers:
            self._allowed_optimizers.add(id(optimizer))
        self._guard(lambda: self._optimizer(optimizer, create=True))

    def observe_loss(self, value: Any, after_step: bool = False) -> None:
        """A trainer's logged loss, used only for a step whose backward netdoctor did not see:
        the coming step's, or with `after_step=True` the step just taken (what a trainer's
        batch-end hook reports)."""

        def body():
            v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            if not after_step:
                self.observed.append(v)
                return
            wo = self.primary
            if wo is not None and wo.loss_unseen and wo.facts.loss:
                wo.facts.loss[-1] = v
                wo.loss_unseen = False

        self._guard(body)

    @property
    def findings(self) -> list[Finding]:
        """The findings so far (in priority order); final once the doctor is closed."""
        return self.diagnose().sorted_findings()

    def diagnose(self) -> Report:
        if self._report is not None:
            return self._report
        from netdoctor.watcher.diagnosis import diagnose

        with self._busy():
            report = diagnose(self)
        if self.closed:
            self._report = report
        return report

    def report(
        self, format: str | None = None, output: str | None = None, color: bool | None = None
    ) -> str:
        """The report as text/json/sarif/github; written to `output` when given."""
        from netdoctor.report import render

        fmt = format or self.options.format
        text = render([self.diagnose()], fmt, color=False if output else color)
        if output:
            from pathlib import Path

            Path(output).write_text(text, encoding="utf-8")
        return text

    def exit_code(self, fail_on: str | None = None) -> int:
        level = fail_on or self.options.fail_on
        if level == "never":
            return 0
        threshold = Severity.parse(level)
        return int(any(f.severity >= threshold for f in self.findings))

    @property
    def busy(self) -> bool:
        return self.busy_depth > 0 or not self.active

    @property
    def measure_seconds(self) -> float:
        """netdoctor's own time inside the training: its hooks (timed by the guard) and the
        activation measurements inside the user's forwards on deep steps (timed by each
        recorder), less the one-off static checks and the exchanges with other ranks."""
        recorded = sum(wm.recorder.seconds for wm in self.models if wm.recorder is not None)
        return max(0.0, self.hook_seconds + recorded - self.static_seconds - self.exchange_seconds)

    @property
    def rank(self) -> int:
        """This process's rank: the process group's, else torchrun's RANK, else 0. Only rank 0
        writes the report."""
        if self.exchange.world_size > 1:
            return self.exchange.rank
        try:
            return int(os.environ.get("RANK", "0"))
        except ValueError:
            return 0

    def label_of(self, module: nn.Module) -> str:
        wm = self._model_by_id.get(id(module))
        return wm.facts.label if wm is not None else type(module).__name__

    def on_ddp_wrapped(self, ddp: nn.Module) -> None:
        """A DistributedDataParallel was built (its line is where ND508 points when no bypass
        is found)."""
        self._guard(lambda: self.replicas.track(ddp, user_location()))

    # -- guard -----------------------------------------------------------------------------
    @contextmanager
    def _busy(self):
        self.busy_depth += 1
        try:
            yield
        finally:
            self.busy_depth -= 1

    def _guard(self, body: Callable[[], Any]) -> Any:
        """Run netdoctor's part of a hook: time it, and turn an internal error into a note."""
        t0 = time.perf_counter()
        self._guards += 1
        try:
            return body()
        except StopTraining:
            raise
        except Exception as e:
            self.note_error(e)
            return None
        finally:
            self._guards -= 1
            if not self._guards:  # nested guards are timed once, by the outermost
                self.hook_seconds += time.perf_counter() - t0

    def note_error(self, e: Exception) -> None:
        """An internal error: counted, and a note in the report."""
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
        key = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}{at}"
        self.errors[key] = self.errors.get(key, 0) + 1
        if os.environ.get("NETDOCTOR_DEBUG"):
            traceback.print_exception(e)

    def mark_dirty(self, rule: str) -> None:
        """The facts of `rule` changed: judge it at the end of this step."""
        self._dirty.add(rule)

    def _sampling(self) -> bool:
        """Whether the coming step (of the first optimizer) is a deep one."""
        steps = self.primary.facts.steps if self.primary is not None else 0
        return self.schedule.is_deep(steps + 1)

    # -- models ------------------------------------------------------------------------
    def _label(self, base: str, taken: list[str]) -> str:
        if base not in taken:
            return base
        k = 2
        while f"{base}#{k}" in taken:
            k += 1
        return f"{base}#{k}"

    def _add_model(
        self, model: nn.Module, name: str | None, site: Location | None = None
    ) -> WatchedModel | None:
        if id(model) in self._model_by_id:
            return self._model_by_id[id(model)]
        if is_ddp(model):  # watch the module inside: replays and static checks must not run
            # DDP's collectives on one rank only, and the report names the user's model
            self.replicas.track(model, self.provenance.site(model))
            self._ignored_roots.add(model)
            return self._add_model(model.module, name, site)
        ids = {id(p) for p in model.parameters()}
        for other in list(self.models):
            other_ids = set(other.params_by_id)
            if ids and ids <= other_ids:
                self._ignored_roots.add(model)  # a part of a watched model
                return None
            if other_ids and other_ids < ids:  # a part watched before the whole was seen
                other.close()
                self.models.remove(other)
                self._model_by_id.pop(id(other.model), None)
                self.facts.models.remove(other.facts)
        inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: name the model
        label = self._label(name or type(inner).__name__, [m.facts.label for m in self.models])
        site = (
            self.provenance.site(getattr(model, "_orig_mod", model))
            or site
            or class_location(type(getattr(model, "_orig_mod", model)))
        )
        facts = ModelFacts(label=label, class_name=type(inner).__name__, site=site)
        sites = {}
        for qual, mod in model.named_modules():
            # built while recording (netdoctor run), else the user's `self.<name> = ...` line
            loc = self.provenance.site(mod) or (assignment_site(model, qual) if qual else None)
            if loc is not None:
                sites[qual] = loc
        if "" not in sites and site is not None:
            sites[""] = site
        wm = WatchedModel(model, facts, sites, self._on_model_pre, self._on_model_post)
        if wm.compiled:
            self.notes.append(
                f"{label} is compiled with torch.compile: not instrumented (its "
                "loop facts are watched; per-layer measurements and static rules "
                "are skipped)"
            )
        self.models.append(wm)
        self._model_by_id[id(model)] = wm
        self.facts.models.append(facts)
        self._associate()
        return wm

    def _associate(self) -> None:
        """Which optimizer trains which model (after a new model, optimizer or param group)."""
        optimized: set[int] = set()
        for wo in self.optimizers:
            optimized |= {id(p) for p in wo.trainable}
        for wm in self.models:
            wm.set_optimized(optimized)
            counts = []
            for wo in self.optimizers:
                n = sum(1 for p in wo.trainable if id(p) in wm.params_by_id)
                if n:
                    counts.append((n, wo))
            wm.optimizers = [wo for _, wo in counts]
            wm.owner = max(counts, key=lambda c: c[0])[1] if counts else None
        for wo in self.optimizers:
            wo.facts.models = [wm.facts.label for wm in self.models if wo in wm.optimizers]
            wo.meter_signature = ()  # rebuilt on the next deep step

    def _on_global_forward_pre(self, module: nn.Module, args: tuple) -> None:
        self._depth += 1
        if self._depth != 1 or self.busy or not torch.is_grad_enabled():
            return
        if id(module) in self._model_by_id or module in self._ignored_roots:
            return
        if not any(p.requires_grad for p in module.parameters()):
            self._ignored_roots.add(module)
            return
        name = site = None
        if self._scope is not None:
            scoped = self._scoped(module)
            if scoped is None:  # outside the trainer's module
                self._ignored_roots.add(module)
                return
            name, site = scoped
        wm = self._add_model(module, name, site)
        if wm is not None and wm.model is module:  # its own hooks start with the next call:
            self._on_model_pre(module, args, {})  # run this one by hand (a DDP wrapper's inner
            # module is called later in this forward: its hooks see it)

    def _scoped(self, module: nn.Module) -> tuple[str, Location | None] | None:
        """(`Scope` or `Scope.path.to.part`, where the scope's code assigns it) for a part of
        the scope module; None outside it."""
        scope = self._scope() if self._scope is not None else None
        if scope is None:
            return None
        for path, m in scope.named_modules():
            if m is module:
                return (
                    type(scope).__name__ + (f".{path}" if path else ""),
                    assignment_site(scope, path) if path else None,
                )
        return None

    def on_global_forward_pre(self, module: nn.Module, args: tuple) -> None:
        self._guard(lambda: self._on_global_forward_pre(module, args))

    def on_global_forward_post(self, module: nn.Module) -> None:
        self._depth = max(0, self._depth - 1)

    def _on_model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        def body():
            if self.busy or not torch.is_grad_enabled():
                return
            wm = self._model_by_id.get(id(module))
            if wm is None:
                return
            device = _device_of(module)
            wm.record_call(args, kwargs, rng_state(device), _autocast_state(device))
            wm.note_modes()
            wrapper = self.replicas.wrapper_of(module) if self.replicas.wrappers else None
            if wrapper is not None:  # called outside its DDP wrapper? (ND508's line)
                self.replicas.note_forward(wrapper, wm.facts.label, user_location)
            if self.facts.iterations < FEED_STEPS and len(self.models) > 1:
                self._note_feeds(wm, args, kwargs)
            owner = wm.owner
            step = (owner.facts.steps if owner is not None else 0) + 1
            if wm.recorder is not None and self.schedule.is_deep(step):
                wm.begin_measure(step)

        self._guard(body)

    def _on_model_post(self, module: nn.Module, args: tuple, out: Any) -> None:
        wm = self._model_by_id.get(id(module))
        if wm is None:
            return
        if wm.measuring:
            self._guard(wm.end_measure)
        if self.facts.iterations < FEED_STEPS and not self.busy:
            self._guard(lambda: wm.keep_outputs(out))

    def _note_feeds(self, wm: WatchedModel, args: tuple, kwargs: dict) -> None:
        """Which other watched models this forward's inputs come from (a few autograd nodes
        back): those are parts of a larger network -- an encoder feeding a head, a generator
        feeding its discriminator -- whose output is not the prediction (`ModelFacts.feeds`)."""
        targets = {
            id(node): other
            for other in self.models
            if other is not wm
            for node in other.output_nodes
        }
        if not targets:
            return
        frontier = deque(t.grad_fn for t in tensors_in((args, kwargs)) if t.grad_fn is not None)
        seen: set[int] = set()
        while frontier and len(seen) < FEED_SEARCH:
            node = frontier.popleft()
            if id(node) in seen:
                continue
            seen.add(id(node))
            other = targets.get(id(node))
            if other is not None:
                if wm.facts.label not in other.facts.feeds:
                    other.facts.feeds.append(wm.facts.label)
                continue
            frontier.extend(n for n, _ in node.next_functions if n is not None)

    # -- optimizers ----------------------------------------------------------------------
    def _optimizer(
        self, opt: torch.optim.Optimizer, create: bool = False
    ) -> WatchedOptimizer | None:
        wo = self._opt_by_id.get(id(opt))
        if wo is not None and wo.optimizer is opt:
            return wo
        if not create:
            if self._allowed_optimizers and id(opt) not in self._allowed_optimizers:
                return None
            if not self._allowed_optimizers and not self.discover_optimizers:
                return None
            if not self.discover_models and not self._allowed_optimizers:
                # watch(model) without an optimizer: the ones that train the model
                params = {id(p) for g in opt.param_groups for p in g["params"]}
                if not any(params & set(m.params_by_id) for m in self.models):
                    return None
        name = type(opt).__name__
        label = self._label(name, [o.facts.label for o in self.optimizers])
        facts = OptimizerFacts(
            index=len(self.optimizers), name=name, label=label, site=self.provenance.site(opt)
        )
        wo = WatchedOptimizer(opt, facts)
        wo.refresh()
        self.optimizers.append(wo)
        self._opt_by_id[id(opt)] = wo
        self.facts.optimizers.append(facts)
        self._associate()
        if self.discover_models and not self._covered():
            self.attachment.discovery(True)
        return wo

    def _covered(self) -> bool:
        """Every trainable parameter of every optimizer belongs to a watched model."""
        known: set[int] = set()
        for wm in self.models:
            known |= set(wm.params_by_id)
        return all(id(p) in known for wo in self.optimizers for p in wo.trainable)

    def on_step_pre(
        self, opt: torch.optim.Optimizer, args: tuple = (), kwargs: dict | None = None
    ) -> tuple[tuple, dict] | None:
        kwargs = kwargs or {}
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if callable(closure) and not self.busy:
            # forward and backward run inside the closure: measure when its first call returns
            # (the gradients exist then, the update has not run yet)
            done = [False]

            def measured_closure(*a, **k):
                result = closure(*a, **k)
                if not done[0]:
                    done[0] = True
                    stop = self._guard(lambda: self._step_pre(opt))
                    if stop is not None:
                        raise stop
                return result

            if "closure" in kwargs:
                return args, {**kwargs, "closure": measured_closure}
            return (args[0], measured_closure, *args[2:]), kwargs
        stop = self._guard(lambda: self._step_pre(opt))
        if stop is not None:
            raise stop
        return None

    def on_step_post(self, opt: torch.optim.Optimizer) -> None:
        self._guard(lambda: self._step_post(opt))

    def _step_pre(self, opt: torch.optim.Optimizer) -> StopTraining | None:
        """Everything netdoctor does before an update: the step's measurements (one host sync),
        the loop facts, a NaN's localisation, and the live judgement (which may stop here)."""
        if self.busy:
            return None
        wo = self._optimizer(opt)
        if wo is None:
            return None
        if wo.refresh():
            self._associate()
        for wm in self.models:
            wm.detach_recorder()
        f = wo.facts
        step = f.steps = f.steps + 1
        wo.in_step = True
        self._depth = 0  # no forward runs across an optimizer step (resynchronise)
        if self.primary is None:
            self.primary = wo
        if wo is self.primary:
            self.facts.iterations = step
        if f.step_site is None:
            f.step_site = user_location()
        if not self._connected:
            self._guard(self._connect)
        deep = self.schedule.is_deep(step)
        stop_all = False
        try:
            for wm in self.models:
                if wo in wm.optimizers and id(wm) not in self.static:
                    self._static_check(wm)  # once per model, at its first step: still at init
            self._measure(wo, step, deep)
        finally:  # under torchrun every rank joins the exchange, whatever failed here
            if deep and self.exchange.world_size > 1:
                from netdoctor.watcher.distributed import exchange_step

                stop_all = bool(self._guard(lambda: exchange_step(self, wo, step)))
        if self.schedule.restarts_window(step) and f.lr and f.lr[-1] != f.lr[0]:
            self._dirty.add("ND505")  # judged on doubling intervals: the curve grows with the run
        verdicts = self._loss_verdicts()
        if verdicts != self._loss_seen:  # a loss call was examined (or broadcast) since
            self._loss_seen = verdicts
            self._dirty |= {"ND506", "ND507"}
        if stop_all and not self.should_stop:  # a rank asked to stop: every rank stops here
            return self._stop(self.stop_request, step)
        if self._dirty:
            return self._live(step)
        return None

    def _measure(self, wo: WatchedOptimizer, step: int, deep: bool) -> None:
        backwards, self.backwards = self.backwards, []
        with_grad = [p for p in wo.trainable if p.grad is not None]
        loss, grad_norm, measured = measure_step(self, wo, step, deep, backwards, with_grad)
        self._loop_facts(wo, step, with_grad, grad_norm, measured)
        if self.nonfinite_step is None and (
            not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
        ):
            from netdoctor.watcher.localize import localize

            self.nonfinite_step = step
            self.nonfinite_code = (
                (1.0 if math.isnan(loss) else 2.0)
                if not math.isfinite(loss)
                else 3.0
                if math.isnan(grad_norm)
                else 4.0
            )
            where, event = localize(self, wo, step, backwards, loss)
            self.nonfinite[where] = event
            self._dirty.add("ND401")

    def _loss_verdicts(self) -> tuple[int, int]:
        """(examined loss calls, broadcasting ones): when they change, ND506/ND507 are judged
        live (examined calls are the first few per line and those of deep steps: rare)."""
        calls = self.facts.losses.values()
        return (sum(c.checked for c in calls), sum(c.broadcast_calls for c in calls))

    def _connect(self) -> None:
        """Under torchrun: the process group the user initialised (looked for once, at the
        first optimizer step, on every rank alike)."""
        self._connected = True
        from netdoctor.watcher import distributed

        t0 = time.perf_counter()
        ex = distributed.connect(self.options.dist_timeout)
        self.exchange_seconds += time.perf_counter() - t0
        if ex is not None:
            self.exchange = ex
            self.facts.distributed = distributed.new_facts(ex, self)

    def _finish_ranks(self) -> None:
        """Under torchrun: every rank but 0 hands rank 0 its diagnosis; rank 0 collects them."""
        ex = self.exchange
        if ex.world_size < 2:
            return
        from netdoctor.watcher import distributed

        try:
            if self.facts.distributed is not None:
                self.facts.distributed.bypass = self.replicas.bypasses()
                self.facts.distributed.wrapper_sites = self.replicas.sites()
            if ex.rank == 0:
                self.rank_summaries, self.ranks_missing = ex.collect()
            else:
                note = ex.publish(distributed.summary(self))
                if note:
                    self.notes.append(note)
        finally:
            ex.close()

    def _loop_facts(
        self,
        wo: WatchedOptimizer,
        step: int,
        with_grad: list,
        grad_norm: float | None,
        measured: bool,
    ) -> None:
        """ND501 (was the gradient cleared since the last step?), ND503 (why the step may
        change nothing; the change itself is checked after it), ND504 (did its models train
        in eval mode?), ND502 (an optimizer of frozen parameters)."""
        f = wo.facts
        if wo.judge_stale():
            f.stale_steps.append(step)
            f.stale_backward_site = f.stale_backward_site or wo.last_backward_site
            self._dirty.add("ND501")
        lrs = [v for v in f.lr[-1] if not math.isnan(v)]
        wo.step_reason = (
            "lr-zero"
            if lrs and all(v == 0 for v in lrs)
            else "no-grad"
            if not with_grad
            else "zero-grad"
            if grad_norm == 0
            else None
        )
        wo.choose_sample(with_grad)
        if not measured:  # the deep path measures every parameter's update itself
            wo.snapshot()
        for wm in self.models:
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
            self._dirty.add("ND504")
        if f.steps == 1 and f.n_trainable == 0:
            self._dirty.add("ND502")

    def step_statistics(self, wo: WatchedOptimizer) -> list[float]:
        """The small vector a multi-process exchange compares across ranks on deep steps:
        loss, total gradient norm, largest lr (the DDP extension appends its checksums)."""
        f = wo.facts
        return [
            f.loss[-1] if f.loss else math.nan,
            f.grad_norm[-1] if f.grad_norm else math.nan,
            max(f.lr[-1]) if f.lr and f.lr[-1] else math.nan,
        ]

    def _step_post(self, opt: torch.optim.Optimizer) -> None:
        wo = self._opt_by_id.get(id(opt))
        if wo is None or self.busy or not wo.in_step:
            return
        wo.in_step = False
        f = wo.facts
        step = f.steps
        reason = wo.step_reason
        if wo.deep_steps and wo.deep_steps[-1] == step:
            moved = False
            keep = self.schedule.is_deep(step + 1)  # the snapshot's buffers serve the next
            for _, meter in meters(self, wo, build=False):
                meter.keep = keep
                meter.after_step()
                moved |= any(t.update_ratio and t.update_ratio[-1] > 0 for t in meter.traces)
            self._changed(wo, step, moved, reason)
            for wm in self.models:
                if wm.owner is wo and wm.recorder is not None:
                    wm.recorder.flush_step()
                    if self.schedule.restarts_window(step):
                        wm.recorder.new_window()
        else:
            flag = wo.changed()
            if flag is not None:
                self.pending.add(flag, lambda v: self._changed(wo, step, v > 0.5, reason))
            else:
                self._changed(wo, step, False, reason or "no-grad")
        self.losses.end_step()
        for wm in self.models:
            if wo in wm.optimizers:
                wm.calls.clear()
                wm.output_nodes = []
            elif self.facts.iterations >= FEED_STEPS:
                wm.output_nodes = []
        if (
            self.attachment.discovering
            and self.primary is not None
            and (
                self.primary.facts.steps >= DISCOVERY_GIVE_UP
                or (self.primary.facts.steps >= DISCOVERY_STEPS and self._covered())
            )
        ):
            self.attachment.discovery(False)

    def _changed(self, wo: WatchedOptimizer, step: int, moved: bool, reason: str | None) -> None:
        f = wo.facts
        if moved:
            f.changed_steps += 1
            return
        f.unchanged_steps.append(step)
        key = reason or "no-change"
        f.unchanged_reasons[key] = f.unchanged_reasons.get(key, 0) + 1
        self._dirty.add("ND503")

    # -- backward, modes, schedulers -----------------------------------------------------
    def on_backward(self, tensors: Any) -> None:
        def body():
            if self.busy:
                return
            self.facts.backward_calls += 1
            site = user_location()
            if self.facts.backward_site is None:
                self.facts.backward_site = site
            for wo in self.optimizers:
                wo.before_backward(self.pending, site)
            for wm in self.models:
                wm.note_backward()
            t = (
                tensors
                if isinstance(tensors, torch.Tensor)
                else (
                    tensors[0]
                    if isinstance(tensors, (list, tuple))
                    and len(tensors) == 1
                    and isinstance(tensors[0], torch.Tensor)
                    else None
                )
            )
            source = t  # the tensor a loss function returned, when netdoctor saw it
            unscaled = self._unscaled.pop(id(t), None) if t is not None else None
            if unscaled is not None and unscaled[0]() is t:  # GradScaler.scale(loss)
                loss, source_id = unscaled[1], unscaled[2]
            else:
                loss = (
                    t.detach()
                    if t is not None and t.is_floating_point() and t.numel() <= 1
                    else None
                )
                source_id = id(source) if source is not None else None
            taken = {id(c) for r in self.backwards for c in r.calls}
            calls = [c for c in self.losses.recent if id(c) not in taken]
            self.backwards.append(
                BackwardRecord(
                    loss=loss,
                    fn=self.losses.outputs.get(source_id),
                    forwards={id(wm): wm.forwards for wm in self.models},
                    calls=calls,
                )
            )

        self._guard(body)

    def after_backward(self) -> None:
        """On deep steps: which parameters backward gave a gradient (a zero_grad() between
        backward and step must not read as "no gradient ever reached them")."""

        def body():
            if self.busy or not self._sampling():
                return
            for wo in self.optimizers:
                wo.grad_seen |= {id(p) for p in wo.trainable if p.grad is not None}

        self._guard(body)

    def without_our_hooks(self, state: dict) -> dict:
        """A module's pickling/copying state without the hooks netdoctor registered on it."""
        try:
            ours = {h.id for wm in self.models for h in wm.handles}
            ours |= {
                h.id for wm in self.models if wm.recorder is not None for h in wm.recorder.handles
            }
            ours |= self.replicas.hook_ids()
            keys = [
                k
                for k in (
                    "_forward_pre_hooks",
                    "_forward_hooks",
                    "_forward_pre_hooks_with_kwargs",
                    "_forward_hooks_with_kwargs",
                    "_forward_hooks_always_called",
                )
                if isinstance(state.get(k), dict) and ours & set(state[k])
            ]
            if not keys:
                return state
            state = dict(state)
            for k in keys:
                state[k] = type(state[k])(
                    (hid, v) for hid, v in state[k].items() if hid not in ours
                )
            return state
        except Exception:
            return state

    def on_loss_scaled(self, outputs: Any, scaled: Any) -> None:
        """GradScaler.scale(loss): remember the unscaled loss for the backward of the scaled
        one (the scale changes during training; the loss curve must not)."""

        def body():
            if self.busy or not isinstance(scaled, torch.Tensor) or scaled is outputs:
                return
            if isinstance(outputs, torch.Tensor):
                self._unscaled[id(scaled)] = (weakref.ref(scaled), outputs.detach(), id(outputs))

        self._guard(body)

    def on_train_mode(self, module: nn.Module, mode: bool) -> None:
        def body():
            if mode or self.busy:
                return
            loc = user_location()
            if loc is not None:
                self.eval_sites[id(module)] = loc

        self._guard(body)

    def on_scheduler_step(self, scheduler: Any) -> None:
        def body():
            if self.busy or getattr(scheduler, "_step_count", 1) == 0:
                return  # the scheduler's own first step, from its constructor
            site = user_location()
            key = (
                type(scheduler).__name__,
                site.path if site else None,
                site.line if site else None,
            )
            facts = self.facts.schedulers.get(key)
            if facts is None:
                facts = self.facts.schedulers[key] = SchedulerFacts(type(scheduler).__name__, site)
            facts.calls += 1
            it = self.facts.iterations
            facts.first_iteration = it if facts.first_iteration is None else facts.first_iteration
            facts.last_iteration = it

        self._guard(body)

    # -- static rules, once per model --------------------------------------------------------
    def _static_check(self, wm: WatchedModel) -> None:
        self.static[id(wm)] = ([], [])
        if not self.options.static or wm.compiled or wm.model is None:
            return
        if wm.communicates:
            self.static[id(wm)] = (
                [],
                [
                    f"{wm.facts.label}: static rules skipped: its forward "
                    "communicates with the other ranks (sharded DTensor "
                    "parameters or SyncBatchNorm)"
                ],
            )
            return
        from netdoctor.watcher.diagnosis import static_findings

        t0 = time.perf_counter()
        self.losses.uninstall()  # the graph is traced through the user's own functions
        try:
            with self._busy():
                self.static[id(wm)] = static_findings(self, wm)
        finally:
            self.losses.install()
            self.static_seconds += time.perf_counter() - t0

    # -- live judgement ------------------------------------------------------------------
    def _live(self, step: int) -> StopTraining | None:
        """Judge the loop facts (and a NaN) now; announce what is newly confirmed and severe;
        with stop_on, stop there."""
        from netdoctor.watcher.diagnosis import live_findings

        rules, self._dirty = self._dirty - self._settled, set()
        if not rules:
            return None
        with self._busy():
            found = live_findings(self, rules)
        self._settled |= {f.rule for f in found} - {"ND502"}  # ND502: per model
        stop_level = (
            None if self.options.stop_on == "never" else Severity.parse(self.options.stop_on)
        )
        announce_level = min(Severity.ERROR, stop_level or Severity.ERROR)
        rank = self.rank
        for f in found:
            key = (f.rule, f.module, str(f.location), (f.evidence or {}).get("model"))
            if key in self.announced:
                continue
            self.announced.add(key)
            # under torchrun, rank 0 announces; the others only what their own measurements
            # show (a NaN of theirs), prefixed with their rank
            if (
                self.options.announce
                and f.severity >= announce_level
                and (rank == 0 or f.rule.startswith("ND4"))
            ):
                who = "netdoctor" if rank == 0 else f"netdoctor [rank {rank}]"
                where = f" at {f.location}" if f.location else ""
                self.announce_to(
                    f"{who}: step {step}: {f.rule} {f.name} [{f.severity.label}]"
                    f"{where}: {_one_line(f.message)}"
                )
            if stop_level is not None and f.severity >= stop_level and not self.should_stop:
                if self.exchange.world_size > 1 and f.rule not in ("ND401", "ND508"):
                    # another rank may confirm it a step later: stop together at the next
                    # exchange (a NaN reaches every rank's gradients in the same step, and
                    # ND508 is judged from the exchange itself, alike on every rank)
                    self.stop_request = self.stop_request or f
                    continue
                return self._stop(f, step)
        return None

    def _stop(self, f: Finding | None, step: int) -> StopTraining | None:
        self.should_stop = True
        self.stopped_by = f
        self.facts.stopped = "stop-on"
        if self.options.stop_action == "raise":
            return StopTraining(f, step)
        return None

    def _finish_pending(self) -> None:
        self.pending.resolve()
        self.facts.finished = True


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _autocast_state(device: torch.device) -> tuple[str, torch.dtype] | None:
    kind = device.type
    try:
        if torch.is_autocast_enabled(kind):
            return kind, torch.get_autocast_dtype(kind)
    except (TypeError, RuntimeError):
        return None
    return None


def running_doctor() -> Doctor | None:
    """The doctor of `netdoctor run` when this process runs under it: a `watch()` or a trainer
    callback in the script joins it (its models and optimizers are added there; `netdoctor
    run`'s options apply and it writes the one report) instead of attaching a second time."""
    return _ACTIVE[0] if _ACTIVE and _ACTIVE[0].joinable else None


class JoinedDoctor:
    """What `netdoctor.watch()` returns inside a script that `netdoctor run` already watches:
    the models and optimizers join the running doctor, and closing this handle leaves it
    running (`netdoctor run` writes the one report)."""

    def __init__(self, doctor: Doctor):
        self._doctor = doctor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._doctor, name)

    def close(self) -> None:
        pass

    def __enter__(self) -> JoinedDoctor:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return False


def watch(
    model: nn.Module | list | tuple | None = None,
    optimizer: torch.optim.Optimizer | list | tuple | None = None,
    **options: Any,
) -> Doctor | JoinedDoctor:
    """See `netdoctor.watch`."""
    opts = WatchOptions.from_kwargs(**options)
    models = [] if model is None else list(model) if isinstance(model, (list, tuple)) else [model]
    optimizers = (
        []
        if optimizer is None
        else list(optimizer)
        if isinstance(optimizer, (list, tuple))
        else [optimizer]
    )
    running = running_doctor()
    if running is not None:
        for m in models:
            running.add_model(m)
        for o in optimizers:
            running.add_optimizer(o)
        return JoinedDoctor(running)
    target = opts.name or (", ".join(type(m).__name__ for m in models) if models else "training")
    doctor = Doctor(
        opts, discover_models=not models, discover_optimizers=not optimizers, target=target
    )
    doctor.start()
    try:
        for m in models:
            doctor.add_model(m)
        for o in optimizers:
            doctor.add_optimizer(o)
    except BaseException:
        doctor.close()
        raise
    return doctor
