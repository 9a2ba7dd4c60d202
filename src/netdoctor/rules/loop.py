"""ND5xx: the training loop itself (ctx.loop is a netdoctor.watcher.facts.LoopFacts, filled by
the watcher inside the user's own training: `netdoctor run`, `netdoctor.watch`, callbacks).

These bugs live in the loop, not in the model: gradients never cleared, parameters no optimizer
holds, steps that change nothing, training in eval mode, a scheduler that kills the learning
rate early, a loss fed the wrong kind of input or shapes that broadcast. Each rule judges facts
gathered step by step; the same functions run live (to announce a finding the moment it is
confirmed, and for --stop-on) and at the end. Thresholds are options, documented in
rules/ND5xx.md.
"""

from __future__ import annotations

import math
import os

from netdoctor.findings import Fix, Location
from netdoctor.rules.registry import Context, rule
from netdoctor.rules.runtime import g, pct

_LIBRARY = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


def _user_file(loc: Location | None) -> bool:
    return loc is not None and loc.path.endswith(".py") and not any(m in loc.path for m in _LIBRARY)


def _where(loc: Location | None) -> str:
    if loc is None:
        return "?"
    from netdoctor.loading.target import display_path

    return f"{display_path(loc.path)}:{loc.line}" if loc.line else display_path(loc.path)


def _names(items, limit: int = 4) -> str:
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ------------------------------------------------------------------------------ ND501


