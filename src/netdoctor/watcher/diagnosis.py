"""From what the doctor gathered to a Report: one `TrainingRun` per watched model for the ND4xx
rules (the same rules the probe runs), the loop facts for the ND5xx rules, the static rules run
once per model at its first step, root causes linked across all of them, and the measurements
the reporters draw. Also the live judgement (`live_findings`): the loop rules and ND401 on the
facts so far, for the announcement and `stop_on`.
"""

from __future__ import annotations

import math
from typing import Any

from netdoctor.findings import Finding, Report
from netdoctor.measure.record import TrainingRun
from netdoctor.rules.contexts import LoopContext, RuntimeContext
from netdoctor.rules.engine import judge, run_rules
from netdoctor.watcher.settings import LoopConfig

# static rules about what a model returns (its output is the prediction): not for a part whose
# output feeds another watched model (an encoder ending in a ReLU feeds a head; a generator's
# tanh feeds its discriminator)
OUTPUT_RULES = ("ND105", "ND106")
_LOSS_NAMES = {
    "cross_entropy": "cross_entropy",
    "mse_loss": "mse",
    "binary_cross_entropy_with_logits": "bce",
}


def static_findings(doctor, wm) -> tuple[list[Finding], list[str]]:
    """The static rules on one watched model, built with the input shape of its first forward
    (no new model is built: the graph is traced from the live object; the random state, modes
    and buffers are left as they were)."""
    import torch

    from netdoctor.check import check_loaded
    from netdoctor.loading.target import LoadedModel

    model = wm.model
    opts = doctor.options.check_options()
    opts.input_shape = wm.facts.input_shape
    opts.input_dtype = wm.facts.input_dtype or "float32"
    if opts.input_dtype not in ("float32", "float64", "float16", "bfloat16", "long"):
        opts.input_dtype = "float32"
    loaded = LoadedModel(
        target=wm.facts.label,
        model=model,
        provenance=doctor.provenance,
        class_location=wm.facts.site,
    )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    devices = [device] if device.type == "cuda" else []
    import contextlib
    import io

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


def _loss_kind(wo) -> str:
    """The loss the optimizer's steps backwarded, when every step's was one known function."""
    fns = set()
    for s in wo.loss_fns:
        fns |= s
    if len(fns) == 1:
        fn = next(iter(fns))
        if fn is not None:
            return _LOSS_NAMES.get(fn, fn)
    return "custom" if fns else "unknown"


def _feeds_owned(doctor, wm) -> bool:
    """Whether `wm` feeds another watched model that its own optimizer trains (a part)."""
    return any(
        other.owner is wm.owner
        for other in doctor.models
        if other is not wm and other.facts.label in wm.facts.feeds
    )


def build_run(doctor, wm, light: bool = False) -> TrainingRun | None:
    """The shared training-run record of one watched model (None when no optimizer trains
    it). `light`: only what ND401 reads (live)."""
    wo = wm.owner
    model = wm.model
    if wo is None or model is None or not wo.facts.steps:
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
    )
    device = next((str(p.device) for p in model.parameters()), "cpu")
    run = TrainingRun(config=config, device=device, target=wm.facts.label)
    run.steps_run = f.steps
    # the loss belongs to the model it is computed from: a part feeding another model of the
    # same optimizer (encoder -> head) leaves the loss rules to that one (judged once)
    run.loss = [] if _feeds_owned(doctor, wm) else list(f.loss)
    run.module_types = {n: type(m).__name__ for n, m in model.named_modules()}
    run.sites = dict(wm.sites)
    run.from_init = False
    event = doctor.nonfinite.get(id(wm))
    owned = [m for m in doctor.models if m.owner is wo]
    loss_model = next((m for m in owned if not _feeds_owned(doctor, m)), owned[0])
    if event is None and wm is loss_model:
        event = doctor.nonfinite.get(0)
    run.nonfinite = event
    if event is not None:
        run.stopped = "non-finite"
    if light:
        return run
    run.accuracy = list(wo.accuracy)
    if config.loss == "cross_entropy" and doctor.losses.classes:
        counts = doctor.losses.label_counts.get(doctor.losses.classes)
        run.classification = True
        run.num_outputs = doctor.losses.classes
        run.label_counts = [int(v) for v in counts.tolist()] if counts is not None else None
    run.measured_steps = list(wo.deep_steps)
    trained = {id(o) for o in wm.optimizers}
    run.competing_losses = any(id(o) not in trained and o.facts.steps for o in doctor.optimizers)
    run.frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if wm.recorder is not None:
        run.activations = wm.recorder.finish()
        run.layer_order = list(wm.recorder.order)
    order = {name: i for i, name in enumerate(run.layer_order)}
    traces = []
    for o in wm.optimizers:
        for owner, meter in o.meters:
            if owner is wm:
                traces.extend(meter.traces)
    run.params = sorted(traces, key=lambda t: order.get(t.module, len(order)))
    static = doctor.static.get(id(wm))
    run.prior_rules = {x.rule for x in static[0]} if static else set()
    return run


