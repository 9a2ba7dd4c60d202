"""ND0xx: what happened while building the graph (fallbacks, a forward that raised)."""

from __future__ import annotations

from netdoctor.findings import Fix
from netdoctor.fixes.patch import diff_fix, set_positional
from netdoctor.rules.registry import Context, rule


@rule("ND001", needs="outcome")
def trace_fallback(ctx: Context):
    out = ctx.outcome
    if out is None or not out.fallback_reason:
        return
    if out.graph is not None:
        how = (
            f"the graph was built from one recorded forward pass on a "
            f"{out.input.describe()} input instead, so branches that input did not take "
            "are not seen"
        )
    else:
        how = "no fallback was possible (no working input), so graph rules were skipped"
    root = out.graph.root_location if out.graph is not None else None
    yield ctx.finding(
        "ND001",
        f"torch.fx could not trace the model ({out.fallback_reason}); {how}.",
        location=root,
        evidence={
            "fallback": "hooks" if out.graph is not None else None,
            "reason": out.fallback_reason,
        },
        fix=Fix(
            "nothing to fix for netdoctor; for a complete graph, keep Python control flow "
            "on tensor values out of forward (e.g. torch.where) and register submodules"
        ),
    )


@rule("ND002", needs="outcome")
def forward_failure(ctx: Context):
    out = ctx.outcome
    if out is None or out.forward_failure is None:
        return
    f = out.forward_failure
    spec = out.failed_input
    shapes = ", ".join("x".join(map(str, s)) for s in f.input_shapes) or "none"
    where = f"in {f.module} ({f.module_type})" if f.module else "outside any submodule"
    weights = (
        "; parameters "
        + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in f.param_shapes.items())
        if f.param_shapes
        else ""
    )
    guess = ""
    if spec is not None and spec.inferred_from:
        guess = (
            f" The input shape {spec.describe()} was a guess from {spec.inferred_from}; "
            "pass --input-shape if it is wrong."
        )
    err = str(f.error).strip().splitlines()[0] if str(f.error).strip() else ""
    message = (
        f"forward raised {type(f.error).__name__} {where} on input "
        f"{spec.describe() if spec else '?'}: {err} "
        f"(input shapes {shapes}{weights}).{guess}"
    )
    yield ctx.finding(
        "ND002",
        message,
        module=f.module,
        location=out.failure_location,
        fix=_shape_fix(f, out.failure_location),
        evidence={
            "error": f"{type(f.error).__name__}: {err}",
            "input_shapes": [list(s) for s in f.input_shapes],
            "parameter_shapes": {k: list(v) for k, v in f.param_shapes.items()},
            "input": list(spec.shape) if spec else None,
        },
    )


def _shape_fix(f, location) -> Fix | None:
    """For a Linear/Conv whose input size does not match, offer the size that arrived."""
    if not f.input_shapes:
        return None
    got = f.input_shapes[0]
    if f.module_type == "Linear" and "weight" in f.param_shapes and len(got) >= 1:
        want, have = f.param_shapes["weight"][1], got[-1]
        arg = 0
    elif (
        f.module_type in ("Conv1d", "Conv2d", "Conv3d")
        and "weight" in f.param_shapes
        and len(got) >= 2
    ):
        groups_in = f.param_shapes["weight"][1]
        want, have = groups_in, got[1]
        arg = 0
    else:
        return None
    if want == have:
        return None
    summary = (
        f"{f.module} expects {want} input features but receives {have}: construct it with {have}"
    )
    # Unsafe: it changes the model's interface to fit the --input-shape given, which may be wrong.
    if location is None:
        return Fix(summary, f"{f.module_type}({have}, ...)  # was {want}", "snippet", safe=False)
    return diff_fix(
        summary,
        location.path,
        lambda src: set_positional(src, location.line, (f.module_type,), arg, str(have)),
        f"nn.{f.module_type}({have}, ...)  # was {want}",
        safe=False,
    )
