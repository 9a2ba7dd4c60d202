"""`--data synthetic`: a task a healthy model of the requested input shape learns within the
default probe (100 steps of SGD, lr 0.01, momentum 0.9, batch 64), so a stalled loss on it means
something.

What is generated depends on the input shape and dtype, and on what the model predicts
(`DataSpec.target_shape`: one class per sample, or one per token / pixel):

* images (float, shape (C, H, W) or (H, W)): each class has a smooth random template (a coarse
  random grid, bilinearly upsampled, per channel); a sample is its class's template at a small
  random shift (up to ~7% of the side) plus independent noise -- the way a digit or a garment
  varies. Templates make the task spatial, so convolutions and pooling learn it as readily as
  an MLP does.
* vectors (float, shape (D,)): each class is a mixture of two Gaussian clusters around random
  centres (a class is not one blob). (A random teacher network on standard
  normal inputs was tried first: an MLP learns it too slowly for a 100-step probe -- loss
  2.30 -> 1.9 -- so a stall on it would not mean much.)
* token ids (long, shape (T,)): each class owns a few marker tokens; a sequence is filler tokens
  with some markers of its class at random positions, so the class is *which* markers occur
  (an LSTM, a transformer with pooling, or embedding + pooling all learn it).
* per-token targets (a tagger, output (B, T, C)): each token id has a fixed tag.
* per-pixel targets (a segmentation net, output (B, C, H, W)): each image is a smooth random
  field plus noise; a pixel's class is the band its field value falls in.

Inputs are at unit scale (mean ~0, std ~1), so the data rules have nothing to say about them.
Everything depends only on the seed: the same seed gives the same batches. A pool of
`max_samples` (default 1024) samples is generated batch by batch on demand (each batch from its
own seed) and cycled; each pass visits the pool's batches in a seeded order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from netdoctor.data.base import (
    DataSource,
    DataSpec,
    check_spec,
    epoch_order,
    resize,
    resized_shape,
)
from netdoctor.errors import UserError

DEFAULT_SAMPLES = 1024
DEFAULT_VOCAB = 100
DEFAULT_CLASSES = 10

# Calibrated on the fixtures (benchmarks/synthetic_calibration.py, table in rules/ND407.md):
# a healthy model learns these within the default probe, a sick one still shows its symptom.
SIGNAL = 0.8  # images: the template's share of a sample's standard deviation (the rest: noise)
SHIFT = 0.07  # images: largest random shift, as a share of the image side
CLUSTERS = 2  # vectors: Gaussian clusters per class
MARKERS_PER_CLASS = 2  # tokens: marker ids owned by each class
MARKER_SHARE = 0.5  # tokens: share of a sequence's positions holding markers of its class
FIELD_NOISE = 0.3  # per-pixel targets: noise over the unit-scale field

FLOAT_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
LONG_DTYPES = ("long", "int64")


def _seed_for(seed: int, *parts: Any) -> int:
    ss = np.random.SeedSequence(
        [seed & 0xFFFFFFFF] + [p if isinstance(p, int) else sum(map(ord, str(p))) for p in parts]
    )
    return int(ss.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


def _smooth(n: int, channels: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """n smooth random patterns (n, channels, h, w), each with mean 0 and std 1: a coarse grid
    of normal values (about one node per 4 pixels, 2 to 8 per side) upsampled bilinearly."""
    gh, gw = (max(2, min(8, round(s / 4))) if s >= 4 else s for s in (h, w))
    coarse = torch.randn(n, channels, gh, gw, generator=g)
    if (gh, gw) == (h, w):
        out = coarse
    else:
        out = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    flat = out.reshape(n, -1)
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)
    return flat.reshape(n, channels, h, w)


class SyntheticSource(DataSource):
    """The synthetic data source: see the module docstring."""

    def __init__(self, spec: DataSpec) -> None:
        self._bs = check_spec(spec)
        shape = _parse_shape(spec.input_shape)
        dtype_name = spec.input_dtype.lower()
        if dtype_name in LONG_DTYPES:
            self._dtype = torch.int64
        elif dtype_name in FLOAT_DTYPES:
            self._dtype = FLOAT_DTYPES[dtype_name]
        else:
            raise UserError(
                f"unknown input dtype {spec.input_dtype!r}: use float32, float64, "
                "float16, bfloat16 or long (token ids)"
            )
        classes = spec.num_classes if spec.num_classes is not None else DEFAULT_CLASSES
        if classes < 1:
            raise UserError(f"number of classes must be at least 1, got {classes}")
        self._vocab = spec.vocab_size or DEFAULT_VOCAB
        if self._vocab < 1:
            raise UserError(f"vocab size must be at least 1, got {self._vocab}")
        tokens = self._dtype == torch.int64
        if tokens and spec.resize:
            raise UserError("cannot resize synthetic token ids (input dtype long): drop --resize")
        if spec.resize and len(shape) < 2:
            raise UserError(
                f"cannot resize synthetic inputs of shape {shape}: resize needs "
                "image-shaped inputs (C, H, W) or (H, W)"
            )
        target = tuple(spec.target_shape or ())
        self._shape, self._classes, self._seed = shape, classes, spec.seed
        self._resize = spec.resize
        self._n = spec.max_samples or DEFAULT_SAMPLES
        self._n_batches = math.ceil(self._n / self._bs)
        self._task = _task(shape, tokens, target)
        self._prepare()
        self.num_samples = self._n
        self.batch_size = self._bs
        self.num_classes = classes
        self.sample_shape = resized_shape(shape, spec.resize)
        resized = f", resized to {spec.resize}x{spec.resize}" if spec.resize else ""
        self.description = (
            f"synthetic, {self._n} samples of shape {shape}, {self._describe()}{resized}"
        )

    # -- the tasks ---------------------------------------------------------------------
    def _prepare(self) -> None:
        g = torch.Generator().manual_seed(_seed_for(self._seed, "task"))
        c, task = self._classes, self._task
        if task == "templates":
            ch, h, w = _image_dims(self._shape)
            self._pad = round(SHIFT * min(h, w)) if min(h, w) >= 8 else 0
            self._templates = _smooth(c, ch, h + 2 * self._pad, w + 2 * self._pad, g)
        elif task == "clusters":
            d = self._shape[0]
            self._centers = torch.randn(c, CLUSTERS, d, generator=g)
        elif task == "markers":
            per = max(1, min(MARKERS_PER_CLASS, (self._vocab - 1) // (2 * c)))
            ids = torch.randperm(self._vocab, generator=g)
            if self._vocab < c * per + 1:
                raise UserError(
                    f"synthetic token data needs a vocabulary of at least "
                    f"{c + 1} ids for {c} classes, got {self._vocab}"
                )
            self._markers = ids[: c * per].reshape(c, per)
            self._filler = ids[c * per :]
        elif task == "tags":
            self._tags = torch.arange(self._vocab)[torch.randperm(self._vocab, generator=g)] % c
        # "field" needs nothing fixed: each image draws its own field

    def _describe(self) -> str:
        c, task = self._classes, self._task
        if task == "templates":
            return (
                f"{c} classes: a smooth random template per class at a random shift of "
                f"up to {self._pad} px, plus noise (template {SIGNAL:g} of the std)"
            )
        if task == "clusters":
            return (
                f"{c} classes, each a mixture of {CLUSTERS} random Gaussian clusters "
                f"(centre {SIGNAL:g} of the std)"
            )
        if task == "markers":
            per = self._markers.shape[1]
            return (
                f"token ids in [0, {self._vocab}), {c} classes: each class owns {per} "
                "marker tokens, and a sequence holds markers of its class among filler "
                "tokens"
            )
        if task == "tags":
            return f"token ids in [0, {self._vocab}), one of {c} tags per token id"
        return (
            f"{c} classes per pixel: each image is a smooth random field plus noise, a "
            "pixel's class is the band its field value falls in"
        )

    def _make_batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = min(self._bs, self._n - k * self._bs)
        g = torch.Generator().manual_seed(_seed_for(self._seed, "batch", k))
        c, task = self._classes, self._task
        if task == "templates":
            y = torch.randint(0, c, (size,), generator=g)
            ch, h, w = _image_dims(self._shape)
            p = self._pad
            if p:
                dy = torch.randint(0, 2 * p + 1, (size,), generator=g).tolist()
                dx = torch.randint(0, 2 * p + 1, (size,), generator=g).tolist()
                crops = torch.stack(
                    [
                        self._templates[int(t), :, a : a + h, b : b + w]
                        for t, a, b in zip(y.tolist(), dy, dx)
                    ]
                )
            else:
                crops = self._templates[y]
            noise = torch.randn(size, ch, h, w, generator=g)
            x = SIGNAL * crops + math.sqrt(1 - SIGNAL**2) * noise
            x = x.reshape(size, *self._shape)
        elif task == "clusters":
            y = torch.randint(0, c, (size,), generator=g)
            which = torch.randint(0, self._centers.shape[1], (size,), generator=g)
            noise = torch.randn(size, self._shape[0], generator=g)
            x = SIGNAL * self._centers[y, which] + math.sqrt(1 - SIGNAL**2) * noise
        elif task == "markers":
            t = self._shape[0]
            y = torch.randint(0, c, (size,), generator=g)
            x = self._filler[torch.randint(0, len(self._filler), (size, t), generator=g)]
            n_mark = max(1, round(MARKER_SHARE * t))
            pos = torch.rand(size, t, generator=g).argsort(1)[:, :n_mark]
            pick = torch.randint(0, self._markers.shape[1], (size, n_mark), generator=g)
            x.scatter_(1, pos, self._markers[y.unsqueeze(1), pick])
        elif task == "tags":
            x = torch.randint(0, self._vocab, (size, *self._shape), generator=g)
            y = self._tags[x]
        else:  # field
            ch, h, w = _image_dims(self._shape)
            field = _smooth(size, 1, h, w, g)
            edges = torch.tensor([_normal_quantile(i / c) for i in range(1, c)])
            y = torch.bucketize(field[:, 0], edges)
            noise = torch.randn(size, ch, h, w, generator=g)
            x = (field.expand(size, ch, h, w) + FIELD_NOISE * noise) / math.sqrt(1 + FIELD_NOISE**2)
            x = x.reshape(size, *self._shape)
        if self._dtype != torch.int64:
            x = x.to(self._dtype)
        if self._resize:
            x = resize(x, self._resize, "synthetic")
        return x, y.to(torch.int64)

    def _epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = (
            range(self._n_batches)
            if epoch == 0
            else epoch_order(self._n_batches, self._seed, epoch).tolist()
        )
        for k in order:
            yield self._make_batch(k)


def _parse_shape(input_shape) -> tuple[int, ...]:
    if input_shape is None:
        raise UserError(
            "synthetic data needs a per-sample input shape: pass --input-shape "
            "(e.g. --input-shape 1,28,28, without the batch dimension)"
        )
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise UserError(
            f"input shape must be a list of positive integers, got {input_shape!r}"
        ) from None
    if not shape or any(d < 1 for d in shape):
        raise UserError(f"input shape must be a list of positive integers, got {shape}")
    return shape


def _image_dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) of an image-like shape: the last two axes are spatial, the
    leading ones are channels."""
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _task(shape: tuple[int, ...], tokens: bool, target: tuple[int, ...]) -> str:
    if tokens:
        return "tags" if target and target == shape else "markers"
    if target and len(shape) >= 2 and target == shape[-2:]:
        return "field"
    return "templates" if len(shape) >= 2 else "clusters"


def _normal_quantile(p: float) -> float:
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))
