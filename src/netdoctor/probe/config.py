"""What the probe's own training run does: `ProbeConfig` (steps, batch size, optimizer, loss,
seed, device, the overfit and train/eval checks) and its defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from netdoctor.errors import UserError

if TYPE_CHECKING:
    from netdoctor.measure.record import TrainingRun

OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = ("cross_entropy", "mse", "bce")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "bf16")
# How the report names each precision (fp32: nothing, the probe's behaviour before it had one).
PRECISION_TEXT = {
    "fp16": "float16 autocast with a GradScaler",
    "bf16": "bfloat16 autocast",
}

# Defaults (see the probe command's help and docs/probe defaults): measured so that the default
# probe of a LeNet-size model finishes in a few seconds on a laptop CPU.
DEFAULT_STEPS = 100
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_MOMENTUM = 0.9


@dataclass
class ProbeConfig:
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    optimizer: str = "sgd"
    momentum: float = DEFAULT_MOMENTUM  # SGD only
    weight_decay: float = 0.0
    loss: str = "cross_entropy"
    seed: int = 0
    device: str = "auto"
    window: float = 0.5  # share of the last steps over which units must be active to be alive
    overfit_steps: int = 50  # 0: no overfit-one-batch run
    overfit_samples: int = 16
    overfit_lr: float = 1e-3  # Adam, independent of the probe's optimizer (Karpathy's recipe)
    settle_batches: int = 8  # batches that re-estimate BatchNorm statistics for the train/eval
    # check (0: no check)
    batch_limit: int | None = None  # the time budget's cap on samples per step (the first ones
    # of each batch); None: batches as served
    requested_steps: int | None = None  # set when the time budget cut `steps` short
    precision: str = "fp32"  # fp16/bf16: forward and loss under torch.autocast (fp16 with a
    # GradScaler); the parameters stay float32

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.optimizer]

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r} (use {', '.join(OPTIMIZERS)})")
        if self.loss not in LOSSES:
            raise UserError(f"unknown loss {self.loss!r} (use {', '.join(LOSSES)})")
        if self.device not in DEVICES:
            raise UserError(f"unknown device {self.device!r} (use {', '.join(DEVICES)})")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r} (use {', '.join(PRECISIONS)})")
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise UserError(f"--lr must be a positive number, got {self.lr}")

    def describe(self) -> str:
        opt = self.optimizer
        extra = f", momentum {self.momentum:g}" if opt == "sgd" else ""
        if self.weight_decay:
            extra += f", weight decay {self.weight_decay:g}"
        batch = (
            f"{self.batch_size}"
            if self.batch_limit is None or self.batch_limit >= self.batch_size
            else f"{self.batch_limit} (the first of each batch of {self.batch_size})"
        )
        amp = f", {PRECISION_TEXT[self.precision]}" if self.precision in PRECISION_TEXT else ""
        return (
            f"{self.steps} steps of {opt} (lr {self.learning_rate:g}{extra}), batch size "
            f"{batch}, {self.loss} loss, seed {self.seed}{amp}"
        )


def probe_config(run: TrainingRun) -> ProbeConfig:
    """The settings of a run the probe trained (a watched run has the watcher's instead)."""
    config = run.config
    if not isinstance(config, ProbeConfig):
        raise TypeError(f"not a run of the probe: its config is a {type(config).__name__}")
    return config
