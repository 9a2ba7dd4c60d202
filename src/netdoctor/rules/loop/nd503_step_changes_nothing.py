"""ND503 step-changes-nothing: optimizer.step() runs but no parameter changes (learning rate 0,
gradients missing or zero) (doc: rules/ND503.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import LoopContext


@dataclass(frozen=True)
class Options(RuleOptions):
    min_steps: int = 3  # steps that changed nothing before reporting
    min_share: float = 0.9  # ... and their share of the optimizer's steps


_WHY = {
    "lr-zero": "its learning rate is 0 in every param group",
    "no-grad": "none of its parameters has a gradient when it steps (backward never reached "
    "them, or zero_grad() ran between backward() and step())",
    "zero-grad": "every gradient it holds is exactly zero",
    "no-change": "the updates it computes do not change the weights (below their precision, "
    "or the optimizer does not apply them)",
}


def check(ctx: LoopContext, options: Options) -> Iterator[Finding]:
    loop = ctx.loop
    min_steps = options.min_steps
    min_share = options.min_share
    for o in loop.optimizers:
        n = len(o.unchanged_steps)
        judged = n + o.changed_steps
        if n < min_steps or not judged or n / judged < min_share or not o.n_trainable:
            continue
        reason = max(o.unchanged_reasons, key=o.unchanged_reasons.__getitem__)
        message = (
            f"{o.label}.step() ran {judged} times but no parameter changed in {n} of "
            f"them: {_WHY.get(reason, reason)}. The model does not train."
        )
        if reason == "lr-zero":
            fix = Fix(
                "give the optimizer (and its scheduler) a learning rate above 0",
                "optimizer = torch.optim.SGD(model.parameters(), lr=0.01)\n",
            )
            where = o.site or o.step_site
        elif reason == "no-grad":
            fix = Fix(
                "call zero_grad() before loss.backward(), not between backward() and step()",
                "optimizer.zero_grad()\nloss.backward()\noptimizer.step()\n",
            )
            where = o.step_site
        else:
            fix = Fix(
                "check what blocks the gradient (a detached loss, dead units) and the "
                "weights' dtype",
                None,
            )
            where = o.step_site
        yield RULE.finding(
            message,
            location=where,
            fix=fix,
            evidence={
                "optimizer": o.label,
                "unchanged_steps": n,
                "steps": judged,
                "reasons": dict(o.unchanged_reasons),
                "lr": o.initial_lr,
            },
            impact=14.0,
        )


RULE = Rule(
    "ND503",
    "step-changes-nothing",
    Severity.ERROR,
    Stage.LOOP,
    summary="optimizer.step() runs but no parameter changes (lr 0, gradients None/zero)",
    check=check,
    options=Options,
    fixture=Fixture("run", ("fixtures/loops/zero_grad_before_step.py",)),
    healthy=Fixture("run", ("fixtures/loops/accumulation.py",)),
)
