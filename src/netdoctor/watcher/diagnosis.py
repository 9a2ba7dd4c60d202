"""From what the doctor's parts gathered to a Report: one `TrainingRun` per watched model for the
ND4xx rules (the same rules the probe runs), the loop facts for the ND5xx rules, the static
rules run once per model at its first step (`static`), root causes linked across all of them,
and the measurements the reporters draw. Also the live judgement's rules (`live_findings`): the
loop rules and ND401 on the facts so far, for the announcement and `stop_on` (`live`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

from netdoctor.curves import Curves, ScaleCurve, finite_or_none
from netdoctor.findings import Finding, Location, Report
from netdoctor.measure.curves import run_curves
from netdoctor.measure.facts import LoopFacts
from netdoctor.measure.record import TrainingRun
from netdoctor.rules.contexts import LoopContext, RuntimeContext
from netdoctor.rules.engine import judge, run_rules
from netdoctor.watcher.distributed import Distributed
from netdoctor.watcher.localize import Localization
from netdoctor.watcher.losses import LossWatch
from netdoctor.watcher.models import WatchedModel
from netdoctor.watcher.optimizers import PendingScalars, WatchedOptimizer
from netdoctor.watcher.registry import Registry
from netdoctor.watcher.schedule import Schedule
from netdoctor.watcher.services import Guard
from netdoctor.watcher.settings import LoopConfig, WatchOptions
from netdoctor.watcher.static import StaticChecks

# static rules about what a model returns (its output is the prediction): not for a part whose
# output feeds another watched model (an encoder ending in a ReLU feeds a head; a generator's
# tanh feeds its discriminator)
OUTPUT_RULES = ("ND105", "ND106")
_LOSS_NAMES = {
    "cross_entropy": "cross_entropy",
    "mse_loss": "mse",
    "binary_cross_entropy_with_logits": "bce",
}


@dataclass
class Gathered:
    """What the doctor's parts gathered: the report (and the live judgement) is built from
    these, read through their public attributes."""

    target: str | None
    options: WatchOptions
    facts: LoopFacts
    schedule: Schedule
    guard: Guard
    pending: PendingScalars
    losses: LossWatch
    registry: Registry
    static: StaticChecks
    localization: Localization
    distributed: Distributed

    def measure_seconds(self) -> float:
        """netdoctor's own time inside the training: its hooks (timed by the guard) and the
        activation measurements inside the user's forwards on deep steps (timed by each
        recorder), less the one-off static checks and the exchanges with other ranks."""
        models = self.registry.models
        recorded = sum(wm.recorder.seconds for wm in models if wm.recorder is not None)
        return max(
            0.0, self.guard.seconds + recorded - self.static.seconds - self.distributed.seconds
        )


def _loss_kind(wo: WatchedOptimizer) -> str:
    """The loss the optimizer's steps backwarded, when every step's was one known function."""
    fns: set[str | None] = set()
    for s in wo.loss_fns:
        fns |= s
    if len(fns) == 1:
        fn = next(iter(fns))
        if fn is not None:
            return _LOSS_NAMES.get(fn, fn)
    return "custom" if fns else "unknown"


def _feeds_owned(g: Gathered, wm: WatchedModel) -> bool:
    """Whether `wm` feeds another watched model that its own optimizer trains (a part)."""
    return any(
        other.owner is wm.owner
        for other in g.registry.models
        if other is not wm and other.facts.label in wm.facts.feeds
    )


def build_run(g: Gathered, wm: WatchedModel, light: bool = False) -> TrainingRun | None:
    """The shared training-run record of one watched model (None when no optimizer trains
    it, or none took a step and no NaN was localised: a GradScaler can skip every step).
    `light`: only what ND401 reads (live)."""
    wo = wm.owner
    model = wm.model
    if wo is None or model is None:
        return None
    if not wo.facts.steps and not (g.localization.events.keys() & {id(wm), 0}):
        return None
    f = wo.facts
    lrs = f.lr[0] if f.lr else wo.lrs()
    config = LoopConfig(
        optimizer=f.name,
        learning_rate=lrs[0] if lrs else math.nan,
        momentum=wo.hyper("momentum"),
        weight_decay=wo.hyper("weight_decay") or 0.0,
        loss=_loss_kind(wo),
        steps=f.steps,
        batch_size=None,
        param_groups=len(lrs),
        lrs=list(lrs),
        manual=f.manual,
    )
    device = next((str(p.device) for p in model.parameters()), "cpu")
    run = TrainingRun(config=config, device=device, target=wm.facts.label)
    run.steps_run = f.steps
    # the loss belongs to the model it is computed from: a part feeding another model of the
    # same optimizer (encoder -> head) leaves the loss rules to that one (judged once)
    run.loss = [] if _feeds_owned(g, wm) else list(f.loss)
    run.module_types = {n: type(m).__name__ for n, m in model.named_modules()}
    run.sites = dict(wm.sites)
    run.from_init = False
    nonfinite = g.localization.events
    event = nonfinite.get(id(wm))
    owned = [m for m in g.registry.models if m.owner is wo]
    loss_model = next((m for m in owned if not _feeds_owned(g, m)), owned[0])
    if event is None and wm is loss_model:
        event = nonfinite.get(0)
    run.nonfinite = event
    if event is not None:
        run.stopped = "non-finite"
    if light:
        return run
    run.accuracy = list(wo.accuracy)
    losses = g.losses
    if config.loss == "cross_entropy" and losses.classes:
        counts = losses.label_counts.get(losses.classes)
        run.classification = True
        run.num_outputs = losses.classes
        run.label_counts = [int(v) for v in counts.tolist()] if counts is not None else None
    run.measured_steps = list(wo.deep_steps)
    trained = {id(o) for o in wm.optimizers}
    run.competing_losses = any(
        id(o) not in trained and o.facts.steps for o in g.registry.optimizers
    )
    run.frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if wm.recorder is not None:
        run.activations = wm.recorder.finish()
        run.layer_order = list(wm.recorder.order)
        run.headroom, run.precision = wm.recorder.headroom(), wm.recorder.precision  # ND605
    order = {name: i for i, name in enumerate(run.layer_order)}
    traces = []
    for o in wm.optimizers:
        for owner, meter in o.meters:
            if owner is wm:
                traces.extend(meter.traces)
    run.params = sorted(traces, key=lambda t: order.get(t.module, len(order)))
    static = g.static.of(wm)
    run.prior_rules = {x.rule for x in static[0]} if static else set()
    return run


def _label(g: Gathered, findings: list[Finding], label: str) -> None:
    if len([m for m in g.registry.models if not m.compiled]) < 2:
        return
    for f in findings:
        f.evidence = dict(f.evidence or {})
        f.evidence.setdefault("model", label)
        if not f.message.startswith(f"{label}: "):
            f.message = f"{label}: {f.message}"


def live_findings(g: Gathered, rules: set[str]) -> list[Finding]:
    """`rules` (loop rules whose facts changed; ND401 once a NaN was localised) on the facts so
    far, less what an ignore comment suppresses. A draft: fixes are summaries only (patches are
    built for the report)."""
    settings = g.options.rule_settings()
    note_error = g.guard.note_error
    loop_rules = {r for r in rules if r.startswith(("ND5", "ND6"))}
    found = (
        run_rules(
            LoopContext(g.target or "training", g.facts, draft=True),
            settings.only(loop_rules),
            on_error=note_error,
        )
        if loop_rules
        else []
    )
    if g.localization.events and "ND401" in rules:
        for wm in g.registry.models:
            run = build_run(g, wm, light=True)
            if run is None or run.nonfinite is None:
                continue
            ctx = RuntimeContext(wm.facts.label, run, draft=True)
            nd401 = run_rules(ctx, settings.only({"ND401"}), on_error=note_error)
            _label(g, nd401, wm.facts.label)
            found.extend(nd401)
    live = Report(target=g.target or "training", command="run")
    judge(live, found, [wm.facts.site for wm in g.registry.models], _anchor(g))
    return live.findings


def _anchor(g: Gathered) -> Location | None:
    """Where a finding whose flagged line is library code points first: the user's line that
    built the model, when one model is watched."""
    models = g.registry.models
    return models[0].facts.site if len(models) == 1 else None


def diagnose(g: Gathered, *, closed: bool, stopped_by: Finding | None, wall: float) -> Report:
    """The report so far (final once the doctor is `closed`). `wall`: the seconds the training
    ran; `stopped_by`: the finding stop_on stopped at."""
    guard = g.guard
    guard.run(g.pending.resolve)
    target = g.target or "training"
    report = Report(target=target, command="run")
    settings = g.options.rule_settings()
    findings: list[Finding] = []
    runs: list[tuple[WatchedModel, TrainingRun]] = []
    for wm in g.registry.models:
        static, notes = g.static.of(wm) or ([], [])
        static = [_copy(f) for f in static if not (wm.facts.feeds and f.rule in OUTPUT_RULES)]
        report.notes.extend(notes)
        run = guard.run(partial(build_run, g, wm))
        group = list(static)
        if run is not None:
            ctx = RuntimeContext(wm.facts.label, run)
            group.extend(guard.run(partial(run_rules, ctx, settings, guard.note_error)) or [])
            runs.append((wm, run))
        _label(g, group, wm.facts.label)
        findings.extend(group)
    loop = LoopContext(target, g.facts)
    findings.extend(guard.run(lambda: run_rules(loop, settings, guard.note_error)) or [])
    judge(report, findings, [wm.facts.site for wm in g.registry.models], _anchor(g))
    report.measurements = measurements(g, runs)
    report.curves = guard.run(partial(curves, g, runs))
    report.notes.extend(_notes(g, runs, stopped_by, wall))
    dist = g.distributed
    if closed and dist.world_size > 1 and dist.exchange.rank == 0:
        from netdoctor.watcher.ranks import merge

        own = g.localization.first()
        guard.run(
            lambda: merge(
                report,
                dist.summaries,
                dist.missing,
                g.facts.distributed,
                own,
                g.options.dist_timeout,
            )
        )
    elif dist.world_size == 1 and _world_size_env() > 1:
        report.notes.append(
            f"WORLD_SIZE is {_world_size_env()} but the script initialised no "
            "torch.distributed process group: the ranks were not compared, and "
            "this report is rank 0's alone"
        )
    return report


def _world_size_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _copy(f: Finding) -> Finding:
    return replace(f, evidence=dict(f.evidence or {}))


def _notes(
    g: Gathered,
    runs: list[tuple[WatchedModel, TrainingRun]],
    stopped_by: Finding | None,
    wall: float,
) -> list[str]:
    notes = list(g.guard.notes)
    f = g.facts
    optimizers, models = g.registry.optimizers, g.registry.models
    if not optimizers:
        notes.append(
            "no optimizer step was seen: nothing was measured (is the training loop "
            "calling optimizer.step()?)"
        )
    elif not models:
        notes.append("no model was seen running forward with gradients enabled")
    for wo in optimizers:
        o = wo.facts
        trained = ", ".join(o.models) or "no watched model"
        lr = o.initial_lr
        estimated = " (estimated from the update)" if o.manual else ""
        notes.append(
            f"{o.label}: {o.steps} steps, lr {lr:g}{estimated} at step 1, trains {trained}"
            if lr is not None
            else f"{o.label}: {o.steps} steps, trains {trained}"
        )
        if o.manual:
            notes.append(
                f"no optimizer stepped: the weights of {trained} are updated by hand, and each "
                "backward followed by a change of the weights is a step (from the second update)"
            )
    if runs:
        deep = max(len(r.measured_steps) for _, r in runs)
        notes.append(
            f"deep measurements on {deep} step(s): {g.schedule.describe()} "
            "(--every sets the interval)"
        )
    for wm in models if optimizers else ():
        if wm.owner is None and not wm.compiled and not wm.facts.unoptimized:
            notes.append(f"{wm.facts.label} ran forward with gradients but no optimizer trains it")
    if wall > 0 and optimizers:
        hooks = g.measure_seconds()
        exchanged = (
            f", its exchanges with the other ranks {g.distributed.seconds:.2f} s "
            "(mostly waiting for the slowest rank)"
            if g.distributed.world_size > 1
            else ""
        )
        notes.append(
            f"netdoctor's measurements took {hooks:.2f} s of the {wall:.1f} s the "
            f"training ran ({100 * hooks / wall:.1f}%), its static checks "
            f"{g.static.seconds:.2f} s once{exchanged}"
        )
    if f.stopped == "stop-on" and stopped_by is not None:  # (ranks: see ranks.merge)
        s = stopped_by
        notes.append(
            f"training stopped at step {f.iterations} by stop-on "
            f"{g.options.stop_on}: {s.rule} {s.name}"
        )
    for message, count in g.guard.errors.items():
        times = f" ({count} times)" if count > 1 else ""
        notes.append(f"internal netdoctor error, measurements may be incomplete: {message}{times}")
    return notes


def measurements(g: Gathered, runs: list[tuple[WatchedModel, TrainingRun]]) -> dict[str, Any]:
    from netdoctor.measure.summary import gradient_flow

    out: dict[str, Any] = {}
    primary = g.registry.primary
    if primary is not None:
        out["loss_curve"] = list(primary.facts.loss)
        out["lr_curve"] = primary.facts.lr_curve()
        out["grad_norm_curve"] = list(primary.facts.grad_norm)
    if runs:
        out["gradient_flow"] = gradient_flow(runs[0][1])
    out["run"] = {
        "steps": g.facts.iterations,
        "stopped": g.facts.stopped,
        "schedule": {"every": g.schedule.every, "warm": g.schedule.warm},
        "optimizers": [
            {
                "label": o.label,
                "class": o.name,
                "steps": o.steps,
                "lr_first": o.initial_lr,
                "lr_last": max(o.lr[-1]) if o.lr and o.lr[-1] else None,
                "parameters": o.n_params,
                "trainable": o.n_trainable,
                "models": list(o.models),
                "location": o.site.to_dict() if o.site else None,
            }
            for o in g.facts.optimizers
        ],
        "models": [
            {
                "label": m.facts.label,
                "class": m.facts.class_name,
                "input_shape": list(m.facts.input_shape)
                if m.facts.input_shape is not None
                else None,
                "compiled": m.facts.compiled,
                "deep_steps": len(m.owner.deep_steps) if m.owner is not None else 0,
            }
            for m in g.registry.models
        ],
        "backward_calls": g.facts.backward_calls,
        "hook_seconds": round(g.measure_seconds(), 4),
        "static_seconds": round(g.static.seconds, 4),
        "exchange_seconds": round(g.distributed.seconds, 4),
    }
    for _, run in runs:
        if run.nonfinite is not None:
            out["non_finite"] = asdict(run.nonfinite)
            break
    return out


def curves(g: Gathered, runs: list[tuple[WatchedModel, TrainingRun]]) -> Curves:
    """The report's curves: the training step's loss, total gradient norm and learning rate
    per step (the primary optimizer's), the first watched model's layers and activations on
    the deep steps, and each GradScaler's scale."""
    out = run_curves(runs[0][1]) if runs else Curves()
    primary = g.registry.primary
    if primary is not None:
        f = primary.facts
        out.loss = finite_or_none(f.loss)
        out.grad_norm = finite_or_none(f.grad_norm)
        out.lr = finite_or_none(f.lr_curve())
    out.scalers = [
        ScaleCurve(s.label, finite_or_none(s.scale), list(s.skipped))
        for s in g.facts.scalers
        if s.scale
    ]
    return out
