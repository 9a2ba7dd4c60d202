"""The Doctor: netdoctor inside the user's own training loop -- a dispatcher, a lifecycle and the
public API over the parts that do the work.

It receives the raw events of `attach.Attachment` (optimizer steps, backward calls, top-level
forwards, `.train()`/`.eval()`, scheduler steps, `GradScaler.scale`, DDP wrappers) and hands
them, as the typed events of `events`, to its parts, each of which keeps its own state:

* `registry.Registry`: which models and optimizers are watched (discovery, names, owners; the
  root hooks of each model, whose forwards it announces);
* `measurement.Measurement`: the per-step measurements, one host sync per step, and the deep
  steps' per-layer and per-parameter ones (`schedule.Schedule`);
* `loopwatch.LoopWatch`: the loop facts the ND5xx rules read (`measure.facts.LoopFacts`);
* `localize.Localization`: where the first NaN/Inf came from;
* `manual.ManualSteps`: a loop that updates the weights by hand (no optimizer) found, and its
  stand-in optimizer stepped from the backwards;
* `amp.AmpWatch`: mixed precision -- the GradScalers (skipped steps, scale, `unscale_` before
  clipping, backward on the scaled loss) and low-precision weights;
* `static.StaticChecks`: the static rules, once per model;
* `distributed.Distributed`: the ranks' exchange under torchrun;
* `tensorboard.TensorBoardExport`: with the `tensorboard` option (or `export_to`), the
  measurements as TensorBoard events, and each finding at the step the live judgement confirmed
  it (the rest, and the report, when the doctor closes);
* `live.LiveJudge`: the live judgement -- confirmed severe findings announced on stderr as soon
  as they are confirmed; with `stop_on`, `StopTraining` (a BaseException) raised from the
  optimizer step hook, before the update;

and builds the report from what they gathered (`diagnosis`). The parts share nothing private:
`services.Guard` (busy, the guard, notes), `services.DirtyRules`, `optimizers.PendingScalars`
and the `LoopFacts` record are the small shared objects.

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
* under torchrun the process group the user initialised is found at the first optimizer step
  and the ranks compare their deep steps on netdoctor's own gloo group; rank 0 writes the one
  report (see `distributed`);
* `report()` / `findings` / `close()`: at the end of fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn

from netdoctor.errors import StopTraining, UserError
from netdoctor.findings import Finding, Report, Severity
from netdoctor.loading.provenance import Provenance, user_location
from netdoctor.measure.facts import LoopFacts
from netdoctor.watcher.amp import AmpWatch
from netdoctor.watcher.attach import Attachment
from netdoctor.watcher.diagnosis import Gathered, diagnose
from netdoctor.watcher.distributed import (
    Distributed,
    DistributedExchange,
    LocalExchange,
    summary,
)
from netdoctor.watcher.events import (
    BackwardEnd,
    BackwardStart,
    Close,
    Dispatcher,
    GradClipped,
    LossScaled,
    ScalerStep,
    ScalerUpdate,
    SchedulerStep,
    StepEnd,
    StepStart,
    TrainMode,
    Unscaled,
)
from netdoctor.watcher.live import LiveJudge
from netdoctor.watcher.localize import Localization
from netdoctor.watcher.loopwatch import LoopWatch
from netdoctor.watcher.losses import LossWatch
from netdoctor.watcher.manual import ManualSteps
from netdoctor.watcher.measurement import Measurement
from netdoctor.watcher.models import WatchedModel
from netdoctor.watcher.optimizers import PendingScalars, WatchedOptimizer, unwrap_optimizer
from netdoctor.watcher.registry import Registry
from netdoctor.watcher.replicas import Replicas
from netdoctor.watcher.schedule import Schedule
from netdoctor.watcher.services import DirtyRules, Guard
from netdoctor.watcher.settings import TensorBoardTarget, WatchOptions
from netdoctor.watcher.static import StaticChecks
from netdoctor.watcher.tensorboard import TensorBoardExport

_ACTIVE: list[Doctor] = []  # at most one doctor watches at a time (the hooks are global)


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
        self.provenance = provenance or Provenance()
        self.guard = Guard()
        self.dirty = DirtyRules()
        self.pending = PendingScalars()
        guard = self.guard
        self.losses = LossWatch(
            self.pending, self._sampling, guard.run, lambda: guard.busy, self.facts.losses
        )
        self.attachment = Attachment(self)
        self.parts = Dispatcher()
        self.registry = Registry(
            self.facts,
            self.provenance,
            self.attachment,
            self.parts,
            guard,
            discover_models=discover_models,
            discover_optimizers=discover_optimizers,
            scope=scope,
        )
        self.measurement = Measurement(
            self.registry, self.losses, self.pending, guard, self.schedule, self._sampling
        )
        self.loop = LoopWatch(self.facts, self.registry, self.pending, self.schedule, self.dirty)
        self.localization = Localization(self.registry, self.losses, self.facts, guard, self.dirty)
        self.distributed = Distributed(
            self.options, self.facts, self.registry, self.localization, guard, self.dirty
        )
        self.static = StaticChecks(self.options, self.registry, self.losses, guard)
        self.amp = AmpWatch(self.facts, self.localization, self.pending, self.dirty)
        self.optimizer_steps = 0  # every optimizer step torch ran (a scaler's skip runs none)
        self.manual = ManualSteps(
            self.registry,
            self.pending,
            self._step_start,
            self._step_end,
            lambda: self.optimizer_steps,
        )
        self.registry.before_forward = self.manual.before_next
        # the order in which a part hears an event: the one-off static checks see a model
        # without its per-layer hooks (measurement detaches them first); the NaN localisation
        # comes after the loop facts
        self.parts.add(
            self.loop,
            self.distributed,
            self.registry,
            self.measurement,
            self.static,
            self.localization,
            self.amp,
        )
        self.gathered = Gathered(
            target,
            self.options,
            self.facts,
            self.schedule,
            guard,
            self.pending,
            self.losses,
            self.registry,
            self.static,
            self.localization,
            self.distributed,
        )
        self.judge = LiveJudge(self.gathered, self.dirty)
        self.started = time.perf_counter()
        self.ended: float | None = None
        self._report: Report | None = None
        self.closed = False
        self.joinable = False  # netdoctor run: a watch() in the script joins this doctor
        self.export: TensorBoardExport | None = None
        if self.options.tensorboard is not None and self.options.tensorboard is not False:
            self.export_to(self.options.tensorboard)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Doctor:
        if _ACTIVE:
            raise UserError("another netdoctor watcher is active in this process; close() it first")
        _ACTIVE.append(self)
        self.guard.active = True
        try:
            self.attachment.install(discover_models=self.registry.discover_models)
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
            self.guard.run(self._finish)
        finally:
            self._detach()
        self.guard.run(lambda: self.distributed.finish(self._summary))
        export = self.export
        if export is not None:  # the final findings, then the writer flushed and closed
            self.guard.run(lambda: export.finish(self.diagnose))
        output = self.options.output
        if output and self.rank == 0:
            self.guard.run(lambda: self.report(output=output))

    def _finish(self) -> None:
        self.manual.before_next()  # a manual update's last step ends here
        self.parts.on_close(Close())
        self.facts.finished = True

    def _summary(self) -> dict[str, Any]:
        return summary(self.diagnose(), self.facts, self.localization.first())

    def _detach(self) -> None:
        try:
            try:
                self.losses.uninstall()
            finally:
                try:
                    self.attachment.remove()
                finally:
                    self.registry.close()
        finally:
            self.guard.active = False
            if self in _ACTIVE:
                _ACTIVE.remove(self)

    def __enter__(self) -> Doctor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
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
        self.guard.run(lambda: self.registry.add_model(model, name))

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer = unwrap_optimizer(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(
                f"netdoctor.watch: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.guard.run(lambda: self.registry.add_optimizer(optimizer))

    def export_to(self, target: TensorBoardTarget) -> None:
        """Write TensorBoard events to `target` (a directory or a SummaryWriter) from now on,
        unless an export is already set up (a `watch()` or a callback joining `netdoctor run`).
        TensorBoardUnavailable when the tensorboard package is missing."""
        if self.export is not None or target is None or target is False or self.closed:
            return
        export = TensorBoardExport(
            target, self.registry, self.facts, self.guard, lambda: self.distributed.rank
        )
        self.export = export
        self.parts.add(export)
        self.judge.on_confirmed = export.confirmed

    def observe_loss(self, value: Any, after_step: bool = False) -> None:
        """A trainer's logged loss, used only for a step whose backward netdoctor did not see:
        the coming step's, or with `after_step=True` the step just taken (what a trainer's
        batch-end hook reports)."""

        def body() -> None:
            v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            self.measurement.observe_loss(v, after_step)

        self.guard.run(body)

    @property
    def findings(self) -> list[Finding]:
        """The findings so far (in priority order); final once the doctor is closed."""
        return self.diagnose().sorted_findings()

    def diagnose(self) -> Report:
        if self._report is not None:
            return self._report
        with self.guard.busy_scope():
            report = diagnose(
                self.gathered,
                closed=self.closed,
                stopped_by=self.judge.stopped_by,
                wall=(self.ended or time.perf_counter()) - self.started,
            )
        if self.closed:
            self._report = report
        return report

    def report(
        self, format: str | None = None, output: str | None = None, color: bool | None = None
    ) -> str:
        """The report as text/json/sarif/github/html; written to `output` when given."""
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

    # -- what the parts hold, read-only -----------------------------------------------------
    @property
    def target(self) -> str | None:
        return self.gathered.target

    @property
    def models(self) -> list[WatchedModel]:
        return self.registry.models

    @property
    def optimizers(self) -> list[WatchedOptimizer]:
        return self.registry.optimizers

    @property
    def primary(self) -> WatchedOptimizer | None:
        return self.registry.primary

    @property
    def replicas(self) -> Replicas:
        return self.registry.replicas

    @property
    def exchange(self) -> LocalExchange | DistributedExchange:
        return self.distributed.exchange

    @property
    def rank(self) -> int:
        """This process's rank: the process group's, else torchrun's RANK, else 0. Only rank 0
        writes the report."""
        return self.distributed.rank

    @property
    def should_stop(self) -> bool:
        return self.judge.should_stop

    @property
    def stopped_by(self) -> Finding | None:
        return self.judge.stopped_by

    @property
    def notes(self) -> list[str]:
        return self.guard.notes

    @property
    def errors(self) -> dict[str, int]:
        return self.guard.errors

    @property
    def busy(self) -> bool:
        return self.guard.busy

    @property
    def measure_seconds(self) -> float:
        """netdoctor's own time inside the training (see `diagnosis.Gathered`)."""
        return self.gathered.measure_seconds()

    @property
    def announce_to(self) -> Callable[[str], None]:
        """Where the one-line announcements go (a callable taking the line)."""
        return self.judge.announce_to

    @announce_to.setter
    def announce_to(self, fn: Callable[[str], None]) -> None:
        self.judge.announce_to = fn

    def label_of(self, module: nn.Module) -> str:
        return self.registry.label_of(module)

    # -- the attachment's events (attach.Hooked), dispatched to the parts -------------------
    def on_step_pre(
        self,
        opt: torch.optim.Optimizer,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        kwargs = kwargs or {}
        self.optimizer_steps += 1
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if callable(closure) and not self.guard.busy:
            # forward and backward run inside the closure: measure when its first call returns
            # (the gradients exist then, the update has not run yet)
            done = [False]

            def measured_closure(*a: Any, **k: Any) -> Any:
                result = closure(*a, **k)
                if not done[0]:
                    done[0] = True
                    stop = self.guard.run(lambda: self._step_start(opt, closure=True))
                    if stop is not None:
                        raise stop
                return result

            if "closure" in kwargs:
                return args, {**kwargs, "closure": measured_closure}
            return (args[0], measured_closure, *args[2:]), kwargs
        stop = self.guard.run(lambda: self._step_start(opt))
        if stop is not None:
            raise stop
        return None

    def on_step_post(self, opt: torch.optim.Optimizer) -> None:
        self.guard.run(lambda: self._step_end(opt))

    def _step_start(self, opt: torch.optim.Optimizer, closure: bool = False) -> StopTraining | None:
        """Everything netdoctor does before an update: the parts' step start (the one-off
        static checks), the step's measurements (one host sync), the loop facts and a NaN's
        localisation, the ranks' exchange on deep steps, and the live judgement (which may stop
        here)."""
        if self.guard.busy:
            return None
        wo = self.registry.begin_step(opt)
        if wo is None:
            return None
        wo.facts.closure = wo.facts.closure or closure
        step = wo.facts.steps
        start = StepStart(wo, step, self.schedule.is_deep(step))
        stop_all = False
        try:
            self.parts.on_step_start(start)
            self.parts.on_step_measured(self.measurement.measure(start))
        finally:  # under torchrun every rank joins the exchange, whatever failed here
            if start.deep and self.distributed.world_size > 1:
                stop_all = bool(self.guard.run(lambda: self.distributed.exchange_step(start)))
        if stop_all and not self.judge.should_stop:  # a rank asked to stop: every rank stops
            return self.judge.stop(self.distributed.stop_request, step)
        return self.judge.judge(step)

    def _step_end(self, opt: torch.optim.Optimizer) -> None:
        if self.guard.busy:
            return
        wo = self.registry.end_step(opt)
        if wo is None:
            return
        step = wo.facts.steps
        moved = self.measurement.after_step(wo, step)
        self.parts.on_step_end(StepEnd(wo, step, moved))

    def on_global_forward_pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.guard.run(lambda: self.registry.on_global_forward_pre(module, args))

    def on_global_forward_post(self, module: nn.Module) -> None:
        self.registry.on_global_forward_post(module)

    def on_backward(self, tensors: Any) -> None:
        def body() -> None:
            if not self.guard.busy:
                self.guard.run(self.manual.before_next)
                self.parts.on_backward(BackwardStart.of(tensors))

        self.guard.run(body)

    def after_backward(self) -> None:
        """A backward returned; in a loop that updates the weights by hand, a step begins here
        (and the live judgement may stop training before the update)."""

        def body() -> StopTraining | None:
            if self.guard.busy:
                return None
            self.parts.on_backward_end(BackwardEnd())
            return self.manual.after_backward()

        stop = self.guard.run(body)
        if stop is not None:
            raise stop

    def on_train_mode(self, module: nn.Module, mode: bool) -> None:
        def body() -> None:
            if not self.guard.busy:
                self.parts.on_train_mode(TrainMode(module, mode))

        self.guard.run(body)

    def on_scheduler_step(self, scheduler: Any) -> None:
        def body() -> None:
            if not self.guard.busy:
                self.parts.on_scheduler_step(SchedulerStep(scheduler))

        self.guard.run(body)

    def on_loss_scaled(self, scaler: Any, outputs: Any, scaled: Any) -> None:
        """GradScaler.scale(loss) returned `scaled`."""

        def body() -> None:
            if (
                self.guard.busy
                or not isinstance(scaled, torch.Tensor)
                or scaled is outputs
                or not isinstance(outputs, torch.Tensor)
            ):
                return
            self.parts.on_loss_scaled(LossScaled(outputs, scaled, scaler))

        self.guard.run(body)

    def before_scaler_step(self, scaler: Any, optimizer: Any) -> int:
        """What `after_scaler_step` compares with: the optimizer steps torch has run so far."""
        return self.optimizer_steps

    def after_scaler_step(self, scaler: Any, optimizer: Any, before: int) -> None:
        """scaler.step(optimizer) returned: it skipped the step when torch ran no optimizer
        step inside it. A skipped step's backwards and loss are taken here (with one host
        sync: the scaler's own inf check has just synced), for the NaN localisation and the
        scaler's record; then the step's per-iteration state is cleared as after a step."""

        def body() -> None:
            if self.guard.busy or not isinstance(optimizer, torch.optim.Optimizer):
                return
            skipped = self.optimizer_steps == before
            wo = self.registry.watched(optimizer)
            if not skipped:
                step = wo.facts.steps if wo is not None else 0
                self.parts.on_scaler_step(ScalerStep(scaler, wo, False, step))
                return
            backwards, loss = self.measurement.skip()
            step = (wo.facts.steps if wo is not None else 0) + 1
            self.parts.on_scaler_step(ScalerStep(scaler, wo, True, step, backwards, loss))
            self.registry.forget_calls(wo)

        self.guard.run(body)

    def on_unscale(self, scaler: Any, optimizer: Any) -> None:
        def body() -> None:
            if not self.guard.busy:
                self.parts.on_unscaled(Unscaled(scaler, optimizer))

        self.guard.run(body)

    def on_scaler_update(self, scaler: Any) -> None:
        def body() -> None:
            if not self.guard.busy:
                self.parts.on_scaler_update(ScalerUpdate(scaler))

        self.guard.run(body)

    def on_clip(self, kind: str, parameters: list[Any], limit: Any, result: Any) -> None:
        def body() -> None:
            if not self.guard.busy:
                value = float(limit) if isinstance(limit, (int, float)) else None
                self.parts.on_grad_clipped(GradClipped(kind, parameters, value, result))
                self.manual.after_clip()

        self.guard.run(body)

    def without_our_hooks(self, state: dict[str, Any]) -> dict[str, Any]:
        """A module's pickling/copying state without the hooks netdoctor registered on it."""
        return self.registry.without_our_hooks(state)

    def on_ddp_wrapped(self, ddp: nn.Module) -> None:
        """A DistributedDataParallel was built."""
        self.guard.run(lambda: self.registry.track_ddp(ddp, user_location()))

    def _sampling(self) -> bool:
        """Whether the coming training step (of the first optimizer) is a deep one."""
        return self.schedule.is_deep(self.registry.next_step())


def running_doctor() -> Doctor | None:
    """The doctor of `netdoctor run` when this process runs under it: a `watch()` or a trainer
    callback in the script joins it (its models and optimizers are added there; `netdoctor
    run`'s options apply and it writes the one report) instead of attaching a second time."""
    return _ACTIVE[0] if _ACTIVE and _ACTIVE[0].joinable else None
