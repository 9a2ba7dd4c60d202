"""Synthetic data shaped for a model: `netdoctor probe --data synthetic` reads the input shape,
the vocabulary of token models and the number of classes off the model itself (the latter with
one no-grad forward of an example input)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from netdoctor.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from netdoctor.data.sources import DataSpec


def fit_synthetic(spec: DataSpec, model: nn.Module, notes: list[str]) -> None:
    """Synthetic data shaped for the model: the input shape (given or inferred), token ids below
    its embedding's vocabulary, and as many classes as it has outputs."""
    from netdoctor.loading.forward import ForwardFailure, example_input, run_forward
    from netdoctor.loading.shapes import first_layer, infer

    vocab = None
    found = first_layer(model)
    num_embeddings = getattr(found[1], "num_embeddings", None) if found is not None else None
    if num_embeddings is not None:
        vocab = int(num_embeddings)
    if spec.input_shape is None:
        inferred, _, _ = infer(model)
        if inferred is None:
            raise UserError(
                "synthetic data needs an input shape and none could be inferred "
                "from the model: pass --input-shape C,H,W"
            )
        notes.append(
            f"synthetic input shape {inferred.describe()} inferred from "
            f"{inferred.inferred_from}; pass --input-shape to set it"
        )
        spec.input_shape, spec.input_dtype = tuple(inferred.shape), inferred.dtype
        vocab = inferred.vocab or vocab
    if spec.input_dtype in ("long", "int64") and vocab:
        spec.vocab_size = spec.vocab_size or min(vocab, 100)
    if spec.num_classes is None:
        try:
            out = run_forward(
                model, example_input(tuple(spec.input_shape), spec.input_dtype, vocab=vocab)
            )
        except ForwardFailure:
            return
        from netdoctor.loading.forward import main_output

        logits = main_output(out)
        if logits is None:
            return
        shape = tuple(spec.input_shape)
        if logits.dim() == 2 and logits.shape[1] >= 2:
            spec.num_classes = int(logits.shape[1])
        elif (
            logits.dim() == 3
            and spec.input_dtype in ("long", "int64")
            and tuple(logits.shape[1:2]) == shape[:1]
            and logits.shape[2] >= 2
        ):
            spec.num_classes, spec.target_shape = int(logits.shape[2]), shape[:1]  # a tagger
        elif (
            logits.dim() == 4
            and len(shape) >= 2
            and tuple(logits.shape[2:]) == shape[-2:]
            and logits.shape[1] >= 2
        ):
            spec.num_classes, spec.target_shape = int(logits.shape[1]), shape[-2:]  # per pixel
