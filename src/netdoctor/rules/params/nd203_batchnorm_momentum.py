"""ND203 batchnorm-momentum: BatchNorm momentum >= 0.5 (Keras convention) or == 0 (doc:
rules/ND203.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

from netdoctor.findings import Finding, Severity
from netdoctor.fixes.patch import diff_fix, set_keyword
from netdoctor.graph.ir import Node
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import GraphContext
from netdoctor.rules.verification import Remedy, RemedyContext

_BN_TYPES = (
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
)


@dataclass(frozen=True)
class Options(RuleOptions):
    max_momentum: float = 0.5  # momentum at or above this is reported (as is momentum == 0)


def check(ctx: GraphContext, options: Options) -> Iterator[Finding]:
    high = options.max_momentum
    seen: set[str] = set()
    for node in ctx.graph.of_op("batchnorm"):
        key = node.module or node.name
        if key in seen:
            continue
        seen.add(key)
        momentum = node.attrs.get("momentum")
        if momentum is None or node.attrs.get("track_running_stats") is False:
            continue  # None = cumulative average, a valid choice
        if momentum >= high:
            why = (
                f"momentum={momentum:g} follows the TF/Keras convention; PyTorch updates "
                f"running = (1 - momentum) * running + momentum * batch, so running statistics "
                f"follow each batch almost exactly ({1 - momentum:.0%} of history kept) and "
                "eval-mode outputs jump around. PyTorch's 0.1 is Keras' 0.9."
            )
        elif momentum == 0:
            why = (
                "momentum=0 means the running statistics never update: eval mode normalizes "
                "with the initial mean 0 and variance 1, not the data's, so eval outputs "
                "differ from training."
            )
        else:
            continue
        onnx_momentum = node.attrs.get("onnx_momentum")
        if onnx_momentum is not None:
            why = (
                f"ONNX momentum={onnx_momentum:g} (ONNX weights the running value: it is "
                f"PyTorch's 1 - momentum) means PyTorch momentum={momentum:g}. " + why
            )
        loc = node.location
        summary = "set momentum=0.1 (PyTorch's default; equals Keras' 0.9)"
        line = loc.line if loc and loc.line else 0  # (no line: an ONNX node, nothing to edit)
        fix = diff_fix(
            summary,
            loc.path if loc else None,
            partial(set_keyword, line=line, type_names=_BN_TYPES, key="momentum", value="0.1"),
            _snippet(node),
        )
        yield RULE.finding(
            f"{key}: {why}",
            module=node.module,
            location=loc,
            fix=fix,
            evidence={"momentum": momentum, "onnx_momentum": node.attrs.get("onnx_momentum")},
            impact=2.0,
        )


def _snippet(node: Node) -> str:
    features = node.attrs.get("num_features", "...")
    if node.attrs.get("onnx_momentum") is not None:
        return (
            f"# in the PyTorch source of this model (exports as ONNX momentum=0.9):\n"
            f"nn.BatchNorm2d({features}, momentum=0.1)"
        )
    kind = str(node.attrs.get("type", "BatchNorm2d"))
    if kind not in _BN_TYPES:
        # an ONNX op (a BatchNormalization, or a BatchNorm folded into a conv): the PyTorch
        # layer it came from is not known
        return f"# in the PyTorch source of this model:\nnn.BatchNorm2d({features}, momentum=0.1)"
    return f"nn.{kind}({features}, momentum=0.1)"


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """Every BatchNorm's momentum of 0 or >= 0.5 set to 0.1, in a copy of the model."""
    from netdoctor.fixes.memory import bn_momentum

    return Remedy(RULE.id, "BatchNorm momentum set to 0.1", "batchnorm", model_fn=bn_momentum)


RULE = Rule(
    "ND203",
    "batchnorm-momentum",
    Severity.WARNING,
    Stage.PARAMS,
    summary="BatchNorm momentum >= 0.5 (Keras convention) or == 0",
    check=check,
    options=Options,
    consequence="ND411",
    remedy=remedy,
    fixture=Fixture("check", ("fixtures/sick/bn_momentum.py:KerasMomentumNet",)),
    healthy=Fixture(
        "check",
        ("fixtures/sick/bn_momentum.py:KerasMomentumNet", "-a", "momentum=0.1"),
        name="sick__bn_momentum__KerasMomentumNet__momentum0_1",
    ),
)
