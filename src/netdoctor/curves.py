"""The measured curves a probe or a watched run hands its report (`Report.curves`): plain lists
of floats per step, so that a reporter can draw them without the run (or torch) at hand.

Steps are 1-based training steps. The per-layer and per-activation curves hold one value per
deep-measured step (`Curves.measured_steps`: the probe measures every step it took, a watched
run those of its schedule); the loss, gradient norm and learning rate hold one per step. A
value of None (NaN or inf in the run) marks a step where the measurement was not finite.

Torch-free, like `netdoctor.findings`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


def finite_or_none(values: Iterable[float | None]) -> list[float | None]:
    """The values as floats, with NaN, inf and anything not a number as None."""
    out: list[float | None] = []
    for v in values:
        try:
            f = float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            f = math.nan
        out.append(f if math.isfinite(f) else None)
    return out


@dataclass
class LayerCurve:
    """One weight layer (input to output order) on the measured steps."""

    name: str  # the module ("net.0"), or the parameter when it is no `.weight`
    grad_norm: list[float | None] = field(default_factory=list)
    update_ratio: list[float | None] = field(default_factory=list)  # ||update|| / ||weight||


@dataclass
class ActivationCurve:
    """One activation site on the measured steps: the share of its outputs that are zero (a
    ReLU's inactive units) or saturated (a sigmoid within 0.01 of 0 or 1, a tanh beyond 0.99)."""

    name: str
    kind: str  # "relu", "sigmoid", "tanh"
    share: list[float | None] = field(default_factory=list)
    dead_fraction: float | None = None  # ReLU: units never active over the final window

    @property
    def measure(self) -> str:
        return "zero" if self.kind == "relu" else "saturated"


@dataclass
class FixCurve:
    """The verified fix: the loss per step of the probe as it was and of the re-run with the
    fix applied, same data, same steps."""

    applied: str
    before: list[float | None] = field(default_factory=list)
    after: list[float | None] = field(default_factory=list)


@dataclass
class ScaleCurve:
    """A GradScaler's scale after each of its steps, and the steps it skipped (1-based)."""

    label: str
    scale: list[float | None] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


@dataclass
class Curves:
    loss: list[float | None] = field(default_factory=list)
    accuracy: list[float | None] = field(default_factory=list)
    grad_norm: list[float | None] = field(default_factory=list)  # total over the weight layers
    lr: list[float | None] = field(default_factory=list)  # largest over the param groups
    measured_steps: list[int] = field(default_factory=list)
    layers: list[LayerCurve] = field(default_factory=list)
    activations: list[ActivationCurve] = field(default_factory=list)
    scalers: list[ScaleCurve] = field(default_factory=list)
    fix: FixCurve | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
