"""ND501 grads-not-cleared: gradients accumulate across optimizer steps because no zero_grad()
runs between them (doc: rules/ND501.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Location, Severity
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import LoopContext
from netdoctor.rules.loop._common import line_fix, user_file, where


@dataclass(frozen=True)
class Options(RuleOptions):
    min_steps: int = 2  # steps that re-used a stale gradient before reporting
    min_share: float = 0.25  # ... and their share of the optimizer's steps after its first


def check(ctx: LoopContext, options: Options) -> Iterator[Finding]:
    loop = ctx.loop
    min_steps = options.min_steps
    min_share = options.min_share
    for o in loop.optimizers:
        n = len(o.stale_steps)
        judged = max(1, o.steps - 1)  # the first step has no previous one to re-use
        if n < min_steps or n / judged < min_share:
            continue
        steps = (
            "the weight updates the loop makes by hand (no optimizer)"
            if o.manual
            else "optimizer steps"
        )
        message = (
            f"gradients are never cleared between {steps}: {n} of the {judged} "
            f"steps of {o.label} after its first (from step {o.stale_steps[0]} on) "
            "consumed a gradient that still held everything the previous step had "
            "already used, because no zero_grad() ran in between. Every update then adds "
            "up all earlier gradients, so the effective step grows with training and the "
            "loss oscillates or diverges. (Accumulating over k backward passes and "
            "clearing after each step is fine.)"
        )
        fix = (
            _closure_fix(o.step_site, o.stale_backward_site, ctx.draft)
            if o.closure
            else _manual_fix(o.step_site, o.model_name, ctx.draft)
            if o.manual
            else _zero_grad_fix(o.step_site, ctx.draft)
        )
        yield RULE.finding(
            message,
            location=o.step_site,
            fix=fix,
            evidence={
                "optimizer": o.label,
                "stale_steps": n,
                "steps": o.steps,
                "share": n / judged,
                "first_step": o.stale_steps[0],
                "backward_line": where(o.stale_backward_site) if o.stale_backward_site else None,
            },
            impact=14.0,
        )


def _zero_grad_fix(step_site: Location | None, draft: bool) -> Fix:
    from netdoctor.fixes.patch import diff_fix, insert_statement_after, method_receiver

    summary = "clear the gradients after every optimizer step (or before each backward)"
    snippet = (
        "optimizer.step()\noptimizer.zero_grad()   # the gradient was consumed: start "
        "the next one from zero\n"
    )
    if draft or step_site is None or step_site.line is None or not user_file(step_site):
        return Fix(summary, snippet)
    line = step_site.line

    def edit(src: str) -> str | None:
        receiver = method_receiver(src, line, "step")
        if receiver is None:
            return None
        return insert_statement_after(src, line, f"{receiver}.zero_grad()")

    return diff_fix(summary, step_site.path, edit, snippet)


def _closure_fix(step_site: Location | None, backward_site: Location | None, draft: bool) -> Fix:
    """A closure optimizer (LBFGS) evaluates the closure many times per step: the gradients
    must be cleared inside it, before its backward, or each evaluation adds to the last."""
    from netdoctor.fixes.patch import insert_statement_before, method_receiver, read

    summary = "clear the gradients inside the closure, before its backward"
    snippet = (
        "def closure():\n    optimizer.zero_grad()   # each evaluation starts from zero\n"
        "    loss = loss_fn(model(x), y)\n    loss.backward()\n    return loss\n"
    )
    receiver = None
    if step_site is not None and step_site.line:
        receiver = method_receiver(read(step_site.path) or "", step_site.line, "step")
    statement = f"{receiver or 'optimizer'}.zero_grad()"
    return line_fix(
        summary,
        snippet,
        backward_site,
        draft,
        lambda src, line: insert_statement_before(src, line, statement),
    )


def _manual_fix(backward_site: Location | None, model_name: str | None, draft: bool) -> Fix:
    """A manual update has no optimizer to clear the gradients: the model does, before each
    backward (a manual step begins at its backward: `step_site` is the backward's line)."""
    from netdoctor.fixes.patch import insert_statement_before

    model = model_name or "model"
    summary = f"clear the gradients before each backward: {model}.zero_grad()"
    snippet = (
        f"{model}.zero_grad()   # the last update consumed the gradient: start from zero\n"
        "loss.backward()\n"
    )
    return line_fix(
        summary,
        snippet,
        backward_site,
        draft or model_name is None,
        lambda src, line: insert_statement_before(src, line, f"{model}.zero_grad()"),
    )


RULE = Rule(
    "ND501",
    "grads-not-cleared",
    Severity.ERROR,
    Stage.LOOP,
    summary="gradients accumulate across optimizer steps: no zero_grad() between them",
    check=check,
    options=Options,
    fixture=Fixture("run", ("fixtures/loops/no_zero_grad.py",)),
    healthy=Fixture("run", ("fixtures/loops/plain.py",)),
)
