"""ND605 fp16-headroom: a module's output under float16 autocast comes within a small factor of
float16's largest value, 65504, or overflows to inf (doc: rules/ND605.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.record import FP16_MAX, ModuleHeadroom, TrainingRun
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.numbers import g
from netdoctor.rules.runtime._common import display, site
from netdoctor.rules.verification import Remedy, RemedyContext, SymptomSpec


@dataclass(frozen=True)
class Options(RuleOptions):
    factor: float = 8.0  # warn when max |output| > 65504 / factor (3 doublings of margin)
    max_modules: int = 3  # report at most this many modules (the tightest)


def _tight(run: TrainingRun, options: Options) -> list[ModuleHeadroom]:
    """The modules past the limit, tightest first. Of those that overflowed, only the producer:
    the module ND401's replay named, else the first in forward order (the modules after it
    only propagate its inf/NaN)."""
    limit = FP16_MAX / options.factor
    over = [h for h in run.headroom if h.overflowed]
    named = run.nonfinite.module if run.nonfinite is not None else None
    producer = [h for h in over if named is not None and h.module == named]
    tight = (producer or over[:1]) + [
        h for h in run.headroom if not h.overflowed and h.amax > limit
    ]
    return sorted(tight, key=lambda h: h.fp16_headroom)


def _expr(module: str) -> str:
    """How the model's forward reaches a submodule: "net.0" -> self.net[0]."""
    parts = [f"[{p}]" if p.isdigit() else f".{p}" for p in module.split(".") if p]
    return "self" + "".join(parts)


def _step(run: TrainingRun, measured: int | None) -> int | None:
    """The training step of the n-th measured forward (the watcher measures some steps, the
    probe every step the GradScaler did not skip)."""
    if measured is None or not run.measured_steps or measured > len(run.measured_steps):
        return measured
    return run.measured_steps[measured - 1]


def _snippet(module: str, fp16: bool) -> str:
    keep = (
        f"# keep {module or 'the module'} in float32 under autocast, where forward calls it:\n"
        f"with torch.autocast(x.device.type, enabled=False):\n"
        f"    h = {_expr(module)}(h.float())\n"
    )
    if not fp16:
        return keep
    return (
        keep + "# or train in bfloat16 (float32's range, no GradScaler needed):\n"
        "with torch.autocast(device_type, dtype=torch.bfloat16):\n"
        "    loss = loss_fn(model(x), y)\n"
    )


def check(ctx: RuntimeContext, options: Options) -> Iterator[Finding]:
    run = ctx.run
    if run.precision not in ("fp16", "bf16"):
        return
    tight = _tight(run, options)
    if not tight:
        return
    fp16 = run.precision == "fp16"
    for h in tight[: max(1, options.max_modules)]:
        where = display(h.module, run)
        others = [display(t.module, run) for t in tight if t is not h]
        if h.overflowed:
            step = _step(run, h.first_overflow)
            message = (
                f"{where}'s output overflowed float16 to inf"
                + (f" at step {step}" if step else "")
                + " under float16 autocast: it exceeds 65504, float16's largest value, so "
                "the loss is NaN and a GradScaler skips every step (lowering its scale does "
                "not help: the overflow is in the forward, not the gradients)."
            )
            severity = Severity.ERROR
        elif fp16:
            message = (
                f"{where}'s output reached {g(h.amax)} in magnitude under float16 autocast: "
                f"{g(h.fp16_headroom)}x below 65504, float16's largest value (the rule warns "
                f"within {g(options.factor)}x). Activations grow as training goes on and "
                "other batches reach further than the probe's; past 65504 the output is inf, "
                "the loss NaN, and a GradScaler skips every step."
            )
            severity = None
        else:
            message = (
                f"{where}'s output reached {g(h.amax)} in magnitude under bfloat16 autocast: "
                f"fine in bfloat16 (float32's range), but {g(h.fp16_headroom)}x below 65504, "
                "float16's largest value: do not move this model to float16 (fp16 training, or "
                "fp16 inference on hardware without bfloat16); it would overflow to inf there."
                if h.amax <= FP16_MAX
                else f"{where}'s output reached {g(h.amax)} in magnitude under bfloat16 "
                "autocast: fine in bfloat16 (float32's range), but beyond 65504, float16's "
                "largest value: moved to float16 (fp16 training or inference) it overflows to "
                "inf, as T5 checkpoints trained in bfloat16 do."
            )
            severity = Severity.INFO
        if others and h is tight[0]:
            message += f" Also close: {', '.join(others[:4])}."
        fix = Fix(
            f"keep {h.module or 'the model'} in float32 under autocast, train in bfloat16, or "
            "scale down what feeds it (normalize the inputs, a smaller init or gain)"
            if fp16
            else "stay in bfloat16 (or float32); to run in float16, keep "
            f"{h.module or 'this module'} in float32",
            _snippet(h.module, fp16),
        )
        yield RULE.finding(
            message,
            module=h.module,
            location=site(run, h.module),
            fix=fix,
            evidence={
                "max_abs": h.amax,
                "fp16_headroom": h.fp16_headroom,
                "factor": options.factor,
                "dtype": h.dtype,
                "precision": run.precision,
                "overflowed": h.overflowed,
                "first_overflow_step": _step(run, h.first_overflow),
                "modules": [t.module for t in tight],
            },
            impact=14.0 if h.overflowed else 8.0,
            severity=severity,
        )


def tightest(run: TrainingRun, options: Options) -> float | None:
    """The smallest headroom of any module to the largest value of the dtype it computed in
    (65504 for float16; a module kept in float32, or bfloat16, has float32's range)."""
    values = []
    for h in run.headroom:
        if h.overflowed:
            values.append(0.0)
        elif h.dtype == "float16" or run.precision == "fp16" and h.dtype != "float32":
            values.append(h.fp16_headroom)
    return min(values) if values else None


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """The flagged modules computing in float32 on a copy of the model (autocast off around
    them), the run otherwise in float16 as before."""
    if finding.evidence.get("precision") != "fp16":
        return None
    from netdoctor.probe.amp import keep_float32

    modules = [m for m in finding.evidence.get("modules") or [] if m]
    if not modules:
        return None
    return Remedy(
        "ND605",
        f"{', '.join(modules)} kept in float32 under autocast",
        "model",
        model_fn=keep_float32(modules),
    )


RULE = Rule(
    "ND605",
    "fp16-headroom",
    Severity.WARNING,
    Stage.RUNTIME,
    summary="a module's float16 output near or past 65504, float16's largest value",
    check=check,
    options=Options,
    # an overflow after the loss grew for a while follows from weights that grow (too large a
    # learning rate); one on the first steps is the module's own scale
    causes=("ND402", "ND406+"),
    symptoms=(
        SymptomSpec(
            "float16 headroom (tightest module)",
            "ratio",
            "higher",
            tightest,
            threshold=lambda o: o.factor,
        ),
    ),
    remedy=remedy,
    fixture=Fixture(
        "probe",
        (
            "fixtures/sick/fp16_overflow.py:SensorNet",
            "--data",
            "fixtures/sick/fp16_overflow.py:readings",
            "--precision",
            "fp16",
            "--steps",
            "60",
        ),
    ),
    healthy=Fixture(
        "probe",
        (
            "fixtures/healthy/mlp_normalized.py:MLP",
            "--data",
            "synthetic",
            "--precision",
            "fp16",
            "--steps",
            "100",
        ),
        name="healthy__mlp_normalized__MLP__fp16",
    ),
)
