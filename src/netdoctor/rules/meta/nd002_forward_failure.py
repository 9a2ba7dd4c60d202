"""ND002 forward-failure: the model's forward raised on the given input (doc:
rules/ND002.md)."""

from __future__ import annotations

from collections.abc import Iterator

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.fixes.patch import diff_fix, set_positional
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import GraphContext


def check(ctx: GraphContext, options: NoOptions) -> Iterator[Finding]:
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
    yield RULE.finding(
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


RULE = Rule(
    "ND002",
    "forward-failure",
    Severity.ERROR,
    Stage.META,
    summary="the model's forward raised on the given input",
    check=check,
    options=NoOptions,
    fixture=Fixture("check", ("fixtures/sick/forward_error.py:ShapeBug",)),
    healthy=Fixture("check", ("fixtures/healthy/lenet_relu.py:LeNet",)),
)
