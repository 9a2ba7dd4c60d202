"""ND504 eval-mode-training: backward and step while Dropout/BatchNorm modules are in eval mode
(doc: rules/ND504.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import LoopContext
from netdoctor.rules.loop._common import names, where


@dataclass(frozen=True)
class Options(RuleOptions):
    min_steps: int = 3  # steps trained in eval mode before reporting


def check(ctx: LoopContext, options: Options) -> Iterator[Finding]:
    loop = ctx.loop
    min_steps = options.min_steps
    for o in loop.optimizers:
        n = len(o.eval_steps)
        if n < min_steps:
            continue
        modules = sorted(o.eval_modules)
        kinds = sorted(set(o.eval_modules.values()))
        eval_site = next(
            (
                m.eval_site
                for m in loop.models
                if m.label in o.eval_models and m.eval_site is not None
            ),
            None,
        )
        message = (
            f"{n} of the {o.steps} steps of {o.label} trained {names(o.eval_models)} "
            f"with {len(modules)} {'/'.join(kinds)} module(s) in eval mode "
            f"({names(modules)}), first at step {o.eval_steps[0]}: dropout is off and "
            "BatchNorm normalizes with its running statistics instead of the batch's, "
            "so the model trains differently from how it was designed."
        )
        if eval_site is not None:
            message += (
                f" It was put in eval mode at {where(eval_site)} (a validation pass?) "
                "and never back into train mode."
            )
        fix = Fix(
            "call model.train() before training again (at the start of every epoch, "
            "after validation)",
            "for epoch in range(epochs):\n    model.train()   # validation below switches "
            "to eval()\n    for x, y in train_loader:\n        ...\n    model.eval()\n"
            "    with torch.no_grad():\n        ...   # validation\n",
        )
        yield RULE.finding(
            message,
            location=eval_site or o.step_site,
            fix=fix,
            evidence={
                "optimizer": o.label,
                "eval_steps": n,
                "steps": o.steps,
                "first_step": o.eval_steps[0],
                "modules": modules[:20],
                "eval_line": where(eval_site) if eval_site else None,
            },
            impact=8.0,
        )


RULE = Rule(
    "ND504",
    "eval-mode-training",
    Severity.WARNING,
    Stage.LOOP,
    summary="backward and step while Dropout/BatchNorm modules are in eval mode",
    check=check,
    options=Options,
    fixture=Fixture("run", ("fixtures/loops/eval_mode.py",)),
    healthy=Fixture("run", ("fixtures/loops/validation.py",)),
)
