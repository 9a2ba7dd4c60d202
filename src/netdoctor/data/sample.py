"""A sample of the data, as the data rules (ND3xx: `netdoctor check --data`, `netdoctor probe`) see
it, and the one place that runs data through a model to measure it against the data.

The rules read `ctx.data` (`netdoctor.rules.contexts.DataContext`), a `DataSample`. Build one
with `sample_data(source, model)` (draws the first batches of an opened
`netdoctor.data.DataSource` and measures the model's output size), or construct it directly:

    DataSample(x=x, y=y, description="my tensors")            # nothing known about the model
    DataSample(x, y, "FashionMNIST ...", num_outputs=10, loss="cross_entropy")

Only `x` and `y` are required; every other field refines what the rules may conclude:

* `num_outputs` (C) enables the label-range checks of ND303; `output_shape` tells class-index
  targets (y of shape (N,) or (N, H, W) against outputs (N, C[, H, W])) from per-output targets
  (y shaped like the output: regression, multi-label, soft labels), which ND303 leaves alone.
* `loss`: the loss the probe trains with (``"cross_entropy"``, ``"nll"``, ``"mse"``, ...). None
  means unknown: class-index targets are then recognised from y's dtype and shape.
* `builtin` / `raw` / `normalized`: how a built-in set was served (`--raw`, `--normalize`), so
  fixes can say "drop --raw".
* `num_classes`: classes the source *declares* (built-in sets); None when only inferred from
  labels (synthetic data has as many classes as it was asked for, so it declares nothing).
* `model_input`: statistics of what the model's first weight layer (Linear/Conv/RNN) received on
  a few samples; when the raw data is off-scale but this is at unit scale, the model rescales its
  input itself (e.g. ``x / 255`` inside forward) and ND301 stays silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from netdoctor.loading.forward import main_output
from netdoctor.measure.inputs import unit_stats

# Losses whose targets are class indices (the names the probe uses, case-insensitive).
CLASS_INDEX_LOSSES = {
    "cross_entropy",
    "crossentropy",
    "crossentropyloss",
    "ce",
    "nll",
    "nll_loss",
    "nllloss",
}

_WEIGHT_LAYERS = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.RNNBase)


@dataclass
class DataSample:
    """A sample of the data, as the ND3xx rules see it.

    x: inputs of a few batches concatenated (N, ...). Float inputs are checked for scale;
        integer inputs (token ids) are not.
    y: the matching targets (N, ...).
    description: one line saying what was sampled (goes into the report's notes).
    num_outputs: the model's output size C (classes), from an eval-mode forward of a couple of
        samples; None when no model was given or its forward failed.
    output_shape: the full output shape of that forward (batch of `probe_batch`), or None.
    loss: the loss in use when known ("cross_entropy", "nll", "mse", "bce", ...); None: unknown.
    source: the data source string (``"fashionmnist"``, ``"data.npz"``, ``"file.py:fn"``).
    builtin: a built-in set (fashionmnist/mnist) served by netdoctor.
    raw: a built-in set served raw (0..255, ``--raw``).
    normalized: a built-in set served with ``--normalize``.
    num_classes: classes the source declares (built-in sets); None when unknown.
    batch_size: samples per batch when netdoctor did the batching (to name batch/row).
    model_input: stats of the first weight layer's input on `probe_batch` samples:
        {"module", "mean", "std", "abs_q999"}; None when unknown.
    notes: lines for the report (e.g. the model's forward failed on the data).
    """

    x: torch.Tensor
    y: torch.Tensor
    description: str = ""
    num_outputs: int | None = None
    output_shape: tuple[int, ...] | None = None
    loss: str | None = None
    source: str | None = None
    builtin: bool = False
    raw: bool = False
    normalized: bool = False
    num_classes: int | None = None
    batch_size: int | None = None
    model_input: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_source(cls, source, n_batches: int = 4, spec=None) -> DataSample:
        """Draw the first `n_batches` batches of an opened DataSource (no model involved)."""
        from netdoctor.data.builtin import BUILTIN_SETS, BuiltinSource

        x, y = source.sample(n_batches)
        name = getattr(spec, "source", None)
        key = (name or "").strip().lower().replace("-", "").replace("_", "")
        if spec is not None:
            builtin = key in BUILTIN_SETS
            raw = bool(spec.raw) and builtin
            normalized = bool(spec.normalize) and builtin
        else:  # read it off the source itself
            builtin = isinstance(source, BuiltinSource)
            raw = builtin and "(raw)" in source.description
            normalized = builtin and "normalized" in source.description
        return cls(
            x=x,
            y=y,
            description=source.description,
            source=name,
            builtin=builtin,
            raw=raw,
            normalized=normalized,
            num_classes=source.num_classes if builtin else None,
            batch_size=source.batch_size,
        )

    def for_model(self, model: nn.Module | None, probe_batch: int = 8) -> DataSample:
        """A copy with num_outputs / output_shape / model_input measured on `model`.

        Runs one no-grad eval-mode forward of the first `probe_batch` samples (modes restored);
        a failing forward leaves those fields None and adds a note.
        """
        out = replace(
            self, notes=list(self.notes), num_outputs=None, output_shape=None, model_input=None
        )
        if model is None or self.x.shape[0] == 0:
            return out
        from netdoctor.loading.forward import ForwardFailure, run_forward

        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        if self.x[0].numel() > 100_000:  # ImageNet-sized inputs: two samples say enough
            probe_batch = min(probe_batch, 2)
        xb = self.x[:probe_batch].to(device)
        seen: dict[str, Any] = {}
        names = {m: n for n, m in model.named_modules()}

        def pre(mod, args):
            if seen or not args or not isinstance(args[0], torch.Tensor):
                return
            t = args[0]
            if t.is_floating_point():
                seen.update(unit_stats(t.detach()), module=names.get(mod) or type(mod).__name__)

        handles = [
            m.register_forward_pre_hook(pre)
            for m in model.modules()
            if isinstance(m, _WEIGHT_LAYERS)
        ]
        try:
            result = run_forward(model, xb)
        except ForwardFailure as e:
            where = f" in {e.module}" if e.module else ""
            out.notes.append(
                f"data: the model's forward failed on a data batch of shape "
                f"{tuple(xb.shape)}{where} ({e}); label checks against the "
                "model's outputs skipped"
            )
            return out
        finally:
            for h in handles:
                h.remove()
        logits = main_output(result)
        if logits is not None:
            out.output_shape = tuple(logits.shape)
            out.num_outputs = _classes_from_output(tuple(logits.shape), tuple(self.y.shape))
        out.model_input = seen or None
        return out


def sample_data(
    source, model: nn.Module | None = None, n_batches: int = 4, spec=None
) -> DataSample:
    """Draw a DataSample from an opened DataSource and, given a model, measure its outputs.

    `spec` (the DataSpec the source was opened with) lets the rules know a built-in set was
    served raw or normalized; without it the sample says nothing about that.
    """
    return DataSample.from_source(source, n_batches, spec).for_model(model)


# -- helpers ------------------------------------------------------------------------------------


def _classes_from_output(out: tuple[int, ...], y: tuple[int, ...]) -> int | None:
    """C of the output, reading class-index conventions: (N, C), (N, C, *S) against y (N, *S),
    (N, T, C) against y (N, T)."""
    if len(out) == 1:
        return 1
    if len(out) == 2:
        return out[1]
    if len(y) >= 1 and tuple(y[1:]) == tuple(out[2:]):
        return out[1]
    if len(y) >= 1 and tuple(y[1:]) == tuple(out[1:-1]):
        return out[-1]
    return out[1]
