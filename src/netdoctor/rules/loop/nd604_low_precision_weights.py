"""ND604 low-precision-weights: the optimizer updates float16/bfloat16 weights in place, so small
updates round away (or, in float16, Adam's eps is 0) (doc: rules/ND604.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.facts import PrecisionFacts
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import LoopContext

# float16's smallest positive (subnormal) value: an eps below half of it rounds to 0
FP16_TINY = 2.0**-24


@dataclass(frozen=True)
class Options(RuleOptions):
    max_unchanged: float = 0.5  # share of elements with a gradient that the update left as is
    min_elements: int = 1000  # elements with a gradient measured before judging the share


def check(ctx: LoopContext, options: Options) -> Iterator[Finding]:
    for p in ctx.loop.precision:
        eps_zero = p.dtype == "float16" and p.eps is not None and p.eps < FP16_TINY / 2
        share = p.unchanged_share
        frozen = (
            share is not None
            and p.with_grad >= options.min_elements
            and share > options.max_unchanged
        )
        if not (eps_zero or frozen):
            continue
        yield _finding(p, eps_zero, frozen, options)


def _finding(p: PrecisionFacts, eps_zero: bool, frozen: bool, options: Options) -> Finding:
    weights = f"{p.low_params} of {p.optimizer}'s {p.params} trainable parameters are {p.dtype}"
    parts = [f"{weights}: the optimizer updates them in place, in {p.dtype}"]
    if frozen and p.unchanged_share is not None:
        ulp = "1/256" if p.dtype == "bfloat16" else "1/2048"
        parts.append(
            f"{p.unchanged_share:.0%} of the weight elements that had a nonzero gradient were "
            f"left unchanged by the update ({p.unchanged:,} of {p.with_grad:,} over "
            f"{p.measured_steps} measured steps; threshold {options.max_unchanged:.0%}): an "
            f"update below about {ulp} of a weight rounds away, so most weights stop learning"
        )
    if eps_zero and p.eps is not None:
        parts.append(
            f"Adam's eps={p.eps:g} is below float16's smallest value ({FP16_TINY:.2g}) and "
            "rounds to 0: a parameter whose second-moment estimate underflows divides by 0 "
            "(NaN within a few steps)"
        )
    message = "; ".join(parts) + "."
    fix = Fix(
        "keep the weights (and the optimizer's state) in float32 and run the forward under "
        "autocast instead of casting the model",
        "model = model.float()   # not .half() / .to(torch.bfloat16)\n"
        "with torch.autocast(device_type, dtype=torch.bfloat16):\n"
        "    loss = loss_fn(model(x), y)\n"
        "loss.backward()\noptimizer.step()\n"
        "# float16: add a GradScaler (scaler.scale(loss).backward(); scaler.step(optimizer); "
        "scaler.update())\n",
    )
    return RULE.finding(
        message,
        location=p.site,
        fix=fix,
        evidence={
            "optimizer": p.optimizer,
            "dtype": p.dtype,
            "low_precision_params": p.low_params,
            "params": p.params,
            "unchanged_share": p.unchanged_share,
            "with_grad": p.with_grad,
            "measured_steps": p.measured_steps,
            "eps": p.eps,
        },
        impact=14.0 if eps_zero else 10.0,
        severity=Severity.ERROR if eps_zero else None,
    )


RULE = Rule(
    "ND604",
    "low-precision-weights",
    Severity.WARNING,
    Stage.LOOP,
    summary="float16/bfloat16 weights updated in place: updates round away (fp16: eps is 0)",
    check=check,
    options=Options,
    fixture=Fixture("run", ("fixtures/loops/amp_bf16_weights.py",)),
    healthy=Fixture("run", ("fixtures/loops/mixed_precision.py",)),
)
