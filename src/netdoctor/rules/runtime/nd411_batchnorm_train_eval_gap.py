"""ND411 batchnorm-train-eval-gap: outputs that differ strongly between train and eval mode, and
the BatchNorm whose running statistics explain it (doc: rules/ND411.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.record import TrainingRun
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.numbers import g, pct
from netdoctor.rules.runtime._common import (
    site,
)
from netdoctor.rules.verification import Remedy, RemedyContext, SymptomSpec


@dataclass(frozen=True)
class Options(RuleOptions):
    max_relative_gap: float = 0.3
    min_stat_mismatch: float = 0.5


def check(ctx: RuntimeContext, options: Options) -> Iterator[Finding]:
    run = ctx.run
    te = run.train_eval
    if not te:
        return
    limit = options.max_relative_gap
    min_mismatch = options.min_stat_mismatch
    gap = te.get("relative_gap")
    if gap is None or gap <= limit:
        return
    mism: dict[str, float] = te.get("layer_mismatch") or {}
    worst = max(mism, key=mism.__getitem__) if mism else (te.get("bn_layers") or [None])[0]
    worst_value = mism.get(worst) if worst else None
    if worst_value is not None and worst_value <= min_mismatch:
        return  # outputs differ, but every layer's running statistics match its batches: noise
    moms = te.get("momentum") or {}
    odd = {n: m for n, m in moms.items() if m is not None and (m == 0 or m >= 0.5)}
    size = pct(gap) if gap < 10 else g(gap) + "x"
    parts = [
        f"the outputs in eval mode differ from train mode by {size} (relative L2, "
        f"threshold {pct(limit)}) on the same batch"
    ]
    if te.get("accuracy_eval_mode") is not None:
        parts.append(
            f"accuracy {g(te['accuracy_train_mode'])} in train mode vs "
            f"{g(te['accuracy_eval_mode'])} in eval mode"
        )
    if worst:
        parts.append(
            f"{worst}'s running statistics are furthest from its batch statistics "
            f"(mismatch {g(worst_value)}: mean |batch mean - running mean| / batch std "
            f"+ mean |log(batch var / running var)| over channels; threshold "
            f"{g(min_mismatch)})"
        )
    message = "; ".join(parts) + (
        ". BatchNorm's running mean/variance do not match the data, "
        "so the model evaluates differently from how it trained."
    )
    if odd:
        message += f" Momentum {', '.join(f'{n}={m:g}' for n, m in odd.items())}: " + (
            "0 never updates the running statistics."
            if 0 in odd.values()
            else "PyTorch's momentum is the weight of the NEW batch "
            "(Keras' 0.99 is PyTorch's 0.01)."
        )
    module = next(iter(odd), worst) if odd else worst
    fix = _momentum_fix(run, module)
    yield RULE.finding(
        message,
        module=module,
        location=site(run, module),
        fix=fix,
        evidence={k: v for k, v in te.items()},
        impact=4.0,
    )


def _momentum_fix(run: TrainingRun, module: str | None) -> Fix:
    from netdoctor.fixes.patch import diff_fix, set_keyword

    loc = site(run, module)
    summary = "set BatchNorm momentum=0.1 (PyTorch's default) so running statistics track the data"
    kind = run.module_types.get(module, "BatchNorm2d") if module is not None else "BatchNorm2d"
    snippet = f"nn.{kind}(num_features, momentum=0.1)\n"
    if loc is None or loc.line is None:
        return Fix(summary, snippet)
    line = loc.line
    return diff_fix(
        summary,
        loc.path,
        lambda src: set_keyword(src, line, _BN_TYPES, "momentum", "0.1"),
        snippet,
    )


_BN_TYPES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")


def train_eval_gap(run: TrainingRun, options: Options) -> float | None:
    return (run.train_eval or {}).get("relative_gap")


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    from netdoctor.fixes.memory import bn_momentum

    return Remedy(RULE.id, "BatchNorm momentum set to 0.1", "batchnorm", model_fn=bn_momentum)


RULE = Rule(
    "ND411",
    "batchnorm-train-eval-gap",
    Severity.WARNING,
    Stage.RUNTIME,
    summary="outputs differ strongly between train and eval mode",
    check=check,
    options=Options,
    causes=("ND203",),
    symptoms=(
        SymptomSpec(
            "train/eval output gap",
            "ratio",
            "lower",
            train_eval_gap,
            threshold=lambda o: o.max_relative_gap,
            needs_train_eval=True,
        ),
    ),
    remedy=remedy,
    fixture=Fixture(
        "probe",
        (
            "fixtures/sick/bn_momentum.py:KerasMomentumNet",
            "-a",
            "momentum=0",
            "--data",
            "synthetic",
            "--steps",
            "100",
        ),
        name="sick__bn_momentum__KerasMomentumNet__momentum0",
    ),
    healthy=Fixture(
        "probe",
        (
            "fixtures/sick/bn_momentum.py:KerasMomentumNet",
            "-a",
            "momentum=0.1",
            "--data",
            "synthetic",
            "--steps",
            "100",
        ),
        name="sick__bn_momentum__KerasMomentumNet__momentum0_1",
    ),
)
