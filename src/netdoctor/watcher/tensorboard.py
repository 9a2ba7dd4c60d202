"""TensorBoard export: the doctor's measurements and findings as TensorBoard events
(`netdoctor run --tensorboard DIR`, `netdoctor.watch(..., tensorboard=DIR or a writer)`, the
trainer callbacks with the trainer's own TensorBoard logger).

What is written, with the tags (stable; docs/run.md#tensorboard lists them), all under
`netdoctor/`; the step is the optimizer's own step count (1-based, as the report counts):

* every step of the first optimizer that stepped: `loss`, `grad_norm` (the total gradient
  norm), `lr` (the first param group's; `lr/group{i}` for the others), and `amp/scale` (the
  GradScaler's scale the step's loss was scaled by; `amp/scale/{label}` for a second scaler).
  Another optimizer's steps: the same under `netdoctor/{its label}/`;
* on the deep-measured steps: `accuracy` (class targets), per weight `layers/grad_norm/{name}`
  and `layers/update_ratio/{name}`, per activation `activations/zero_share/{site}` (ReLU) and
  `activations/saturated_share/{site}` (sigmoid, tanh), and histograms across the layers of
  the same values (`hist/grad_norm_log10`, `hist/update_ratio_log10`, `hist/zero_share`,
  `hist/saturated_share`): the gradient flow over time. A histogram of each layer's gradient
  values would copy every gradient to the host: the overhead goal rules it out;
* `findings/{rule}`: a text summary (rule, title, severity, where, message, fix) at the step
  where the live judgement confirmed the finding, or, for what only the final diagnosis finds,
  at the last step; `report`: the text report at the last step.

Every value is one the watcher already holds as a Python float (no sync, no tensor copied):
the writer queues the events for its own background thread. Under torchrun only rank 0 writes
(as only rank 0 writes the report), so the per-step values are rank 0's and the final findings
the job's.

A writer that fails (a full disk, a closed writer) ends the export with a note in the report,
never an exception in the user's loop. netdoctor's own writer is closed when the doctor closes
(its thread joined); a writer of the user's or of the trainer's is only flushed, and closed
again only if netdoctor had to reopen it (a trainer that closed it before the doctor's last
writes).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable

from netdoctor.findings import Finding, Report
from netdoctor.measure.facts import LoopFacts
from netdoctor.watcher.events import Part, StepEnd, StepMeasured
from netdoctor.watcher.models import WatchedModel
from netdoctor.watcher.optimizers import WatchedOptimizer
from netdoctor.watcher.registry import Registry
from netdoctor.watcher.services import Guard
from netdoctor.watcher.settings import (
    TENSORBOARD_EXTRA,
    SummaryWriterLike,
    TensorBoardTarget,
    TensorBoardUnavailable,
)

PREFIX = "netdoctor/"
_INVALID = re.compile(r"[^-/\w.]")  # what TensorBoard accepts in a tag (as torch cleans it)
# netdoctor's own writer: a deep step's few hundred per-layer events never wait for the
# writer's thread, and a live TensorBoard sees the curves within half a minute
MAX_QUEUE = 1000
FLUSH_SECS = 30


def clean(part: str) -> str:
    """One part of a tag, as TensorBoard accepts it ("relu(fc1)" -> "relu_fc1_")."""
    return _INVALID.sub("_", part).strip("/") or "_"


def summary_writer_class() -> type:
    """torch's SummaryWriter (imports the tensorboard package): TensorBoardUnavailable when it
    cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TensorBoardUnavailable(
            f"TensorBoard export needs the tensorboard package ({e}): {TENSORBOARD_EXTRA}"
        ) from e
    return SummaryWriter


def finding_text(f: Finding, patch: bool) -> str:
    """A finding as TensorBoard's text dashboard shows it (markdown)."""
    where = f" at `{f.location}`" if f.location else ""
    module = f" (`{f.module}`)" if f.module else ""
    lines = [f"**{f.rule} {f.name}** [{f.severity.label}]{module}{where}", "", f.message]
    if f.fix is not None:
        lines += ["", f"**Fix:** {f.fix.summary}"]
        if patch and f.fix.patch:
            lines += [""] + ["    " + line for line in f.fix.patch.rstrip("\n").splitlines()]
    return "\n".join(lines)


