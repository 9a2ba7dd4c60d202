"""The one-off static checks: the static rules on each watched model, once, at the first step of
an optimizer that trains it (still at its initial weights), built with the input shape of its
first forward. No new model is built: the graph is traced from the live object, the loss
function wrappers removed meanwhile (the trace goes through the user's own functions), and the
random state, modes and buffers are left as they were. Skipped for a compiled model and for one
whose forward communicates with the other ranks.
"""

from __future__ import annotations

import contextlib
import io
import time

import torch

from netdoctor.findings import Finding
from netdoctor.loading.provenance import Provenance
from netdoctor.watcher.events import Part, StepStart
from netdoctor.watcher.losses import LossWatch
from netdoctor.watcher.models import WatchedModel
from netdoctor.watcher.registry import Registry
from netdoctor.watcher.services import Guard
from netdoctor.watcher.settings import WatchOptions


class StaticChecks(Part):
    """`results`: id(WatchedModel) -> (its static findings, notes), once checked."""

    def __init__(self, options: WatchOptions, registry: Registry, losses: LossWatch, guard: Guard):
        self.options = options
        self.registry = registry
        self.losses = losses
        self.guard = guard
        self.results: dict[int, tuple[list[Finding], list[str]]] = {}
        self.seconds = 0.0  # their time (inside the first steps)

    def of(self, wm: WatchedModel) -> tuple[list[Finding], list[str]] | None:
        return self.results.get(id(wm))

    def on_step_start(self, event: StepStart) -> None:
        for wm in self.registry.models:
            if event.optimizer in wm.optimizers and id(wm) not in self.results:
                self._check(wm)

    def _check(self, wm: WatchedModel) -> None:
        self.results[id(wm)] = ([], [])
        if not self.options.static or wm.compiled or wm.model is None:
            return
        if wm.communicates:
            self.results[id(wm)] = (
                [],
                [
                    f"{wm.facts.label}: static rules skipped: its forward "
                    "communicates with the other ranks (sharded DTensor "
                    "parameters or SyncBatchNorm)"
                ],
            )
            return
        t0 = time.perf_counter()
        self.losses.uninstall()  # the graph is traced through the user's own functions
        try:
            with self.guard.busy_scope():
                self.results[id(wm)] = static_findings(self.options, self.registry.provenance, wm)
        finally:
            self.losses.install()
            self.seconds += time.perf_counter() - t0


def static_findings(
    options: WatchOptions, provenance: Provenance, wm: WatchedModel
) -> tuple[list[Finding], list[str]]:
    """The static rules on one watched model (see the module docstring)."""
    from netdoctor.check import check_loaded
    from netdoctor.loading.target import LoadedModel

    model = wm.model
    if model is None:
        return [], []
    opts = options.check_options()
    opts.input_shape = wm.facts.input_shape
    opts.input_dtype = wm.facts.input_dtype or "float32"
    if opts.input_dtype not in ("float32", "float64", "float16", "bfloat16", "long"):
        opts.input_dtype = "float32"
    loaded = LoadedModel(
        target=wm.facts.label,
        model=model,
        provenance=provenance,
        class_location=wm.facts.site,
    )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    devices = [device] if device.type == "cuda" else []
    # torch.fx prints tracebacks of its own when shape propagation fails: not in the user's
    # training output
    with torch.random.fork_rng(devices=devices), contextlib.redirect_stderr(io.StringIO()):
        report = check_loaded(loaded, opts)
    notes = []
    findings = []
    for f in report.findings:
        if f.rule == "ND002":  # its forward works in the user's training: our input did not
            notes.append(
                f"{wm.facts.label}: static rules that need a forward pass were "
                f"skipped (it does not run on a synthetic input of shape "
                f"{wm.facts.input_shape})"
            )
            continue
        findings.append(f)
    notes.extend(f"{wm.facts.label}: {n}" for n in report.notes if "inferred" not in n)
    return findings, notes
