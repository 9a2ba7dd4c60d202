"""The training-run record: what a measured run saw, step by step.

One `TrainingRun` is filled by the probe's own loop (`netdoctor.probe.engine`) or by the watcher
inside the user's training (`netdoctor.watch`); the ND4xx rules read it without knowing which.
`config` holds the settings the run trained with (`optimizer`, `learning_rate`, `momentum`,
`loss`, `steps`, `window`, ...): the probe's `ProbeConfig` or the watcher's reading of the user's
optimizer (`netdoctor.watcher.settings.LoopConfig`).

The probe measures every step; the watcher measures deeply only on a schedule. Per-step traces
(`ParamTrace.grad_norm`, `ActivationTrace.zero_fraction`, ...) then hold one entry per measured
step, listed in `measured_steps` (empty: every step was measured), while `loss` holds every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from netdoctor.findings import Location

if TYPE_CHECKING:
    import torch


class RunConfig(Protocol):
    """What the rules read of `TrainingRun.config`: the fields the probe's `ProbeConfig` and the
    watcher's `LoopConfig` share (each has more, read where only that one is possible)."""

    @property
    def optimizer(self) -> str: ...  # "sgd" (the probe) or the class name ("SGD", a watched run)
    @property
    def learning_rate(self) -> float: ...
    @property
    def momentum(self) -> float | None: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def loss(self) -> str: ...
    @property
    def steps(self) -> int: ...
    @property
    def batch_size(self) -> int | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def window(self) -> float: ...
    def describe(self) -> str: ...


@dataclass
class ActivationTrace:
    """One activation site: a ReLU/Sigmoid/Tanh module call or a functional call in forward."""

    name: str  # "net.2" (module), "net.2#2" (its 2nd call per forward), "relu(fc1)" (functional)
    kind: str  # "relu", "sigmoid", "tanh"
    module: str | None  # the activation module, or for functional calls the producer module
    producer: str | None  # the module whose output it received, when known
    functional: bool
    location: Location | None  # construction site (module) or the calling line (functional)
    units: int = 0  # channels (conv) or features (linear)
    zero_fraction: list[float] = field(default_factory=list)  # per step, ReLU
    saturation: list[float] = field(default_factory=list)  # per step, sigmoid/tanh
    dead_units: int | None = None  # never active over the window (ReLU)
    window_steps: int = 0
    is_output: bool = False  # the model returns its output (a prediction, not a hidden unit)

    @property
    def dead_fraction(self) -> float | None:
        if self.dead_units is None or not self.units:
            return None
        return self.dead_units / self.units


#: The largest finite float16 value: a float16 output beyond it is inf.
FP16_MAX = 65504.0


@dataclass
class ModuleHeadroom:
    """How close one module's outputs came to float16's range in an autocast run: the largest
    |output| over the measured forwards (inf/nan once one overflowed)."""

    module: str
    dtype: str  # the output's dtype under autocast ("float16", "bfloat16", "float32")
    amax: float  # max |output| over the measured steps; inf or nan: it overflowed
    steps: int = 0  # measured forwards that produced it
    first_overflow: int | None = None  # the first measured step (1-based) whose output was
    # non-finite

    @property
    def overflowed(self) -> bool:
        return not math.isfinite(self.amax)

    @property
    def fp16_headroom(self) -> float:
        """65504 / max |output|: how many times larger the output could grow before float16
        overflows (0: it did; inf: the output was all zeros)."""
        if self.overflowed:
            return 0.0
        return FP16_MAX / self.amax if self.amax > 0 else math.inf


@dataclass
class ParamTrace:
    name: str  # "net.1.weight"
    module: str  # "net.1"
    module_type: str
    shape: tuple[int, ...]
    grad_norm: list[float] = field(default_factory=list)  # per step; nan = no gradient (None)
    weight_norm: list[float] = field(default_factory=list)  # before the step's update
    update_ratio: list[float] = field(default_factory=list)  # ||w_after - w_before|| / ||w_before||
    # (relative to max(||w_before||, reference_norm) for weights; see reference_norm)
    steps_with_grad: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def reference_norm(self) -> float:
        """The norm PyTorch's default init gives a weight of this shape (std 1/sqrt(3 fan_in)).
        Update ratios are taken relative to max(weight norm, this), so a layer that starts at
        zero (a zero-initialised last layer) does not look like it moves infinitely fast."""
        if len(self.shape) < 2:
            return 0.0
        fan_in = self.numel // self.shape[0]
        return math.sqrt(self.numel / (3.0 * max(1, fan_in)))

    @property
    def is_weight(self) -> bool:
        """A layer's weight matrix/kernel (Linear, ConvNd, Embedding, RNN weight_ih_l0, ...);
        not biases, norms' scales, or tensors like cls tokens held by the model itself."""
        return (
            len(self.shape) >= 2
            and self.module != ""
            and self.name.rpartition(".")[2].startswith("weight")
        )