def _key(f: Finding) -> tuple[object, ...]:
    return (f.rule, f.module, (f.evidence or {}).get("model"))


class TensorBoardExport(Part):
    """See the module docstring. `target`: a directory or a writer; `rank()`: this process's
    rank, asked when the first event is written (the process group is found at the first
    step)."""

    def __init__(
        self,
        target: TensorBoardTarget,
        registry: Registry,
        facts: LoopFacts,
        guard: Guard,
        rank: Callable[[], int],
    ):
        self.registry = registry
        self.facts = facts
        self.guard = guard
        self.rank = rank
        self.directory: str | None = None
        self.writer: SummaryWriterLike | None = None
        self.owned = False  # netdoctor opened the writer: it closes it
        self.reopened = False  # a writer closed by its owner, reopened by netdoctor's writes
        self.final: Report | None = None  # the final report, once built
        if isinstance(target, (str, os.PathLike)):
            self.directory = os.fspath(target)
            self._writer_class = summary_writer_class()  # fails now, not in the loop
        elif isinstance(target, SummaryWriterLike) and not isinstance(target, bool):
            self.writer = target
        self.failed = False
        self.closed = False
        self.written: set[tuple[object, ...]] = set()  # findings already written
        # id(a trace's list) -> (the list, kept alive so its id is not reused; values written)
        self._counts: dict[int, tuple[list[float], int]] = {}
        self.last_step = 0

    # -- the writer ------------------------------------------------------------------------
    def _open(self) -> SummaryWriterLike | None:
        """The writer, opened at the first event (rank 0 only); None: nothing is written."""
        if self.failed or self.closed:
            return None
        if self.writer is None:
            if self.directory is None or self.rank() != 0:
                return None
            self.writer = self._writer_class(
                log_dir=self.directory, max_queue=MAX_QUEUE, flush_secs=FLUSH_SECS
            )
            self.owned = True
        elif self.rank() != 0:
            return None
        elif not self.owned and getattr(self.writer, "file_writer", True) is None:
            # torch's and tensorboardX's SummaryWriter after close(): writing reopens it (a
            # trainer closes its writer at the end of training, before netdoctor's last writes)
            self.reopened = True
        return self.writer

    def _write(self, step: int, body: Callable[[SummaryWriterLike], None]) -> None:
        """Run `body(writer)`; a failure ends the export with a note (never an exception in
        the user's loop)."""
        try:
            writer = self._open()
            if writer is not None:
                body(writer)
        except Exception as e:
            self._fail(step, e)

    def _fail(self, step: int, error: Exception) -> None:
        if self.failed:
            return
        self.failed = True
        where = f" to {self.directory}" if self.directory else ""
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        note = (
            f"TensorBoard export{where} stopped at step {step}: {type(error).__name__}"
            f"{': ' + detail if detail else ''} (the events before it were written)"
        )
        self.guard.notes.append(note)
        if self.final is not None:  # the report is built already: the note goes in too
            self.final.notes.append(note)
        self._close_owned()

    def _close_owned(self) -> None:
        writer, owned = self.writer, self.owned
        if writer is not None and owned:
            self.owned = False
            try:
                writer.close()  # type: ignore[attr-defined]
            except Exception:
                pass

    def _tag(self, wo: WatchedOptimizer, name: str) -> str:
        if wo is self.registry.primary:
            return PREFIX + name
        return f"{PREFIX}{clean(wo.facts.label)}/{name}"

    # -- every step ------------------------------------------------------------------------
    def on_step_measured(self, event: StepMeasured) -> None:
        wo, step = event.optimizer, event.step
        if wo is self.registry.primary:
            self.last_step = step
        scalars: list[tuple[str, float]] = [
            (self._tag(wo, "loss"), event.loss),
            (self._tag(wo, "grad_norm"), math.nan if event.grad_norm is None else event.grad_norm),
        ]
        lrs = wo.facts.lr[-1] if wo.facts.lr else []
        for i, lr in enumerate(lrs):
            scalars.append((self._tag(wo, "lr" if i == 0 else f"lr/group{i}"), lr))
        if wo is self.registry.primary:
            for i, scaler in enumerate(self.facts.scalers):
                scale = scaler.scale[-1] if scaler.scale else scaler.initial_scale
                if scaler.enabled and scale is not None:
                    name = "amp/scale" if i == 0 else f"amp/scale/{clean(scaler.label)}"
                    scalars.append((PREFIX + name, scale))
        if event.deep and wo.accuracy and wo.accuracy[-1] is not None:
            scalars.append((self._tag(wo, "accuracy"), wo.accuracy[-1]))

        def body(writer: SummaryWriterLike) -> None:
            for tag, value in scalars:
                writer.add_scalar(tag, value, step)

        self._write(step, body)

    # -- the deep steps --------------------------------------------------------------------
    def on_step_end(self, event: StepEnd) -> None:
        wo, step = event.optimizer, event.step
        if not (wo.deep_steps and wo.deep_steps[-1] == step):
            return
        models = [wm for wm in self.registry.models if wm.owner is wo]
        several = len(self.registry.models) > 1
        scalars: list[tuple[str, float]] = []
        hists: dict[str, list[float]] = {}

        def named(wm: WatchedModel, name: str) -> str:
            return clean(f"{wm.facts.label}/{name}" if several else name)

        for wm, meter in wo.meters:
            if wm not in models:
                continue
            for trace in meter.traces:
                if not trace.is_weight:
                    continue
                for kind, values in (
                    ("grad_norm", trace.grad_norm),
                    ("update_ratio", trace.update_ratio),
                ):
                    for value in self._new(values):
                        scalars.append((f"{PREFIX}layers/{kind}/{named(wm, trace.name)}", value))
                        if value > 0 and math.isfinite(value):
                            hists.setdefault(f"{kind}_log10", []).append(math.log10(value))
        for wm in models:
            recorder = wm.recorder
            if recorder is None:
                continue
            for site in recorder.site_list:
                trace = site.trace
                kind = "zero_share" if trace.kind == "relu" else "saturated_share"
                values = trace.zero_fraction if trace.kind == "relu" else trace.saturation
                for value in self._new(values):
                    scalars.append((f"{PREFIX}activations/{kind}/{named(wm, trace.name)}", value))
                    if math.isfinite(value):
                        hists.setdefault(kind, []).append(value)
        if not scalars:
            return

        def body(writer: SummaryWriterLike) -> None:
            import numpy as np

            for tag, value in scalars:
                writer.add_scalar(tag, value, step)
            for name, values in hists.items():
                writer.add_histogram(f"{PREFIX}hist/{name}", np.asarray(values), step)

        self._write(step, body)

    def _new(self, values: list[float]) -> list[float]:
        """The values appended to a trace's list since the last deep step (the list is the
        trace's own, alive as long as the trace)."""
        _, done = self._counts.get(id(values), (values, 0))
        self._counts[id(values)] = (values, len(values))
        return values[done:]

    # -- findings --------------------------------------------------------------------------
    def confirmed(self, findings: Iterable[Finding], step: int) -> None:
        """The live judgement confirmed `findings` at `step` (drafts: the fix's summary)."""
        self._findings(list(findings), step, patch=False)

    def _findings(self, findings: list[Finding], step: int, patch: bool) -> None:
        by_rule: dict[str, list[str]] = {}
        for f in findings:
            key = _key(f)
            if key in self.written:
                continue
            self.written.add(key)
            by_rule.setdefault(f.rule, []).append(finding_text(f, patch))
        if not by_rule:
            return

        def body(writer: SummaryWriterLike) -> None:
            for rule, texts in by_rule.items():
                writer.add_text(f"{PREFIX}findings/{clean(rule)}", "\n\n---\n\n".join(texts), step)

        self._write(step, body)

    def finish(self, report: Callable[[], Report]) -> None:
        """The doctor closed: what only the final diagnosis found and the text report at the
        last step, then the writer flushed (closed when netdoctor opened or reopened it).
        Idempotent."""
        if self.closed:
            return
        step = self.last_step or self.facts.iterations
        try:
            if not self.failed and self.rank() == 0:
                self.final = report()
                self._findings(self.final.sorted_findings(), step, patch=True)
                from netdoctor.report import render

                text = render([self.final], "text", color=False)
                block = "\n".join("    " + line for line in text.splitlines())
                self._write(step, lambda w: w.add_text(PREFIX + "report", block, step))
                self._write(step, lambda w: w.flush())
        finally:
            self.closed = True
            if self.reopened:  # the owner closed it before: netdoctor's writes reopened it
                self.owned = True
            self._close_owned()
