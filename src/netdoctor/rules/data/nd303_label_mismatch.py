"""ND303 label-mismatch: labels outside [0, C), non-integer class labels, or a number of
classes that does not match the model's outputs (doc: rules/ND303.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import DataContext

if TYPE_CHECKING:
    from netdoctor.data.sample import DataSample


@dataclass(frozen=True)
class Options(RuleOptions):
    ignore_index: int = -100  # the label CrossEntropyLoss ignores (255 in many segmentation sets)
    min_samples_per_class: int = 20  # "C larger than the classes seen" needs this many per output


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} (x{c})" for k, c in counts.items())


def check(ctx: DataContext, options: Options) -> Iterator[Finding]:
    import torch

    from netdoctor.data.sample import CLASS_INDEX_LOSSES
    from netdoctor.measure import inputs

    s: DataSample = ctx.data
    y = s.y
    C = s.num_outputs
    loss = (s.loss or "").strip().lower().replace("-", "_")
    ce = loss in CLASS_INDEX_LOSSES
    if (loss and not ce) or y.numel() == 0 or y.dtype == torch.bool:
        return
    if (s.source or "").strip().lower() == "synthetic":
        return  # netdoctor made these labels up, with as many classes as it was asked for
    if (
        s.output_shape is not None
        and tuple(y.shape[1:]) == tuple(s.output_shape[1:])
        and y.dim() >= 2
    ):
        return  # targets shaped like the outputs: regression, multi-label or soft labels
    is_float = y.is_floating_point()
    if is_float and not ce and not (C is not None and C > 1):
        return  # float targets with no class-index loss in sight: regression
    if not is_float and C == 1 and not ce:
        return  # one output: binary or regression targets, not class indices
    ignore_index = options.ignore_index
    min_per_class = options.min_samples_per_class

    v = y.reshape(-1)
    if is_float:
        v = v.to(torch.float64)
        v = v[torch.isfinite(v)]  # ND304 reports non-finite targets
    else:
        v = v.to(torch.int64)
    problems: list[str] = []
    fixes: list[str] = []
    evidence: dict[str, Any] = {"num_outputs": C, "labels": int(v.numel())}
    if v.numel() == 0:
        return
    if is_float:
        frac = v != v.round()
        n_frac = int(frac.sum())
        if n_frac:
            counts = inputs.value_counts(v[frac], 5)
            problems.append(
                f"{n_frac} of {v.numel()} labels are not integers "
                f"(e.g. {_counts_text(counts)}): class labels must be integer "
                "indices 0..C-1"
            )
            fixes += [
                "# class labels must be int64 indices in [0, C):",
                "y = y.round().long()   # if they are class ids stored with noise",
                (
                    "# soft/probability targets must have shape (N, C); use a regression "
                    "loss (MSELoss) for real-valued targets"
                ),
            ]
            evidence["fractional"] = n_frac
            evidence["fractional_examples"] = counts
        else:
            problems.append(
                f"the class labels are stored as {str(y.dtype).replace('torch.', '')}"
                ": CrossEntropyLoss needs int64 class indices"
            )
            fixes += ["y = y.long()"]
            evidence["float_labels"] = True
        v = v.round().to(torch.int64)
    ignored = int((v == ignore_index).sum())
    if ignored:
        evidence["ignored"] = ignored
        v = v[v != ignore_index]
    if v.numel() == 0:
        return
    lo, hi = int(v.min()), int(v.max())
    seen = torch.unique(v)
    evidence.update(label_min=lo, label_max=hi, classes_seen=int(seen.numel()))
    if C is not None:
        bad = (v < 0) | (v >= C)
        n_bad = int(bad.sum())
        if n_bad:
            counts = inputs.value_counts(v[bad])
            evidence["out_of_range"] = counts
            evidence["out_of_range_count"] = n_bad
            problems.append(
                f"{n_bad} of {v.numel()} labels are outside [0, {C}) for the "
                f"model's {C} outputs: {_counts_text(counts)}"
                f"{' ...' if len(torch.unique(v[bad])) > len(counts) else ''}"
            )
            if lo == 1 and hi == C:
                problems[-1] += f" (labels run 1..{C}: they look 1-based)"
                fixes += ["# the labels are 1-based (1..C): shift them to 0..C-1", "y = y - 1"]
            elif lo >= 0:
                fixes += [
                    (
                        f"# the data has labels up to {hi}: give the last layer {hi + 1} "
                        f"outputs (e.g. nn.Linear(..., {hi + 1})),"
                    ),
                    f"# or remap the labels into 0..{C - 1}",
                ]
            else:
                fixes += [
                    (
                        f"# remap the labels into 0..{C - 1} (negative labels are invalid; "
                        f"only {ignore_index} is ignored by CrossEntropyLoss)"
                    )
                ]
        if int(seen.numel()) > C:
            problems.append(f"{int(seen.numel())} classes seen but the model has {C} outputs")
        declared = s.num_classes
        if declared is not None and declared != C and not n_bad:
            problems.append(f"the data set has {declared} classes but the model has {C} outputs")
            fixes += [
                f"# make the last layer output {declared} classes (nn.Linear(..., {declared}))"
            ]
            evidence["declared_classes"] = declared
        elif declared is None and hi + 1 < C and not n_bad:
            flat_y = y.reshape(-1)
            sorted_sample = bool((flat_y[1:] >= flat_y[:-1]).all()) if flat_y.numel() > 1 else True
            if v.numel() >= min_per_class * C and not sorted_sample:
                problems.append(
                    f"the model has {C} outputs but only labels 0..{hi} "
                    f"({int(seen.numel())} classes) appear in {v.numel()} samples: "
                    f"outputs {hi + 1}..{C - 1} are never a target (this may be "
                    "fine if those classes are rare; check the last layer's size)"
                )
                fixes += [
                    (
                        f"# if the data has {hi + 1} classes, make the last layer output "
                        f"{hi + 1} (e.g. nn.Linear(..., {hi + 1}))"
                    )
                ]
    if not problems:
        return
    out_txt = f" (model outputs: {C})" if C is not None else ""
    message = "label mismatch" + out_txt + ": " + "; ".join(problems) + "."
    summary = (
        ("fix the labels: " + fixes[0].lstrip("# ").rstrip(","))
        if fixes
        else "make the labels class indices in [0, C) for the model's C outputs"
    )
    for line in fixes:
        if not line.startswith("#"):
            summary = f"fix the labels: {line.split('#')[0].strip()}"
            break
    yield RULE.finding(
        message,
        fix=Fix(summary, "\n".join(fixes) + "\n", "snippet"),
        evidence=evidence,
        impact=20.0,
    )


RULE = Rule(
    "ND303",
    "label-mismatch",
    Severity.ERROR,
    Stage.DATA,
    summary="labels outside [0, C), non-integer class labels, or C != classes seen",
    check=check,
    options=Options,
    fixture=Fixture(
        "check",
        (
            "fixtures/data/one_based_labels.py:Net",
            "--input-shape",
            "1,28,28",
            "--data",
            "fixtures/data/one_based_labels.py:data",
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