@dataclass
class NonFinite:
    step: int  # 1-based
    kind: str  # "input", "forward", "loss", "gradient", "parameter"
    module: str | None = None  # the producer ("" = the model's own forward code)
    module_type: str | None = None
    parameter: str | None = None
    input_stats: dict[str, Any] | None = None
    output_stats: dict[str, Any] | None = None
    bad_parameters: list[str] = field(default_factory=list)
    nonfinite_modules: list[str] = field(default_factory=list)  # every module whose output was
    # non-finite in the replayed forward, in the order their forwards completed
    reproduced: bool = True
    detail: str = ""
    location: Location | None = None  # the user's line, when known (the loss call)


@dataclass
class TrainingRun:
    """Everything one measured training run saw (read by the ND4xx rules through ctx.run)."""

    config: RunConfig  # ProbeConfig, or the watcher's LoopConfig (see the module docstring)
    device: str
    target: str = ""
    steps_run: int = 0
    stopped: str | None = None  # "non-finite", "labels", "non-finite-input", "no-data"
    loss: list[float] = field(default_factory=list)
    accuracy: list[float | None] = field(default_factory=list)
    classification: bool = False
    num_outputs: int | None = None
    label_counts: list[int] | None = None
    pred_counts: list[int] | None = None  # predictions over the window
    activations: list[ActivationTrace] = field(default_factory=list)
    params: list[ParamTrace] = field(default_factory=list)  # in forward execution order
    layer_order: list[str] = field(default_factory=list)  # modules with parameters, executed order
    module_types: dict[str, str] = field(default_factory=dict)
    sites: dict[str, Location] = field(default_factory=dict)  # module name -> construction site
    frozen: list[str] = field(default_factory=list)  # parameters with requires_grad=False
    nonfinite: NonFinite | None = None
    bad_batch: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    train_eval: dict[str, Any] | None = None
    overfit: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prior_rules: set[str] = field(default_factory=set)  # static/data rule ids already found
    measured_steps: list[int] = field(default_factory=list)  # 1-based; empty: every step
    # The probe trains a fresh model from its initialisation; a watched run may resume from a
    # checkpoint or fine-tune pretrained weights, so "already confident at step 1" proves nothing.
    from_init: bool = True
    # Several optimizers pursue competing objectives (a GAN's generator and discriminator): a
    # loss that does not fall is then no symptom.
    competing_losses: bool = False
    # The precision the forward ran in: "fp32", or "fp16"/"bf16" under torch.autocast (the
    # probe's --precision, or what the watcher saw), and each module's float16 headroom then.
    precision: str = "fp32"
    headroom: list[ModuleHeadroom] = field(default_factory=list)  # in forward order
    skipped_steps: list[int] = field(default_factory=list)  # 1-based: GradScaler skipped them
    scale: list[float] = field(default_factory=list)  # the probe's GradScaler: after each step

    # -- helpers the rules use ---------------------------------------------------------
    def site(self, module: str | None) -> Location | None:
        return self.sites.get(module) if module is not None else None

    @property
    def window(self) -> int:
        """Number of final measured steps used for "over the probe" statistics."""
        measured = len(self.measured_steps) if self.measured_steps else self.steps_run
        return max(1, int(round(measured * self.config.window)))

    @property
    def chance(self) -> float | None:
        if not self.classification or not self.label_counts or not sum(self.label_counts):
            return None
        return max(self.label_counts) / sum(self.label_counts)

    def finite_losses(self) -> list[float]:
        return [v for v in self.loss if math.isfinite(v)]

    def summary_side(self) -> dict[str, Any]:
        """{"loss_first", "loss_last", "accuracy"} as the verified-fix line shows them."""
        losses = self.loss
        k = max(1, min(10, len(losses) // 10 or 1))
        tail = [v for v in losses[-k:]]
        last = (
            (sum(tail) / len(tail))
            if tail and all(math.isfinite(v) for v in tail)
            else (float("nan") if tail else None)
        )
        accs = [a for a in self.accuracy[-k:] if a is not None]
        return {
            "loss_first": losses[0] if losses else None,
            "loss_last": last,
            "accuracy": (sum(accs) / len(accs)) if accs else None,
            "steps": self.steps_run,
        }

    def weight_layers(self) -> list[ParamTrace]:
        """The weight (ndim >= 2) parameters in execution order."""
        return [p for p in self.params if p.is_weight]
