"""ND502 params-not-optimized: parameters that receive gradients but are in no optimizer, or an
optimizer whose parameters are all frozen (doc: rules/ND502.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import LoopContext
from netdoctor.rules.loop._common import names, where


@dataclass(frozen=True)
class Options(RuleOptions):
    min_steps: int = 2  # training steps before judging (every optimizer has stepped once)


def check(ctx: LoopContext, options: Options) -> Iterator[Finding]:
    loop = ctx.loop
    min_steps = options.min_steps
    if loop.iterations < min_steps and not loop.finished:
        return  # a second optimizer may not have stepped yet
    for m in loop.models:
        params = sorted(m.unoptimized)
        if not params:
            continue
        modules = list(dict.fromkeys(n.rpartition(".")[0] or "(the model itself)" for n in params))
        first_module = next((mod for mod in modules if mod in m.unoptimized_sites), None)
        location = m.unoptimized_sites.get(first_module) if first_module else None
        if location is None and m.optimized == 0:
            location = m.site  # the whole model: where it was built
        built = f" (built at {where(location)})" if location is not None else ""
        owners = [o for o in loop.optimizers if m.label in o.models]
        made = [f"{o.label} at {where(o.site)}" for o in owners if o.site is not None]
        if m.optimized == 0:
            message = (
                f"{m.label}'s parameters receive gradients, but no optimizer holds any of "
                f"them ({len(params)} parameter tensors): {m.label} never trains."
            )
        else:
            message = (
                f"{len(params)} trainable parameter(s) of {m.label} receive gradients but "
                f"are in no optimizer, so they never change: {names(params)}, in "
                f"{names(modules)}{built}. Typically the layer was built or replaced "
                "after the optimizer was created (the optimizer still holds the old "
                "layer's parameters), or a hand-built param group leaves it out."
            )
        if made:
            message += f" The optimizer was built at {', '.join(made)}."
        fix = Fix(
            "build the optimizer after the model is complete (after replacing layers), or "
            "add the missing parameters to it",
            "model.fc = nn.Linear(512, 10)   # change the model first ...\n"
            "optimizer = torch.optim.SGD(model.parameters(), lr=0.01)  # ... then build "
            'the optimizer\n# or: optimizer.add_param_group({"params": '
            "model.fc.parameters()})\n",
        )
        yield RULE.finding(
            message,
            module=first_module if first_module else None,
            location=location,
            fix=fix,
            evidence={
                "model": m.label,
                "parameters": params[:50],
                "modules": modules[:20],
                "optimized": m.optimized,
                "checks": m.grad_checks,
            },
            impact=13.0,
        )
    for o in loop.optimizers:
        if o.steps and o.n_params and o.n_trainable == 0:
            site = o.site or o.step_site
            message = (
                f"{o.label} holds {o.n_params} parameter tensors and every one is frozen "
                "(requires_grad=False): its steps change nothing. The parameters meant to "
                "train are not in it."
            )
            fix = Fix(
                "give the optimizer the trainable parameters",
                "optimizer = torch.optim.SGD(\n    (p for p in model.parameters() if "
                "p.requires_grad), lr=0.01)\n",
            )
            yield RULE.finding(
                message,
                location=site,
                fix=fix,
                evidence={"optimizer": o.label, "parameters": o.n_params, "trainable": 0},
                impact=13.0,
            )


RULE = Rule(
    "ND502",
    "params-not-optimized",
    Severity.ERROR,
    Stage.LOOP,
    summary="parameters that receive gradients but are in no optimizer (or all frozen)",
    check=check,
    options=Options,
    fixture=Fixture("run", ("fixtures/loops/replaced_layer.py",)),
    healthy=Fixture("run", ("fixtures/loops/frozen_backbone.py",)),
)
