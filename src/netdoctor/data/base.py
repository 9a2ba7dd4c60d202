"""What every data source shares: `DataSpec` (what to open and how to serve it), the
`DataSource` base class (batches, samples), and the helpers the sources use (spec checks, seeded
epoch orders, image resizing, label counting)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from netdoctor.errors import UserError

__all__ = [
    "Batch",
    "DataSource",
    "DataSpec",
    "check_spec",
    "default_data_dir",
    "epoch_order",
    "fmt_float",
    "infer_num_classes",
    "resize",
    "resized_shape",
]


def default_data_dir() -> Path:
    """The data folder used when `DataSpec.data_dir` is None.

    ``$NETDOCTOR_DATA_DIR`` when set (and not empty), else ``~/.cache/netdoctor/data``.
    """
    env = os.environ.get("NETDOCTOR_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/netdoctor/data").expanduser()


@dataclass
class DataSpec:
    """What data to open and how to serve it.

    source: ``"fashionmnist"`` | ``"mnist"`` | ``"synthetic"`` | ``"path/file.npz"`` |
        ``"path/file.py:fn"`` | ``"dotted.module:fn"``.
    data_dir: folder holding the built-in sets (``DIR/FashionMNIST/raw/...``,
        ``DIR/MNIST/raw/...``). None means ``$NETDOCTOR_DATA_DIR`` when set, else
        ``~/.cache/netdoctor/data`` (see `default_data_dir`).
    batch_size: samples per batch (built-ins, npz, synthetic; a loader function batches itself).
    resize: resize images to ``resize x resize`` (bilinear) for models expecting e.g. 224.
        Applies to every source whose x is a float image batch (N, C, H, W) or (N, H, W).
    raw: built-in sets only: serve the stored 0..255 values as float32 instead of [0, 1].
    normalize: built-in sets only: per-channel mean/std normalization, the statistics
        computed from (up to 10000 of) the samples served.
    seed: shuffling / synthetic generation seed; the same seed gives the same batches.
    train: built-in sets: train split (True) or test split (False).
    input_shape: synthetic only: per-sample shape (no batch dim); required there.
    input_dtype: synthetic: ``"float32"`` (unit-scale values; also float64/float16/bfloat16)
        or ``"long"`` (token ids in [0, vocab)). For npz, ``"long"`` keeps integer x as int64.
    num_classes: synthetic only: number of label classes (default 10).
    max_samples: cap on samples read (built-ins: a seeded random subset; npz: the first ones;
        synthetic: the size of the generated pool, default 1024). None: all of them.
    vocab_size: synthetic with ``input_dtype="long"``: token vocabulary (default 100).
    target_shape: synthetic only: per-sample target shape; None or () for one class per
        sample, the token shape (T,) for one tag per token, (H, W) for one class per pixel.
    download: built-in sets only: download the standard files that are missing from the data
        folder (False: fail with "not found" instead; nothing is fetched when they are there).
    mirror: built-in sets only: URL of a folder serving the set's four ``.gz`` files (default
        ``$NETDOCTOR_DATA_MIRROR``, else the public mirrors; the published checksums apply).
    """

    source: str
    data_dir: Path | None = None
    batch_size: int = 64
    resize: int | None = None
    raw: bool = False
    normalize: bool = False
    seed: int = 0
    train: bool = True
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "float32"
    num_classes: int | None = None
    max_samples: int | None = None
    vocab_size: int | None = None
    target_shape: tuple[int, ...] | None = None
    download: bool = True
    mirror: str | None = None


Batch = tuple[torch.Tensor, torch.Tensor]


class DataSource:
    """An opened data source.

    Attributes:
        description: one human line saying what is served, e.g. ``"FashionMNIST train (raw/
            under DIR), 60000 samples, served as float32 in [0, 1]"``.
        num_classes: known (built-ins, synthetic) or inferred from integer labels
            (max label + 1); None for float targets.
        sample_shape: per-sample input shape (no batch dim), after any resize.
        num_samples: samples in one pass over the data, None when unknown (loader functions).
        batch_size: samples per batch where netdoctor does the batching, else None.
    """

    description: str
    num_classes: int | None
    sample_shape: tuple[int, ...] | None
    num_samples: int | None = None
    batch_size: int | None = None

    def _epoch(self, epoch: int) -> Iterator[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def batches(self, n: int | None = None) -> Iterator[Batch]:
        """Yield up to n batches (x, y), cycling the data if it has fewer batches.

        ``n=None`` yields one pass over the data. Deterministic for a seed: each pass is
        reshuffled, but with an order fixed by (seed, pass number).
        """
        if n is None:
            yield from self._epoch(0)
            return
        if n <= 0:
            return
        count = 0
        for epoch in itertools.count():
            yielded = 0
            for batch in self._epoch(epoch):
                yield batch
                yielded += 1
                count += 1
                if count >= n:
                    return
            if yielded == 0:
                raise UserError(f"{self._name()} yielded no batches")

    def sample(self, n_batches: int = 4) -> Batch:
        """Concatenate the first n batches (used by data rules); never repeats samples."""
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        for x, y in itertools.islice(self._epoch(0), max(1, n_batches)):
            xs.append(x)
            ys.append(y)
        if not xs:
            raise UserError(f"{self._name()} yielded no batches")
        return _cat(xs, "x", self._name()), _cat(ys, "y", self._name())

    def _name(self) -> str:
        return self.description.split(",")[0]

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.description}>"


def _cat(parts: list[torch.Tensor], what: str, name: str) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    try:
        return torch.cat(parts, dim=0)
    except RuntimeError:
        shapes = ", ".join(str(tuple(p.shape)) for p in parts)
        raise UserError(
            f"{name}: batches have {what} of different shapes ({shapes}), "
            "so they cannot be sampled together"
        ) from None


def resize(x: torch.Tensor, size: int, where: str) -> torch.Tensor:
    """Bilinear resize of an image batch (N, C, H, W) or (N, H, W) to size x size."""
    if not x.is_floating_point():
        raise UserError(
            f"cannot resize {where}: inputs are {str(x.dtype).replace('torch.', '')}, "
            "resize needs float images"
        )
    if x.dim() == 4:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if x.dim() == 3:
        out = F.interpolate(x.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
        return out.squeeze(1)
    raise UserError(
        f"cannot resize {where}: inputs have shape {tuple(x.shape)}, resize needs image "
        "batches shaped (N, C, H, W) or (N, H, W)"
    )


def resized_shape(shape: tuple[int, ...], size: int | None) -> tuple[int, ...]:
    if size is None or len(shape) < 2:
        return shape
    return tuple(shape[:-2]) + (size, size)


def check_spec(spec: DataSpec) -> int:
    if not isinstance(spec.batch_size, int) or spec.batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {spec.batch_size!r}")
    if spec.resize is not None and (not isinstance(spec.resize, int) or spec.resize < 1):
        raise UserError(f"resize must be a positive integer, got {spec.resize!r}")
    if spec.max_samples is not None and spec.max_samples < 1:
        raise UserError(f"max samples must be a positive integer, got {spec.max_samples!r}")
    return spec.batch_size


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n), fixed by (seed, epoch); epoch >= -1 (-1: subset choice)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch + 1, 0x5EED]).permutation(n)


def infer_num_classes(y: torch.Tensor) -> int | None:
    if (
        y.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
        and y.dim() == 1
        and y.numel() > 0
    ):
        lo, hi = int(y.min()), int(y.max())
        if lo >= 0:
            return hi + 1
    return None


def fmt_float(v: float) -> str:
    return f"{v:.4g}"