def _label(doctor, findings: list[Finding], label: str) -> None:
    if len([m for m in doctor.models if not m.compiled]) < 2:
        return
    for f in findings:
        f.evidence = dict(f.evidence or {})
        f.evidence.setdefault("model", label)
        if not f.message.startswith(f"{label}: "):
            f.message = f"{label}: {f.message}"


def live_findings(doctor, rules: set[str]) -> list[Finding]:
    """`rules` (loop rules whose facts changed; ND401 once a NaN was localised) on the facts so
    far, less what an ignore comment suppresses. A draft: fixes are summaries only (patches are
    built for the report)."""
    settings = doctor.options.rule_settings()
    loop_rules = {r for r in rules if r.startswith("ND5")}
    found = (
        run_rules(
            LoopContext(doctor.target or "training", doctor.facts, draft=True),
            settings.only(loop_rules),
            on_error=doctor.note_error,
        )
        if loop_rules
        else []
    )
    if doctor.nonfinite and "ND401" in rules:
        for wm in doctor.models:
            run = build_run(doctor, wm, light=True)
            if run is None or run.nonfinite is None:
                continue
            ctx = RuntimeContext(wm.facts.label, run, draft=True)
            nd401 = run_rules(ctx, settings.only({"ND401"}), on_error=doctor.note_error)
            _label(doctor, nd401, wm.facts.label)
            found.extend(nd401)
    live = Report(target=doctor.target or "training", command="run")
    judge(live, found, [wm.facts.site for wm in doctor.models])
    return live.findings


def diagnose(doctor) -> Report:
    doctor._guard(doctor.pending.resolve)
    target = doctor.target or "training"
    report = Report(target=target, command="run")
    settings = doctor.options.rule_settings()
    findings: list[Finding] = []
    runs: list[tuple[Any, TrainingRun]] = []
    for wm in doctor.models:
        static, notes = doctor.static.get(id(wm), ([], []))
        static = [_copy(f) for f in static if not (wm.facts.feeds and f.rule in OUTPUT_RULES)]
        report.notes.extend(notes)
        run = doctor._guard(lambda wm=wm: build_run(doctor, wm))
        group = list(static)
        if run is not None:
            ctx = RuntimeContext(wm.facts.label, run)
            group.extend(
                doctor._guard(lambda ctx=ctx: run_rules(ctx, settings, doctor.note_error)) or []
            )
            runs.append((wm, run))
        _label(doctor, group, wm.facts.label)
        findings.extend(group)
    loop = LoopContext(target, doctor.facts)
    findings.extend(doctor._guard(lambda: run_rules(loop, settings, doctor.note_error)) or [])
    judge(report, findings, [wm.facts.site for wm in doctor.models])
    report.measurements = measurements(doctor, runs)
    report.notes.extend(_notes(doctor, runs))
    if doctor.closed and doctor.exchange.world_size > 1 and doctor.exchange.rank == 0:
        from netdoctor.watcher.ranks import merge

        own = (
            (doctor.nonfinite_step, doctor.nonfinite_code)
            if doctor.nonfinite_step is not None
            else None
        )
        doctor._guard(
            lambda: merge(
                report,
                doctor.rank_summaries,
                doctor.ranks_missing,
                doctor.facts.distributed,
                own,
                doctor.options.dist_timeout,
            )
        )
    elif doctor.exchange.world_size == 1 and _world_size_env() > 1:
        report.notes.append(
            f"WORLD_SIZE is {_world_size_env()} but the script initialised no "
            "torch.distributed process group: the ranks were not compared, and "
            "this report is rank 0's alone"
        )
    return report


