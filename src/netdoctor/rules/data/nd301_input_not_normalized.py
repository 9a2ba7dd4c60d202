"""ND301 input-not-normalized: the inputs are far from unit scale, e.g. raw 0..255 pixels
(doc: rules/ND301.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import DataContext
from netdoctor.rules.data._common import dims_but, f4, g4, settle_if_survived, tuple4
from netdoctor.rules.verification import Remedy, RemedyContext

if TYPE_CHECKING:
    from netdoctor.data.sample import DataSample


@dataclass(frozen=True)
class Options(RuleOptions):
    max_abs_mean: float = 3.0  # |mean| above this fires
    max_std: float = 10.0  # std above this fires
    min_std: float = 0.01  # std below this fires (pixels divided by 255 twice)
    max_abs: float = 20.0  # 99.9th percentile of |x| above this fires


# Fixed ranges of integer-coded inputs: the scale fix divides by the range's top. A range
# fits data whose maximum lies in its upper three quarters (0..255 for a maximum of 64..255).
_RANGES = (16.0, 255.0, 1023.0, 4095.0, 65535.0)
_RANGE_NAMES = {
    16.0: "e.g. 4-bit intensities such as scikit-learn's 8x8 digits",
    1023.0: "10-bit values",
    4095.0: "12-bit sensor values",
    65535.0: "16-bit images",
}


def _nominal_range(stats: dict[str, float], integer_coded: bool) -> float | None:
    """The fixed range (0..16, 0..255, ..., 0..65535) non-negative integer data is coded in,
    or None when it is not such data (signed, fractional, or a maximum no range fits)."""
    if not integer_coded or stats["min"] < 0 or not stats["max"] > 1:
        return None
    for top in _RANGES:
        if top / 4 <= stats["max"] <= top:
            return top
    return None


def _standardize(mean: float, std: float) -> str:
    shift = f"x - {g4(mean)}" if mean >= 0 else f"x + {g4(-mean)}"
    return f"({shift}) / {g4(std)}"


def _off_scale(stats: dict[str, float], limits: tuple[float, float, float, float]) -> list[str]:
    """Which unit-scale limits (max |mean|, max std, min std, max 99.9th percentile of |x|) the
    statistics break; empty: at unit scale."""
    max_mean, max_std, min_std, max_abs = limits
    reasons: list[str] = []
    if not all(math.isfinite(stats[k]) for k in ("mean", "std")):
        return reasons
    if abs(stats["mean"]) > max_mean:
        reasons.append(f"|mean| {g4(abs(stats['mean']))} > {g4(max_mean)}")
    if stats["std"] > max_std:
        reasons.append(f"std {g4(stats['std'])} > {g4(max_std)}")
    if stats["std"] < min_std:
        reasons.append(f"std {g4(stats['std'])} < {g4(min_std)}")
    q = stats.get("abs_q999", math.nan)
    if math.isfinite(q) and q > max_abs:
        reasons.append(f"99.9th percentile of |x| {g4(q)} > {g4(max_abs)}")
    return reasons


def check(ctx: DataContext, options: Options) -> Iterator[Finding]:
    import torch

    from netdoctor.measure import inputs

    s: DataSample = ctx.data
    x = s.x
    if not inputs.is_float_input(x) or x.numel() == 0 or x.dim() == 0:
        return
    x = inputs.limit(x)
    dim = inputs.channel_dim(x) if x.dim() >= 4 else None  # Normalize works per image channel
    ch = inputs.per_channel(x, dim)
    stats = inputs.overall(ch)
    if not math.isfinite(stats["mean"]):
        return
    limits = (options.max_abs_mean, options.max_std, options.min_std, options.max_abs)
    values = ch["flat"][ch["finite"]]
    stats["abs_q999"] = inputs.abs_quantile(values, 0.999)
    reasons = _off_scale(stats, limits)
    if not reasons:
        return
    mi = s.model_input
    if mi and not _off_scale({k: mi.get(k, math.nan) for k in ("mean", "std", "abs_q999")}, limits):
        return  # the model rescales its input itself before the first weight layer

    integer_valued = bool(torch.equal(values, values.round()))
    top = _nominal_range(stats, integer_valued or s.raw)
    twice = 0 <= stats["min"] and 0 < stats["max"] <= 1 / 255 + 1e-9
    evidence: dict[str, Any] = {
        "mean": stats["mean"],
        "std": stats["std"],
        "min": stats["min"],
        "max": stats["max"],
        "abs_q999": stats["abs_q999"],
        "samples": int(x.shape[0]),
        "integer_valued": integer_valued,
        "limits_broken": reasons,
    }
    measured = (
        f"mean {g4(stats['mean'])}, std {g4(stats['std'])}, min {g4(stats['min'])}, "
        f"max {g4(stats['max'])}"
    )
    means = (ch["mean"]).tolist()
    stds = ch["std"].tolist()
    if top is not None:
        t = f"{top:g}"
        scaled_m = [m / top for m in means]
        scaled_s = [max(v / top, 1e-8) for v in stds]
        evidence["looks_like"] = "raw 0..255 pixels" if top == 255 else f"integers in 0..{t}"
        evidence["range_max"] = float(top)
        evidence["scaled_mean"] = scaled_m
        evidence["scaled_std"] = scaled_s
        norm = f"transforms.Normalize({tuple4(scaled_m)}, {tuple4(scaled_s)})"
        what = (
            "raw 0..255 pixels"
            if top == 255
            else f"integer values in 0..{t} ({_RANGE_NAMES.get(top, 'a fixed-range encoding')})"
        )
        message = (
            f"the inputs are {what} ({measured} over {x.shape[0]} samples; "
            f"{'; '.join(reasons)}): with values this large the first layer's outputs "
            "are large, and at a high learning rate ReLUs die or saturate and the loss "
            "stalls"
            + (
                " (the 784-300-10 MLP on raw FashionMNIST pixels reached accuracy 0.1)"
                if top == 255
                else ""
            )
            + f". Scale them to [0, 1] by their range (x / {t}) and standardize: after "
            f"the division the measured mean is {tuple4(scaled_m)} and std "
            f"{tuple4(scaled_s)}."
        )
        lines = []
        if s.builtin and s.raw:
            lines.append(
                "# netdoctor served this built-in set raw because of --raw: drop --raw "
                "(the default is [0, 1], like ToTensor)"
            )
            lines.append("# or add --normalize to standardize with the measured statistics.")
        lines += [
            f"# scale the 0..{t} values to [0, 1] before they reach the model:",
            f"x = x / {top:.1f}",
        ]
        if top == 255:
            lines += [
                "# then standardize; in a torchvision pipeline (ToTensor already divides by 255):",
                f"transforms.Compose([transforms.ToTensor(), {norm}])",
            ]
        else:
            lines += [
                "# then standardize with the statistics measured after the division:",
                norm if len(means) > 1 else f"x = (x - {f4(scaled_m[0])}) / {f4(scaled_s[0])}",
            ]
        if len(means) == 1 and top == 255:
            lines += ["# or by hand:", f"x = (x / 255.0 - {f4(scaled_m[0])}) / {f4(scaled_s[0])}"]
        summary = (
            f"scale the inputs: x = x / {top:.1f}, then Normalize({tuple4(scaled_m)}, "
            f"{tuple4(scaled_s)})"
        )
    else:
        m, sd = stats["mean"], max(stats["std"], 1e-12)
        message = (
            f"the inputs are far from unit scale ({measured} over {x.shape[0]} samples; "
            f"{'; '.join(reasons)}): the first layer's pre-activations inherit this "
            "scale, so ReLUs die or saturate and gradients are off by the same factor. "
            "Standardize them to mean 0, std 1."
        )
        lines = []
        if twice:
            message += " They look divided by 255 twice (max <= 1/255)."
            lines.append("# the values are <= 1/255: remove the second division by 255, or:")
        if s.builtin and s.normalized is False and s.raw:
            lines.append("# drop --raw (or add --normalize)")
        fdim = inputs.channel_dim(x)
        if len(means) > 1:
            norm = f"transforms.Normalize({tuple4(means)}, {tuple4([max(v, 1e-8) for v in stds])})"
            lines += ["# per channel, with the measured statistics:", norm]
            summary = f"standardize per channel: {norm}"
        elif fdim is not None and x.shape[fdim] > 1:
            # tabular / sequence features: standardize each one (StandardScaler)
            dims = dims_but(x, fdim)
            lines += [
                "# standardize each feature with statistics of the TRAINING data:",
                f"mean = x_train.mean(dim={dims}, keepdim=True)",
                f"std = x_train.std(dim={dims}, keepdim=True).clamp_min(1e-8)",
                "x = (x - mean) / std",
                f"# (over all features at once: x = {_standardize(m, sd)})",
            ]
            summary = "standardize each feature: x = (x - mean) / std (training-set statistics)"
        else:
            lines += ["# standardize with the measured statistics:", f"x = {_standardize(m, sd)}"]
            summary = f"standardize the inputs: x = {_standardize(m, sd)}"
    evidence["channel_mean"] = means
    evidence["channel_std"] = stds
    yield RULE.finding(
        message,
        fix=Fix(summary, "\n".join(lines) + "\n", "snippet"),
        evidence=evidence,
        impact=10.0,
    )


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """Scale integer-coded inputs by their range, else standardize them (per channel when the
    rule measured several) with the measured statistics."""
    from netdoctor.fixes.memory import scale, standardize

    ev = finding.evidence or {}
    top = ev.get("range_max")
    if top:
        return Remedy(
            RULE.id,
            f"inputs scaled to [0, 1] (x / {top:g})",
            "data",
            transform=scale(1 / float(top)),
        )
    means, stds = ev.get("channel_mean"), ev.get("channel_std")
    if means and stds and len(means) > 1:
        return Remedy(
            RULE.id,
            "inputs standardized per channel with the measured mean/std",
            "data",
            transform=standardize(means, stds, 1),
        )
    m, s = ev.get("mean"), ev.get("std")
    if m is None or s is None or not (math.isfinite(m) and math.isfinite(s)):
        return None
    return Remedy(
        RULE.id,
        f"inputs standardized: (x - {m:.4g}) / {s:.4g}",
        "data",
        transform=standardize(m, s, None),
    )


RULE = Rule(
    "ND301",
    "input-not-normalized",
    Severity.WARNING,
    Stage.DATA,
    summary="inputs far from unit scale (e.g. raw 0..255 pixels)",
    check=check,
    options=Options,
    remedy=remedy,
    revise=settle_if_survived,
    fixture=Fixture(
        "check",
        (
            "fixtures/data/raw_pixels.py:Net",
            "--input-shape",
            "1,28,28",
            "--data",
            "fixtures/data/raw_pixels.py:data",
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
