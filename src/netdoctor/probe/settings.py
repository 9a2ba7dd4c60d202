"""What `netdoctor probe` was asked for beyond the model and its rules: the data, the training
run's settings, the time budget, the verified fix. Filled by the CLI from its flags and
`[tool.netdoctor.probe]`; torch-free."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ProbeSettings:
    data: str  # fashionmnist, mnist, synthetic, FILE.npz or path.py:loader_fn
    data_dir: str | None = None  # the folder of the built-in sets
    resize: int | None = None
    raw: bool = False  # built-in sets: the stored 0..255 values
    normalize: bool = False  # built-in sets: per-channel mean/std normalization
    steps: int = 100
    batch_size: int = 64
    batch_given: bool = False  # the user chose the batch size: the time budget keeps it
    lr: float | None = None  # None: the optimizer's default
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    loss: str = "cross_entropy"
    device: str = "auto"
    precision: str = "fp32"  # fp32, fp16 (autocast + GradScaler) or bf16 (autocast)
    verify: bool = True  # re-run with the top fix applied in memory
    time_budget: float | None = None  # seconds for the whole probe; None: no budget
    started: float | None = None  # time.monotonic() when the command began (default: now)
    download: bool = True  # fetch missing built-in files
    data_mirror: str | None = None
    plot: str | None = None  # write the gradient-flow plot there (PNG)