def _world_size_env() -> int:
    import os

    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _copy(f: Finding) -> Finding:
    from dataclasses import replace

    return replace(f, evidence=dict(f.evidence or {}))


def _notes(doctor, runs) -> list[str]:
    notes = list(doctor.notes)
    f = doctor.facts
    if not doctor.optimizers:
        notes.append(
            "no optimizer step was seen: nothing was measured (is the training loop "
            "calling optimizer.step()?)"
        )
    elif not doctor.models:
        notes.append("no model was seen running forward with gradients enabled")
    for wo in doctor.optimizers:
        o = wo.facts
        trained = ", ".join(o.models) or "no watched model"
        lr = o.initial_lr
        notes.append(
            f"{o.label}: {o.steps} steps, lr {lr:g} at step 1, trains {trained}"
            if lr is not None
            else f"{o.label}: {o.steps} steps, trains {trained}"
        )
    if runs:
        deep = max(len(r.measured_steps) for _, r in runs)
        notes.append(
            f"deep measurements on {deep} step(s): {doctor.schedule.describe()} "
            "(--every sets the interval)"
        )
    for wm in doctor.models if doctor.optimizers else ():
        if wm.owner is None and not wm.compiled and not wm.facts.unoptimized:
            notes.append(f"{wm.facts.label} ran forward with gradients but no optimizer trains it")
    wall = (doctor.ended or __import__("time").perf_counter()) - doctor.started
    if wall > 0 and doctor.optimizers:
        hooks = doctor.measure_seconds
        exchanged = (
            f", its exchanges with the other ranks {doctor.exchange_seconds:.2f} s "
            "(mostly waiting for the slowest rank)"
            if doctor.exchange.world_size > 1
            else ""
        )
        notes.append(
            f"netdoctor's measurements took {hooks:.2f} s of the {wall:.1f} s the "
            f"training ran ({100 * hooks / wall:.1f}%), its static checks "
            f"{doctor.static_seconds:.2f} s once{exchanged}"
        )
    if f.stopped == "stop-on" and doctor.stopped_by is not None:  # (ranks: see ranks.merge)
        s = doctor.stopped_by
        notes.append(
            f"training stopped at step {f.iterations} by stop-on "
            f"{doctor.options.stop_on}: {s.rule} {s.name}"
        )
    for message, count in doctor.errors.items():
        times = f" ({count} times)" if count > 1 else ""
        notes.append(f"internal netdoctor error, measurements may be incomplete: {message}{times}")
    return notes


def measurements(doctor, runs) -> dict[str, Any]:
    from dataclasses import asdict

    from netdoctor.measure.summary import gradient_flow

    out: dict[str, Any] = {}
    primary = doctor.primary
    if primary is not None:
        out["loss_curve"] = list(primary.facts.loss)
        out["lr_curve"] = primary.facts.lr_curve()
        out["grad_norm_curve"] = list(primary.facts.grad_norm)
    if runs:
        out["gradient_flow"] = gradient_flow(runs[0][1])
    out["run"] = {
        "steps": doctor.facts.iterations,
        "stopped": doctor.facts.stopped,
        "schedule": {"every": doctor.schedule.every, "warm": doctor.schedule.warm},
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
            for o in doctor.facts.optimizers
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
            for m in doctor.models
        ],
        "backward_calls": doctor.facts.backward_calls,
        "hook_seconds": round(doctor.measure_seconds, 4),
        "static_seconds": round(doctor.static_seconds, 4),
        "exchange_seconds": round(doctor.exchange_seconds, 4),
    }
    for _, run in runs:
        if run.nonfinite is not None:
            out["non_finite"] = asdict(run.nonfinite)
            break
    return out
