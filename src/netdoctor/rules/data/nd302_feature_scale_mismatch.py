"""ND302 feature-scale-mismatch: input features or channels whose scales differ by orders of
magnitude (doc: rules/ND302.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import DataContext
from netdoctor.rules.data._common import dims_but, g4, settle_if_survived, tuple4
from netdoctor.rules.verification import Remedy, RemedyContext

if TYPE_CHECKING:
    from netdoctor.data.sample import DataSample


@dataclass(frozen=True)
class Options(RuleOptions):
    max_ratio: float = 100.0  # largest / smallest feature std above this fires
    min_varying_share: float = 0.1  # features off their median in fewer samples are "sparse"


def check(ctx: DataContext, options: Options) -> Iterator[Finding]:
    import torch

    from netdoctor.measure import inputs

    s: DataSample = ctx.data
    x = s.x
    if not inputs.is_float_input(x) or x.numel() == 0 or x.dim() == 0:
        return
    x = inputs.limit(x)
    dim = inputs.channel_dim(x)
    if dim is None or x.shape[dim] < 2:
        return
    max_ratio = options.max_ratio
    min_share = options.min_varying_share
    ch = inputs.per_channel(x, dim)
    word = "channel" if x.dim() >= 4 else "feature"
    std = ch["std"]
    constant = [i for i in range(std.numel()) if not std[i] > 0]
    # A feature that differs from its own median in under `min_share` of the values is sparse
    # (a border pixel, a rare one-hot column): its std measures rarity, not units.
    flat, finite = ch["flat"], ch["finite"]
    rows = flat if flat.shape[0] <= 200_000 else flat[:: flat.shape[0] // 100_000 + 1]
    fin = finite if flat.shape[0] <= 200_000 else finite[:: flat.shape[0] // 100_000 + 1]
    filled = torch.where(fin, rows, torch.full_like(rows, math.nan))
    median = filled.nanmedian(0).values
    varying = ((rows != median) & fin).to(torch.float64).sum(0) / fin.sum(0).clamp_min(1)
    sparse = [i for i in range(std.numel()) if i not in constant and float(varying[i]) < min_share]
    dense = [i for i in range(std.numel()) if i not in constant and i not in sparse]
    if len(dense) < 2:
        return
    dstd = std[dense]
    hi_i, lo_i = dense[int(dstd.argmax())], dense[int(dstd.argmin())]
    ratio = float(std[hi_i] / std[lo_i])
    if not ratio > max_ratio:
        return
    order = sorted(dense, key=lambda i: float(std[i]))
    big = [i for i in reversed(order) if float(std[i]) > max_ratio * float(std[lo_i])][:5]
    small = [i for i in order if float(std[hi_i]) > max_ratio * float(std[i])][:5]

    def named(ids):
        return ", ".join(f"{word} {i} (std {g4(float(std[i]))})" for i in ids)

    message = (
        f"input {word}s differ in scale by {ratio:.3g}x (std of {word} {hi_i}: "
        f"{g4(float(std[hi_i]))}, of {word} {lo_i}: {g4(float(std[lo_i]))}; threshold "
        f"{g4(max_ratio)}x): largest {named(big)}; smallest {named(small)}. The large "
        f"{word}s dominate the first layer and its gradients, the small ones are "
        "effectively ignored, and no single learning rate suits both (BatchNorm after "
        "the first layer does not undo this)."
    )
    if constant:
        message += (
            f" {len(constant)} {word}(s) are constant and carry no information: "
            f"{', '.join(map(str, constant[:10]))}{' ...' if len(constant) > 10 else ''}."
        )
    means = ch["mean"].tolist()
    stds = [max(float(v), 1e-8) for v in std.tolist()]
    if word == "channel":
        norm = f"transforms.Normalize({tuple4(means)}, {tuple4(stds)})"
        lines = ["# standardize each channel with the measured statistics:", norm]
        summary = f"standardize per channel: {norm}"
    else:
        lines = [
            (
                "# standardize each feature with statistics of the TRAINING data "
                "(reuse them for validation/test):"
            ),
            f"mean = x_train.mean(dim={dims_but(x, dim)}, keepdim=True)",
            f"std = x_train.std(dim={dims_but(x, dim)}, keepdim=True).clamp_min(1e-8)",
            "x = (x - mean) / std",
            "# or: sklearn.preprocessing.StandardScaler().fit(x_train).transform(x)",
        ]
        if len(means) <= 8:
            lines += [
                "# measured on this sample:",
                f"mean = torch.tensor({[round(m, 6) for m in means]})",
                f"std = torch.tensor({[round(v, 6) for v in stds]})",
            ]
        summary = "standardize each feature: x = (x - mean) / std, per feature"
    yield RULE.finding(
        message,
        fix=Fix(summary, "\n".join(lines) + "\n", "snippet"),
        evidence={
            "axis": dim,
            "word": word,
            "ratio": ratio,
            "max_ratio": max_ratio,
            "largest": {str(i): float(std[i]) for i in big},
            "smallest": {str(i): float(std[i]) for i in small},
            "std": std.tolist(),
            "mean": means,
            "constant": constant,
            "sparse": sparse,
        },
        impact=11.0,
    )  # above ND301's: standardizing each feature also fixes the overall scale


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """Each feature (channel) standardized with the mean/std the rule measured."""
    from netdoctor.fixes.memory import standardize

    ev = finding.evidence or {}
    axis, m, s = ev.get("axis"), ev.get("mean"), ev.get("std")
    if axis is None or not m or not s:
        return None
    word = "channel" if ev.get("word") == "channel" else "feature"
    return Remedy(
        RULE.id,
        f"each input {word} standardized with its measured mean/std",
        "data",
        transform=standardize(m, s, axis),
    )


RULE = Rule(
    "ND302",
    "feature-scale-mismatch",
    Severity.WARNING,
    Stage.DATA,
    summary="input features/channels whose scales differ by orders of magnitude",
    check=check,
    options=Options,
    remedy=remedy,
    revise=settle_if_survived,
    fixture=Fixture(
        "check",
        (
            "fixtures/data/tabular_units.py:Net",
            "--input-shape",
            "3",
            "--data",
            "fixtures/data/tabular_units.py:data",
        ),
    ),
    healthy=Fixture(
        "check",
        (
            "fixtures/data/standardized_tabular.py:Net",
            "--input-shape",
            "3",
            "--data",
            "fixtures/data/standardized_tabular.py:data",
        ),
    ),
)
