"""What the data rules share: how their messages and fix snippets write numbers and axes, and the
revision of a scale finding (ND301/ND302) that training survived. Torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from netdoctor.findings import Finding, Severity
from netdoctor.measure.summary import learned_well

if TYPE_CHECKING:
    import torch

DATA_SCALE = ("ND301", "ND302")


def f4(v: float) -> str:
    return f"{v:.4f}"


def tuple4(values: list[float]) -> str:
    """`(0.1307, 0.3081)` as transforms.Normalize takes it (`(0.5000,)` for one value)."""
    return "(" + ", ".join(f4(v) for v in values) + ("," if len(values) == 1 else "") + ")"


def g4(v: float) -> str:
    return f"{v:.4g}"


def dims_but(x: torch.Tensor, dim: int) -> str:
    """The axes of `x` other than `dim`, as a `dim=` argument: `0` or `(0, 2)`."""
    dims = [d for d in range(x.dim()) if d != dim]
    return str(dims[0]) if len(dims) == 1 else "(" + ", ".join(map(str, dims)) + ")"


def settle_if_survived(finding: Finding, findings: list[Finding], run: Any) -> None:
    """A scale finding (ND301/ND302) that training survived -- no runtime finding follows from
    it and the run learned well anyway -- is a risk, not what stops the model from learning: it
    is reported as info, with the run's numbers (the engine skips this when the user configured
    the rule's severity)."""
    survived = learned_well(run)
    if survived is None:
        return
    if any(o.cause in DATA_SCALE and o.severity >= Severity.WARNING for o in findings):
        return
    if finding.severity != Severity.WARNING:
        return
    finding.severity = Severity.INFO
    acc = survived["accuracy"]
    finding.message += (
        f" Training survived it in the probe (loss {survived['loss_first']:.3g} -> "
        f"{survived['loss_last']:.3g} over {survived['steps']} steps"
        + (f", accuracy {acc:.2f}" if acc is not None else "")
        + "), so it is reported as info: scaling is still the safer input, but it "
        "is not what decides whether this model learns."
    )
    finding.evidence = {**(finding.evidence or {}), "training_survived": survived}