@rule("ND501", needs="loop")
def grads_not_cleared(ctx: Context):
    loop = ctx.loop
    min_steps = int(ctx.option("ND501", "min-steps", 2))
    min_share = float(ctx.option("ND501", "min-share", 0.25))
    for o in loop.optimizers:
        n = len(o.stale_steps)
        judged = max(1, o.steps - 1)  # the first step has no previous one to re-use
        if n < min_steps or n / judged < min_share:
            continue
        message = (
            f"gradients are never cleared between optimizer steps: {n} of the {judged} "
            f"steps of {o.label} after its first (from step {o.stale_steps[0]} on) "
            "consumed a gradient that still held everything the previous step had "
            "already used, because no zero_grad() ran in between. Every update then adds "
            "up all earlier gradients, so the effective step grows with training and the "
            "loss oscillates or diverges. (Accumulating over k backward passes and "
            "clearing after each step is fine.)"
        )
        fix = _zero_grad_fix(o.step_site, ctx.draft)
        yield ctx.finding(
            "ND501",
            message,
            location=o.step_site,
            fix=fix,
            evidence={
                "optimizer": o.label,
                "stale_steps": n,
                "steps": o.steps,
                "share": n / judged,
                "first_step": o.stale_steps[0],
                "backward_line": _where(o.stale_backward_site) if o.stale_backward_site else None,
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
    if draft or not _user_file(step_site):
        return Fix(summary, snippet)

    def edit(src: str, line=step_site.line) -> str | None:
        receiver = method_receiver(src, line, "step")
        if receiver is None:
            return None
        return insert_statement_after(src, line, f"{receiver}.zero_grad()")

    return diff_fix(summary, step_site.path, edit, snippet)


# ------------------------------------------------------------------------------ ND502


@rule("ND502", needs="loop")
def params_not_optimized(ctx: Context):
    loop = ctx.loop
    min_steps = int(ctx.option("ND502", "min-steps", 2))
    if loop.iterations < min_steps and not loop.finished:
        return  # a second optimizer may not have stepped yet
    for m in loop.models:
        names = sorted(m.unoptimized)
        if not names:
            continue
        modules = list(dict.fromkeys(n.rpartition(".")[0] or "(the model itself)" for n in names))
        first_module = next((mod for mod in modules if mod in m.unoptimized_sites), None)
        location = m.unoptimized_sites.get(first_module) if first_module else None
        if location is None and m.optimized == 0:
            location = m.site  # the whole model: where it was built
        built = f" (built at {_where(location)})" if location is not None else ""
        owners = [o for o in loop.optimizers if m.label in o.models]
        made = [f"{o.label} at {_where(o.site)}" for o in owners if o.site is not None]
        if m.optimized == 0:
            message = (
                f"{m.label}'s parameters receive gradients, but no optimizer holds any of "
                f"them ({len(names)} parameter tensors): {m.label} never trains."
            )
        else:
            message = (
                f"{len(names)} trainable parameter(s) of {m.label} receive gradients but "
                f"are in no optimizer, so they never change: {_names(names)}, in "
                f"{_names(modules)}{built}. Typically the layer was built or replaced "
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
        yield ctx.finding(
            "ND502",
            message,
            module=first_module if first_module else None,
            location=location,
            fix=fix,
            evidence={
                "model": m.label,
                "parameters": names[:50],
                "modules": modules[:20],
                "optimized": m.optimized,
                "checks": m.grad_checks,
            },
            impact=13.0,
        )
    for o in loop.optimizers:
        if o.steps and o.n_params and o.n_trainable == 0:
            where = o.site or o.step_site
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
            yield ctx.finding(
                "ND502",
                message,
                location=where,
                fix=fix,
                evidence={"optimizer": o.label, "parameters": o.n_params, "trainable": 0},
                impact=13.0,
            )


# ------------------------------------------------------------------------------ ND503

_WHY = {
    "lr-zero": "its learning rate is 0 in every param group",
    "no-grad": "none of its parameters has a gradient when it steps (backward never reached "
    "them, or zero_grad() ran between backward() and step())",
    "zero-grad": "every gradient it holds is exactly zero",
    "no-change": "the updates it computes do not change the weights (below their precision, "
    "or the optimizer does not apply them)",
}


@rule("ND503", needs="loop")
def step_changes_nothing(ctx: Context):
    loop = ctx.loop
    min_steps = int(ctx.option("ND503", "min-steps", 3))
    min_share = float(ctx.option("ND503", "min-share", 0.9))
    for o in loop.optimizers:
        n = len(o.unchanged_steps)
        judged = n + o.changed_steps
        if n < min_steps or not judged or n / judged < min_share or not o.n_trainable:
            continue
        reason = max(o.unchanged_reasons, key=o.unchanged_reasons.get)
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
        yield ctx.finding(
            "ND503",
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


# ------------------------------------------------------------------------------ ND504


@rule("ND504", needs="loop")
def eval_mode_training(ctx: Context):
    loop = ctx.loop
    min_steps = int(ctx.option("ND504", "min-steps", 3))
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
            f"{n} of the {o.steps} steps of {o.label} trained {_names(o.eval_models)} "
            f"with {len(modules)} {'/'.join(kinds)} module(s) in eval mode "
            f"({_names(modules)}), first at step {o.eval_steps[0]}: dropout is off and "
            "BatchNorm normalizes with its running statistics instead of the batch's, "
            "so the model trains differently from how it was designed."
        )
        if eval_site is not None:
            message += (
                f" It was put in eval mode at {_where(eval_site)} (a validation pass?) "
                "and never back into train mode."
            )
        fix = Fix(
            "call model.train() before training again (at the start of every epoch, "
            "after validation)",
            "for epoch in range(epochs):\n    model.train()   # validation below switches "
            "to eval()\n    for x, y in train_loader:\n        ...\n    model.eval()\n"
            "    with torch.no_grad():\n        ...   # validation\n",
        )
        yield ctx.finding(
            "ND504",
            message,
            location=eval_site or o.step_site,
            fix=fix,
            evidence={
                "optimizer": o.label,
                "eval_steps": n,
                "steps": o.steps,
                "first_step": o.eval_steps[0],
                "modules": modules[:20],
                "eval_line": _where(eval_site) if eval_site else None,
            },
            impact=8.0,
        )


# ------------------------------------------------------------------------------ ND505


def lr_collapse_step(lrs: list[float], drop: float) -> tuple[int, float] | None:
    """(0-based step where the lr first fell below the highest lr so far / drop, that peak)."""
    peak = 0.0
    for i, v in enumerate(lrs):
        if not math.isfinite(v):
            continue
        peak = max(peak, v)
        if peak > 0 and v < peak / drop:
            return i, peak
    return None


@rule("ND505", needs="loop")
def lr_collapse(ctx: Context):
    loop = ctx.loop
    drop = float(ctx.option("ND505", "min-drop", 100.0))
    early = float(ctx.option("ND505", "early-fraction", 0.25))
    min_steps = int(ctx.option("ND505", "min-steps", 20))
    stay = float(ctx.option("ND505", "stays-low", 0.9))
    for o in loop.optimizers:
        lrs = o.lr_curve()
        n = len(lrs)
        if n < min_steps:
            continue
        found = lr_collapse_step(lrs, drop)
        if found is None:
            continue
        at, peak = found
        if (at + 1) / n > early:
            continue  # a schedule that reaches ~0 near its end
        after = [v for v in lrs[at:] if math.isfinite(v)]
        low = sum(1 for v in after if v < peak / drop)
        if not after or low / len(after) < stay:
            continue  # it recovers (a cyclic schedule)
        final = lrs[-1]
        decades = math.log10(peak / final) if final > 0 else math.inf
        message = (
            f"the learning rate of {o.label} fell from {g(peak)} to {g(lrs[at])} by step "
            f"{at + 1} of {n} ({pct((at + 1) / n)} of the run) and stayed there "
            f"({g(final)} at the last step, "
            + (
                f"{decades:.1f} orders of magnitude below its peak"
                if math.isfinite(decades)
                else "zero"
            )
            + f"): the remaining {n - at - 1} steps barely train."
        )
        sched = max(loop.schedulers.values(), key=lambda s: s.calls, default=None)
        location = o.step_site
        if sched is not None and sched.calls:
            location = sched.site or location
            per_step = sched.calls >= 0.5 * max(1, loop.iterations)
            if per_step:
                message += (
                    f" {sched.name}.step() runs at every training step ({sched.calls} "
                    f"calls in {loop.iterations} steps) at {_where(sched.site)}: a "
                    "schedule sized in epochs (step_size, milestones, T_max, a gamma per "
                    "epoch) then decays once per batch."
                )
            else:
                message += f" The scheduler is {sched.name}, stepped at {_where(sched.site)}."
        fix = Fix(
            "step an epoch-sized scheduler once per epoch (after the batch loop), or size "
            "it in steps (e.g. T_max=epochs * len(loader))",
            "for epoch in range(epochs):\n    for x, y in loader:\n        ...\n"
            "        optimizer.step()\n    scheduler.step()   # once per epoch, outside "
            "the batch loop\n",
        )
        yield ctx.finding(
            "ND505",
            message,
            location=location,
            fix=fix,
            evidence={
                "optimizer": o.label,
                "peak_lr": peak,
                "collapse_step": at + 1,
                "steps": n,
                "final_lr": final,
                "scheduler": sched.name if sched else None,
                "scheduler_calls": sched.calls if sched else None,
            },
            impact=9.0,
        )


# ------------------------------------------------------------------------------ ND506


@rule("ND506", needs="loop")
def loss_pairing(ctx: Context):
    loop = ctx.loop
    min_calls = int(ctx.option("ND506", "min-calls", 2))
    for c in loop.loss_calls():
        certain = c.input_producer in ("SoftmaxBackward0", "SigmoidBackward0")
        enough = c.checked >= min_calls or certain
        span = (
            f" (min {g(c.input_min)}, max {g(c.input_max)})"
            if c.input_min is not None and c.input_max is not None
            else ""
        )
        message = fix = None
        if (
            c.fn in ("cross_entropy", "nll_loss")
            and c.probabilities
            and c.probabilities == c.checked
            and enough
        ):
            source = " from a softmax" if c.input_producer == "SoftmaxBackward0" else ""
            if c.fn == "cross_entropy":
                message = (
                    f"cross_entropy was fed probabilities{source}: in every examined call "
                    f"({c.checked}) its input lies in [0, 1]{span} and sums to 1 over the "
                    "classes. cross_entropy applies log-softmax itself, so softmax runs "
                    "twice: the outputs can never be confident, the gradients shrink and "
                    "the loss stalls near ln(C)."
                )
                fix = Fix(
                    "feed cross_entropy the raw logits (remove the softmax; apply it only "
                    "to read probabilities)",
                    "logits = model(x)            # no softmax here\n"
                    "loss = F.cross_entropy(logits, y)\n"
                    "probs = logits.softmax(dim=1)  # only for metrics / inference\n",
                )
            else:
                message = (
                    f"nll_loss was fed probabilities{source} (in [0, 1]{span}, summing to "
                    "1): it expects log-probabilities, so it maximizes p instead of log p "
                    "and its gradients do not match the likelihood."
                )
                fix = Fix(
                    "use log_softmax instead of softmax before nll_loss (or cross_entropy "
                    "on logits)",
                    "loss = F.nll_loss(F.log_softmax(logits, dim=1), y)\n",
                )
        elif c.fn == "nll_loss" and c.not_log_probs and c.not_log_probs == c.checked and enough:
            message = (
                f"nll_loss was fed values that are not log-probabilities{span}: each "
                "row's logsumexp is not 0, i.e. raw logits. nll_loss only picks the "
                "target's entry, so the loss can fall without bound while the model "
                "learns nothing useful."
            )
            fix = Fix(
                "apply log_softmax before nll_loss, or use cross_entropy on the logits",
                "loss = F.cross_entropy(logits, y)   # = nll_loss(log_softmax(logits))\n",
            )
        elif (
            c.fn == "binary_cross_entropy_with_logits"
            and c.probabilities
            and c.probabilities == c.checked
            and (certain or c.checked >= max(3, min_calls))
        ):
            source = (
                "sigmoid outputs"
                if c.input_producer == "SigmoidBackward0"
                else "values that all lie in (0, 1)"
            )
            message = (
                f"BCEWithLogitsLoss was fed {source}{span} in every examined call "
                f"({c.checked}): it applies the sigmoid itself, so the outputs are "
                "squashed twice, every prediction sits between 0.5 and 0.73, and the "
                "loss cannot go down."
            )
            fix = Fix(
                "feed BCEWithLogitsLoss the raw logits (remove the sigmoid)",
                "logits = model(x)   # no sigmoid here\n"
                "loss = F.binary_cross_entropy_with_logits(logits, y)\n",
            )
        elif c.fn == "binary_cross_entropy" and c.out_of_range:
            raised = f" It raised {c.raised}." if c.raised else ""
            message = (
                f"BCELoss was fed values outside [0, 1]{span}: logits, not "
                f"probabilities.{raised} BCELoss takes probabilities; logits belong in "
                "BCEWithLogitsLoss, which is also numerically stable."
            )
            fix = Fix(
                "use BCEWithLogitsLoss on the logits (or apply sigmoid first)",
                "criterion = nn.BCEWithLogitsLoss()   # instead of nn.BCELoss()\n"
                "loss = criterion(logits, y)\n",
            )
        if message is None:
            continue
        yield ctx.finding(
            "ND506",
            message,
            location=c.site,
            fix=fix,
            evidence={
                "loss": c.fn,
                "calls": c.calls,
                "examined": c.checked,
                "input_min": c.input_min,
                "input_max": c.input_max,
                "input_producer": c.input_producer,
                "raised": c.raised,
            },
            impact=12.0,
        )


# ------------------------------------------------------------------------------ ND507


@rule("ND507", needs="loop")
def loss_broadcast(ctx: Context):
    loop = ctx.loop
    for c in loop.loss_calls():
        if not c.broadcast_calls or c.broadcast_shape is None:
            continue
        inp, tgt, both = c.input_shape, c.target_shape, c.broadcast_shape
        message = (
            f"{c.fn} compared an input of shape {tuple(inp)} with a target of shape "
            f"{tuple(tgt)}: they broadcast to {tuple(both)}, so every prediction is "
            f"compared with every target ({c.broadcast_calls} of {c.calls} calls). The "
            "loss is wrong and the model learns to predict the targets' mean."
        )
        fix = _broadcast_fix(c, ctx.draft)
        yield ctx.finding(
            "ND507",
            message,
            location=c.site,
            fix=fix,
            evidence={
                "loss": c.fn,
                "input_shape": list(inp),
                "target_shape": list(tgt),
                "broadcast_shape": list(both),
                "calls": c.broadcast_calls,
            },
            impact=12.0,
        )


def _broadcast_fix(c, draft: bool) -> Fix:
    from netdoctor.fixes.patch import diff_fix, wrap_call_argument

    inp, tgt = tuple(c.input_shape), tuple(c.target_shape)
    if len(inp) == len(tgt) + 1 and inp[-1] == 1:
        index, suffix, what = 0, ".squeeze(-1)", "squeeze the input's trailing 1"
    elif len(tgt) == len(inp) + 1 and tgt[-1] == 1:
        index, suffix, what = 1, ".squeeze(-1)", "squeeze the target's trailing 1"
    else:
        index, suffix, what = 1, ".view_as(input)", "give the target the input's shape"
    summary = f"make the shapes equal ({what})"
    snippet = (
        "loss = criterion(pred.squeeze(-1), y)   # (N, 1) -> (N,), like y\n"
        if index == 0
        else "loss = criterion(pred, y.view_as(pred))\n"
    )
    if draft or not _user_file(c.site) or suffix == ".view_as(input)":
        return Fix(summary, snippet)
    return diff_fix(
        summary,
        c.site.path,
        lambda src, line=c.site.line: wrap_call_argument(src, line, index, suffix),
        snippet,
    )
