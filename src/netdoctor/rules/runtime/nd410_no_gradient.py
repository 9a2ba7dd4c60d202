"""ND410 no-gradient: a trainable parameter that receives no gradient in any step (doc:
rules/ND410.md)."""

from __future__ import annotations

from collections.abc import Iterator

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.record import TrainingRun
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.runtime._common import (
    display,
    site,
)
from netdoctor.rules.verification import SymptomSpec


def check(ctx: RuntimeContext, options: NoOptions) -> Iterator[Finding]:
    run = ctx.run
    if run.steps_run < 1:
        return
    starved: dict[str, list[str]] = {}
    for p in run.params:
        if p.steps_with_grad == 0:
            starved.setdefault(p.module, []).append(p.name)
    for module, names in starved.items():
        where = display(module, run)
        message = (
            f"{', '.join(names)} received no gradient (grad is None after backward) in "
            f"any of the {run.steps_run} steps: {where} is cut off from the loss "
            "(.detach(), .data, torch.no_grad() or .item()/.numpy() in forward, or its "
            "output is never used), so it never trains."
        )
        fix = Fix(
            f"make {module}'s output reach the loss through autograd: remove the "
            ".detach()/.data/no_grad on its path (or freeze it on purpose with "
            "requires_grad_(False))",
            "features = x.flatten(1)            # not x.flatten(1).detach()\n"
            f"# or, if {module} is meant to be frozen:\n"
            f"model.{module}.requires_grad_(False)\n"
            if module
            else None,
        )
        yield RULE.finding(
            message,
            module=module,
            location=site(run, module),
            fix=fix,
            evidence={"parameters": names, "steps": run.steps_run},
            impact=12.0,
        )


def params_without_gradient(run: TrainingRun, options: NoOptions) -> float | None:
    return float(sum(1 for p in run.params if p.steps_with_grad == 0))


RULE = Rule(
    "ND410",
    "no-gradient",
    Severity.ERROR,
    Stage.RUNTIME,
    summary="a trainable parameter receives no gradient after backward",
    check=check,
    options=NoOptions,
    causes=("ND503", "ND108", "ND103", "ND104"),
    symptoms=(
        SymptomSpec(
            "parameters without a gradient",
            "count",
            "lower",
            params_without_gradient,
            threshold=lambda o: 0,
        ),
    ),
    fixture=Fixture(
        "probe",
        ("fixtures/sick/detached.py:DetachedFeatures", "--data", "synthetic", "--steps", "100"),
    ),
    healthy=Fixture(
        "probe", ("fixtures/healthy/lenet_relu.py:LeNet", "--data", "synthetic", "--steps", "100")
    ),
)
