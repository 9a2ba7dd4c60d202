"""The probe's measurements as the report carries them (`Report.measurements`): gradient
flow, loss and accuracy curves, activations, the run's settings and timings; and its curves
(`Report.curves`)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from netdoctor.curves import Curves, ScaleCurve, finite_or_none
from netdoctor.measure.curves import run_curves
from netdoctor.measure.record import TrainingRun
from netdoctor.measure.summary import gradient_flow, mean
from netdoctor.probe.config import probe_config


def measurements(run: TrainingRun) -> dict[str, Any]:
    """What the JSON report carries (and the text report draws)."""
    config = probe_config(run)
    acts = []
    for a in run.activations:
        w = a.window_steps or run.window
        acts.append(
            {
                "name": a.name,
                "kind": a.kind,
                "module": a.module,
                "producer": a.producer,
                "functional": a.functional,
                "units": a.units or None,
                "dead_fraction": a.dead_fraction,
                "dead_units": a.dead_units,
                "zero_fraction": mean(a.zero_fraction[-w:]) if a.zero_fraction else None,
                "saturation": mean(a.saturation[-run.window :]) if a.saturation else None,
                "location": a.location.to_dict() if a.location else None,
            }
        )
    c = run.num_outputs
    out: dict[str, Any] = {
        "gradient_flow": gradient_flow(run) if run.steps_run else [],
        "loss_curve": list(run.loss),
        "accuracy_curve": list(run.accuracy),
        "activations": acts,
        "loss_at_init": run.loss[0] if run.loss else None,
        "chance": run.chance,  # accuracy of always predicting the most common class
        "expected_initial_loss": math.log(c)
        if c and c > 1 and run.classification and config.loss == "cross_entropy"
        else None,
        "probe": {
            "steps": run.steps_run,
            "steps_requested": config.requested_steps or config.steps,
            "batch_size": min(config.batch_size, config.batch_limit or config.batch_size),
            "optimizer": config.optimizer,
            "lr": config.learning_rate,
            "momentum": config.momentum if config.optimizer == "sgd" else None,
            "weight_decay": config.weight_decay,
            "loss": config.loss,
            "seed": config.seed,
            "device": run.device,
            "stopped": run.stopped,
            "timings_s": {k: round(v, 3) for k, v in run.timings.items()},
        },
    }
    if config.precision != "fp32":  # an fp32 report reads as it did before --precision
        out["probe"]["precision"] = config.precision
        out["probe"]["skipped_steps"] = list(run.skipped_steps)
        out["headroom"] = headroom_table(run)
    if run.train_eval is not None:
        out["train_eval"] = run.train_eval
    if run.overfit is not None:
        out["overfit"] = run.overfit
    if run.nonfinite is not None:
        out["non_finite"] = asdict(run.nonfinite)
    return out


def headroom_table(run: TrainingRun) -> list[dict[str, Any]]:
    """Every module's max |output| under autocast and its float16 headroom (65504 / it),
    tightest first."""
    rows = []
    for h in sorted(run.headroom, key=lambda h: h.fp16_headroom):
        site = run.site(h.module)
        rows.append(
            {
                "module": h.module,
                "module_type": run.module_types.get(h.module),
                "dtype": h.dtype,
                "max_abs": h.amax,
                "fp16_headroom": h.fp16_headroom,
                "overflowed": h.overflowed,
                "first_overflow_step": h.first_overflow,
                "steps": h.steps,
                "location": site.to_dict() if site else None,
            }
        )
    return rows


def probe_curves(run: TrainingRun) -> Curves:
    """The run's curves, with the probe's own learning rate per step (constant: the probe
    runs no scheduler) and its GradScaler's scale (fp16)."""
    curves = run_curves(run)
    curves.lr = finite_or_none([run.config.learning_rate] * run.steps_run)
    if run.scale:
        curves.scalers = [
            ScaleCurve("GradScaler", finite_or_none(run.scale), list(run.skipped_steps))
        ]
    return curves
