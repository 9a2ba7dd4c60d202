"""ND304 non-finite-input: NaN or Inf values in the inputs or the targets
(doc: rules/ND304.md)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import DataContext

if TYPE_CHECKING:
    from netdoctor.data.sample import DataSample


def check(ctx: DataContext, options: NoOptions) -> Iterator[Finding]:
    from netdoctor.measure import inputs

    s: DataSample = ctx.data
    found = {
        name: r
        for name, r in (
            ("x", inputs.nonfinite(s.x, s.batch_size)),
            ("y", inputs.nonfinite(s.y, s.batch_size)),
        )
        if r
    }
    if not found:
        return
    parts = []
    for name, r in found.items():
        where = ", ".join(map(str, r["first_samples"]))
        more = " ..." if r["samples"] > len(r["first_samples"]) else ""
        parts.append(
            f"{name} holds {r['nan']} NaN and {r['inf']} Inf values "
            f"({100 * r['fraction']:.3g}% of {r['values']}) in {r['samples']} of "
            f"{r['of_samples']} samples (first sample positions: {where}{more})"
        )
    systematic = [n for n, r in found.items() if r.get("always_nonfinite_positions")]
    if systematic:
        r = found[systematic[0]]
        parts.append(
            f"{r['always_nonfinite_positions']} positions of {systematic[0]} are "
            "non-finite in every sample: a per-feature statistic is the likely cause "
            "(standardizing by a std of 0 gives 0/0 = NaN), not a few bad samples"
        )
    message = (
        "non-finite data: " + "; ".join(parts) + ". One NaN input makes the loss and "
        "every gradient NaN, and the weights stay NaN after the update. Positions count "
        "samples in the order served (built-in sets and .npz files are shuffled)."
    )
    lines = (
        ["# standardizing per feature? guard the division:", "x = (x - mean) / std.clamp_min(1e-8)"]
        if systematic
        else []
    )
    lines += [
        (
            "# find where they come from (a division by a zero std, log(0), missing values)"
            " and fix it there; or drop the bad samples:"
        ),
        "bad = ~torch.isfinite(x).flatten(1).all(1)"
        if "x" in found
        else "bad = ~torch.isfinite(y.reshape(len(y), -1)).all(1)",
    ]
    if "x" in found and "y" in found:
        lines.append("bad |= ~torch.isfinite(y.reshape(len(y), -1)).all(1)")
    lines += [
        "x, y = x[~bad], y[~bad]",
        "# or replace them: x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)",
    ]
    yield RULE.finding(
        message,
        fix=Fix(
            "guard the per-feature standardization: x = (x - mean) / std.clamp_min(1e-8)"
            if systematic
            else "remove or repair the non-finite samples before training",
            "\n".join(lines) + "\n",
            "snippet",
        ),
        evidence=found,
        impact=30.0,
    )


RULE = Rule(
    "ND304",
    "non-finite-input",
    Severity.ERROR,
    Stage.DATA,
    summary="NaN/Inf in the data",
    check=check,
    options=NoOptions,
    fixture=Fixture(
        "check",
        (
            "fixtures/data/nan_standardized.py:Net",
            "--input-shape",
            "1,28,28",
            "--data",
            "fixtures/data/nan_standardized.py:data",
        ),
    ),
    healthy=Fixture(
        "check",
        (
            "fixtures/data/scaled_pixels.py:Net",
            "--input-shape",
            "1,28,28",
            "--data",
            "fixtures/data/scaled_pixels.py:data",
        ),
    ),
)
