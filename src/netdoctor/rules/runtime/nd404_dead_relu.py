"""ND404 dead-relu: a large share of a ReLU layer's units never fire (doc: rules/ND404.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.record import TrainingRun
from netdoctor.measure.summary import mean
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.numbers import g, pct
from netdoctor.rules.runtime._common import display, lower_lr, lr_snippet, site
from netdoctor.rules.verification import SymptomSpec


@dataclass(frozen=True)
class Options(RuleOptions):
    dead_fraction: float = 0.5  # report a layer when more than this share never fired
    error_fraction: float = 0.95  # ... as an error at or above this share
    min_units: int = 4  # ignore layers with fewer units


def check(ctx: RuntimeContext, options: Options) -> Iterator[Finding]:
    run = ctx.run
    for a in run.activations:
        if a.kind != "relu" or a.dead_fraction is None or a.units < options.min_units:
            continue
        frac = a.dead_fraction
        if frac <= options.dead_fraction:
            continue
        w = a.window_steps
        zeros = mean(a.zero_fraction[-w:]) if w else None
        if a.functional:
            what = (
                f"{a.name} (a functional relu on the output of {display(a.producer, run)})"
                if a.producer
                else f"{a.name}"
            )
        else:
            what = f"the ReLU {a.name}" + (
                f" (after {display(a.producer, run)})" if a.producer else ""
            )
        message = (
            f"{a.dead_units} of the {a.units} units of {what} "
            f"({pct(frac)}) never fired on any sample of the last {w} steps"
            + (f"; {pct(zeros)} of its outputs are zero" if zeros is not None else "")
            + ". Dead units pass no gradient, so they never recover and the layer "
            "before them stops learning."
        )
        fix = Fix(
            f"lower the learning rate ({g(run.config.learning_rate)} -> "
            f"{g(run.config.learning_rate / 10)}), normalize the inputs, or use He "
            "initialisation / LeakyReLU",
            lr_snippet(run, 0.1) + "# or: nn.init.kaiming_normal_(layer.weight, "
            "nonlinearity='relu'); nn.LeakyReLU(0.01)\n",
        )
        module = a.module if not a.functional else a.producer
        yield RULE.finding(
            message,
            module=module or a.name,
            location=a.location if a.location else site(run, module),
            fix=fix,
            evidence={
                "site": a.name,
                "units": a.units,
                "dead_units": a.dead_units,
                "dead_fraction": frac,
                "zero_fraction": zeros,
                "window_steps": w,
                "producer": a.producer,
                "functional": a.functional,
            },
            impact=6.0 + frac,
            severity=Severity.ERROR if frac >= options.error_fraction else None,
        )


def dead_fraction(run: TrainingRun, options: Options) -> float | None:
    """The largest share of never-active units in any ReLU layer (0 when there is none)."""
    values = [
        a.dead_fraction
        for a in run.activations
        if a.kind == "relu" and a.dead_fraction is not None and a.units >= options.min_units
    ]
    return max(values, default=0.0)


RULE = Rule(
    "ND404",
    "dead-relu",
    Severity.WARNING,
    Stage.RUNTIME,
    summary="a large share of a ReLU layer's units never active",
    check=check,
    options=Options,
    causes=("ND302", "ND301", "ND202", "ND201", "ND406+", "ND402", "ND401", "ND204", "ND101"),
    symptoms=(
        SymptomSpec(
            "dead ReLU units (worst layer)",
            "fraction",
            "lower",
            dead_fraction,
            threshold=lambda o: o.dead_fraction,
        ),
    ),
    remedy=lower_lr,
    fixture=Fixture(
        "probe",
        ("fixtures/sick/zero_init.py:ZeroHiddenMLP", "--data", "synthetic", "--steps", "100"),
    ),
    healthy=Fixture(
        "probe", ("fixtures/healthy/mlp_normalized.py:MLP", "--data", "synthetic", "--steps", "100")
    ),
)
