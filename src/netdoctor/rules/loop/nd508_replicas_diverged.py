"""ND508 replicas-diverged: under DistributedDataParallel, parameters that must be identical on
every rank differ (ctx.loop.distributed, filled under torchrun by the watcher's exchange,
`netdoctor.watcher.distributed`; doc: rules/ND508.md).

DistributedDataParallel keeps every rank's copy of the model bitwise identical. When the copies
differ, each rank trains a different model and nothing fails: the watcher compares checksums of
every DDP-replicated parameter across ranks on its deep steps, and remembers which training
forwards called a wrapped module outside its wrapper (the usual cause) and which parameters were
added after wrapping.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Location, Severity
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import LoopContext
from netdoctor.rules.loop._common import user_file, where
from netdoctor.rules.numbers import g

# Relative to the tensor's norm. Replicas that DDP keeps in sync are bitwise equal, so their
# checksums are too; checksums of a truly diverged tensor differ by about the size of the
# unsynchronised updates (~1e-4 and more after one step). The watcher compares with it too.
DEFAULT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Options(RuleOptions):
    tolerance: float = DEFAULT_TOLERANCE  # relative checksum difference that counts as diverged


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def check(ctx: LoopContext, options: Options) -> Iterator[Finding]:
    d = ctx.loop.distributed
    if d is None or d.divergence is None:
        return
    tolerance = options.tolerance
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
            f"{where(bypass.site)} ({bypass.calls} call(s) with gradients enabled): "
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
    yield RULE.finding(
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
            "bypass_line": where(bypass.site) if bypass else None,
            "ddp_line": where(wrapper) if wrapper else None,
        },
        impact=14.0,
    )


def _bypass_fix(site: Location | None, draft: bool) -> Fix:
    from netdoctor.fixes.patch import call_wrapper_not_module, diff_fix

    summary = "call the DDP wrapper, not the module inside it, for every training forward"
    snippet = (
        "loss = criterion(model(x), y)   # model is the DDP wrapper: not model.module(x)\n"
        "# (model.module is fine for evaluation under torch.no_grad())\n"
    )
    if draft or site is None or site.line is None or not user_file(site):
        return Fix(summary, snippet, safe=False)
    line = site.line
    return diff_fix(
        summary, site.path, lambda src: call_wrapper_not_module(src, line), snippet, safe=False
    )


RULE = Rule(
    "ND508",
    "replicas-diverged",
    Severity.ERROR,
    Stage.LOOP,
    summary="under DDP, parameters that must be identical on every rank differ",
    check=check,
    options=Options,
    fixture=Fixture("run", ("fixtures/loops/ddp_bypass.py",)),
    healthy=Fixture("run", ("fixtures/loops/ddp.py",)),
)
