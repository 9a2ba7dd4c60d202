"""ND508: the ranks of a distributed run (ctx.loop.distributed, filled under torchrun by the
watcher's exchange, `netdoctor.watcher.distributed`).

DistributedDataParallel keeps every rank's copy of the model bitwise identical. When the copies
differ, each rank trains a different model and nothing fails: the watcher compares checksums of
every DDP-replicated parameter across ranks on its deep steps, and remembers which training
forwards called a wrapped module outside its wrapper (the usual cause) and which parameters were
added after wrapping.
"""

from __future__ import annotations

from netdoctor.findings import Fix
from netdoctor.rules.loop import _user_file, _where
from netdoctor.rules.registry import Context, rule
from netdoctor.rules.runtime import g

# Relative to the tensor's norm. Replicas that DDP keeps in sync are bitwise equal, so their
# checksums are too; checksums of a truly diverged tensor differ by about the size of the
# unsynchronised updates (~1e-4 and more after one step). See rules/ND508.md.
DEFAULT_TOLERANCE = 1e-6


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


@rule("ND508", needs="loop")
def replicas_diverged(ctx: Context):
    d = ctx.loop.distributed
    if d is None or d.divergence is None:
        return
    tolerance = float(ctx.option("ND508", "tolerance", DEFAULT_TOLERANCE))
    v = d.divergence
    if not v.difference > tolerance:
        return
    equal = (
        f"; every copy still agreed at step {v.last_equal_step}"
        if v.last_equal_step is not None
        else ""
    )
    message = (
        f"the replicas of {v.model} differ across ranks: at step {v.step}, "
        f"{v.parameter} on {_ranks(v.ranks)} differs from rank 0's by {g(v.difference)} "
        f"of its norm ({v.tensors} of the {v.compared} replicated tensors differ"
        f"{equal}). DistributedDataParallel keeps every copy bitwise identical (the same "
        "start, broadcast from rank 0; the same all-reduced gradients; the same update), "
        "so each rank now trains a different model: its gradients were not averaged "
        "across ranks and every rank's checkpoint is another network."
    )
    bypass = next((b for b in d.bypass if b.calls), None)
    wrapper = d.wrapper_sites[0] if d.wrapper_sites else None
    if bypass is not None:
        message += (
            f" The training forward calls {bypass.model} outside its DDP wrapper at "
            f"{_where(bypass.site)} ({bypass.calls} call(s) with gradients enabled): "
            "DDP only arms its gradient all-reduce for forwards that go through the "
            "wrapper."
        )
        location = bypass.site or wrapper
        fix = _bypass_fix(bypass.site, ctx.draft)
    elif v.added_after_wrap:
        message += (
            f" {v.parameter} was added to the model after DistributedDataParallel "
            "wrapped it: DDP's reducer never learned of it and never all-reduces its "
            "gradient."
        )
        location = wrapper
        fix = Fix(
            "finish the model (replace or add layers) before wrapping it in DDP",
            "model.fc = nn.Linear(512, 10)                # change the model first ...\n"
            "model = DDP(model, device_ids=[local_rank])  # ... then wrap it\n",
        )
    else:
        message += (
            " Typical causes: a module called outside its DDP wrapper "
            "(`model.module(x)`), a parameter replaced or the model changed after "
            "wrapping, a rank that changes its copy (loads another checkpoint) after "
            "DDP broadcast rank 0's."
        )
        location = wrapper
        fix = Fix(
            "train only through the DDP wrapper, and finish (and load) the model before "
            "wrapping it",
            "model = DDP(model)             # after the model is complete and loaded\n"
            "loss = criterion(model(x), y)  # not model.module(x)\n",
        )
    yield ctx.finding(
        "ND508",
        message,
        location=location,
        fix=fix,
        evidence={
            "step": v.step,
            "model": v.model,
            "parameter": v.parameter,
            "ranks": list(v.ranks),
            "difference": v.difference,
            "tensors": v.tensors,
            "compared": v.compared,
            "tolerance": tolerance,
            "last_equal_step": v.last_equal_step,
            "bypass_line": _where(bypass.site) if bypass else None,
            "ddp_line": _where(wrapper) if wrapper else None,
        },
        impact=14.0,
    )


def _bypass_fix(site, draft: bool) -> Fix:
    from netdoctor.fixes.patch import call_wrapper_not_module, diff_fix

    summary = "call the DDP wrapper, not the module inside it, for every training forward"
    snippet = (
        "loss = criterion(model(x), y)   # model is the DDP wrapper: not model.module(x)\n"
        "# (model.module is fine for evaluation under torch.no_grad())\n"
    )
    if draft or not _user_file(site):
        return Fix(summary, snippet, safe=False)
    return diff_fix(
        summary,
        site.path,
        lambda src, line=site.line: call_wrapper_not_module(src, line),
        snippet,
        safe=False,
    )
