"""ND405 saturated-activations: most sigmoid/tanh outputs deep in saturation, where no gradient
passes (doc: rules/ND405.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.record import TrainingRun
from netdoctor.measure.summary import (
    mean,
)
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.numbers import pct
from netdoctor.rules.runtime._common import (
    site,
)
from netdoctor.rules.verification import SymptomSpec


@dataclass(frozen=True)
class Options(RuleOptions):
    saturated_fraction: float = 0.5


def check(ctx: RuntimeContext, options: Options) -> Iterator[Finding]:
    run = ctx.run
    limit = options.saturated_fraction
    for a in run.activations:
        if a.kind not in ("sigmoid", "tanh") or not a.saturation or a.is_output:
            continue  # (a saturated output is a confident prediction, not a blocked unit)
        w = run.window
        sat = mean(a.saturation[-w:])
        if sat is None or sat <= limit:
            continue
        bound = "outputs within 0.01 of 0 or 1" if a.kind == "sigmoid" else "|output| > 0.99"
        message = (
            f"{pct(sat)} of {a.name}'s {a.kind} outputs are saturated ({bound}) over the "
            f"last {w} steps (threshold {pct(limit)}): their derivative is ~0, so almost "
            "no gradient passes."
        )
        fix = Fix(
            "normalize the inputs of the activation (BatchNorm before it, or scaled inputs)"
            ", or use ReLU",
            "nn.BatchNorm1d(features),  # before the activation\n",
        )
        module = a.module if not a.functional else a.producer
        yield RULE.finding(
            message,
            module=module or a.name,
            location=a.location if a.location else site(run, module),
            fix=fix,
            evidence={"site": a.name, "kind": a.kind, "saturated_fraction": sat, "window_steps": w},
            impact=4.0 + sat,
        )


def saturation(run: TrainingRun, options: Options) -> float | None:
    """The largest share of saturated sigmoid/tanh outputs over the last steps (0: none left)."""
    w = run.window
    values = [
        mean(a.saturation[-w:])
        for a in run.activations
        if a.kind in ("sigmoid", "tanh") and a.saturation and not a.is_output
    ]
    return max((v for v in values if v is not None), default=0.0)


RULE = Rule(
    "ND405",
    "saturated-activations",
    Severity.WARNING,
    Stage.RUNTIME,
    summary="most sigmoid/tanh pre-activations deep in saturation",
    check=check,
    options=Options,
    causes=("ND302", "ND301", "ND201", "ND102"),
    symptoms=(
        SymptomSpec(
            "saturated sigmoid/tanh outputs (worst layer)",
            "fraction",
            "lower",
            saturation,
            threshold=lambda o: o.saturated_fraction,
        ),
    ),
    fixture=Fixture(
        "probe",
        (
            "fixtures/sick/saturated_tanh.py:SaturatedTanh",
            "--data",
            "synthetic",
            "--optimizer",
            "adam",
            "--steps",
            "30",
        ),
    ),
    healthy=Fixture(
        "probe", ("fixtures/healthy/mlp_normalized.py:MLP", "--data", "synthetic", "--steps", "100")
    ),
)
