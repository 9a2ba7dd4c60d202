"""Finding an input shape when the user gave none: from the first layer, trying common sizes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from netdoctor.loading.forward import ForwardFailure, example_input, run_forward

_IMAGE_SIDES = {1: (28, 32, 224, 64, 96, 128, 256), 3: (32, 224, 64, 96, 128, 256, 299, 28)}


@dataclass
class InputSpec:
    shape: tuple[int, ...]
    dtype: str = "float32"
    vocab: int | None = None  # token models: ids are drawn below this
    inferred_from: str | None = None  # None when the user gave the shape

    def describe(self) -> str:
        return "x".join(str(s) for s in self.shape) + (
            "" if self.dtype == "float32" else f" ({self.dtype})"
        )


def first_layer(
    model: nn.Module, extra: dict[str, nn.Module] | None = None
) -> tuple[str, nn.Module] | None:
    for name, m in [*(extra or {}).items(), *model.named_modules()]:
        if isinstance(
            m,
            (
                nn.Conv1d,
                nn.Conv2d,
                nn.Conv3d,
                nn.ConvTranspose1d,
                nn.ConvTranspose2d,
                nn.Linear,
                nn.Embedding,
                nn.EmbeddingBag,
                nn.RNNBase,
            ),
        ):
            return name, m
    return None


def candidates(model: nn.Module, extra: dict[str, nn.Module] | None = None) -> list[InputSpec]:
    found = first_layer(model, extra)
    if found is None:
        return []
    name, m = found
    why = f"the first layer {name} ({type(m).__name__}"
    if isinstance(m, nn.Conv2d):
        c = m.in_channels
        sides = _IMAGE_SIDES.get(c, (32, 224, 64, 28))
        return [InputSpec((c, s, s), inferred_from=f"{why}, in_channels={c})") for s in sides]
    if isinstance(m, nn.ConvTranspose2d):  # a generator's latent (nz x 1 x 1) or a decoder
        c = m.in_channels
        return [
            InputSpec((c, s, s), inferred_from=f"{why}, in_channels={c})")
            for s in (1, 4, 7, 8, 16, 32)
        ]
    if isinstance(m, nn.ConvTranspose1d):
        return [
            InputSpec((m.in_channels, n), inferred_from=f"{why}, in_channels={m.in_channels})")
            for n in (1, 16, 128)
        ]
    if isinstance(m, nn.Conv1d):
        return [
            InputSpec((m.in_channels, n), inferred_from=f"{why}, in_channels={m.in_channels})")
            for n in (128, 256, 1000, 16000)
        ]
    if isinstance(m, nn.Conv3d):
        return [
            InputSpec((m.in_channels, d, s, s), inferred_from=f"{why})")
            for d, s in ((16, 112), (8, 32), (16, 64))
        ]
    if isinstance(m, nn.Linear):
        f = m.in_features
        out = [InputSpec((f,), inferred_from=f"{why}, in_features={f})")]
        side = math.isqrt(f)
        if side * side == f:
            out.append(InputSpec((1, side, side), inferred_from=f"{why}, in_features={f})"))
        if f % 3 == 0 and math.isqrt(f // 3) ** 2 == f // 3:
            s = math.isqrt(f // 3)
            out.append(InputSpec((3, s, s), inferred_from=f"{why}, in_features={f})"))
        return out
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return [
            InputSpec(
                (16,), "long", m.num_embeddings, inferred_from=f"{why}, {m.num_embeddings} tokens)"
            )
        ]
    if isinstance(m, nn.RNNBase):
        shape = (16, m.input_size) if m.batch_first else (16, m.input_size)
        return [InputSpec(shape, inferred_from=f"{why}, input_size={m.input_size})")]
    return []


def infer(
    model: nn.Module,
    extra: dict[str, nn.Module] | None = None,
    run: Callable[[InputSpec], None] | None = None,
) -> tuple[InputSpec | None, ForwardFailure | None, InputSpec | None]:
    """Try the candidate shapes; return (working spec, first failure, the spec that failed).
    `run(spec)` tries one (default: an eager forward); it raises ForwardFailure when the model
    does not take it."""

    def eager(spec: InputSpec) -> None:
        run_forward(model, example_input(spec.shape, spec.dtype, vocab=spec.vocab), extra)

    run = run or eager
    first_failure: ForwardFailure | None = None
    first_spec: InputSpec | None = None
    specs = candidates(model, extra) + (candidates(model) if extra else [])
    for spec in specs:
        try:
            run(spec)
        except ForwardFailure as f:
            if first_failure is None:
                first_failure, first_spec = f, spec
            continue
        return spec, None, None
    return None, first_failure, first_spec
