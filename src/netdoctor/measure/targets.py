"""How a model's output meets its targets: class indices or per-output targets, the loss the
probe trains with, and the number of correct predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from netdoctor.errors import UserError

IGNORE_INDEX = -100


def num_outputs(logits: torch.Tensor, y: torch.Tensor) -> int | None:
    """C for class-index targets: (N, C) vs (N,), (N, C, *S) vs (N, *S), (N, T, C) vs (N, T)."""
    if logits.dim() == 1:
        return 1
    if logits.dim() == 2:
        return logits.shape[1]
    if tuple(y.shape[1:]) == tuple(logits.shape[2:]):
        return logits.shape[1]
    if tuple(y.shape[1:]) == tuple(logits.shape[1:-1]):
        return logits.shape[-1]
    return logits.shape[1]


def class_targets(logits: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether y holds class indices for `logits` (rather than per-output targets)."""
    if y.is_floating_point() and tuple(y.shape) == tuple(logits.shape):
        return False
    if y.dtype == torch.bool:
        return False
    if tuple(y.shape) == tuple(logits.shape) and logits.dim() >= 2 and logits.shape[1] > 1:
        return False
    return y.dim() == logits.dim() - 1 or (logits.dim() == 2 and y.dim() == 1)


def check_targets(logits: torch.Tensor, y: torch.Tensor, loss: str) -> None:
    """UserError when the model's output and the targets cannot meet in the loss (a building
    block probed as if it were a classifier, a regression head with class labels...)."""
    out, tgt = tuple(logits.shape), tuple(y.shape)
    if class_targets(logits, y):
        lg_dim = logits.dim()
        fits = (
            lg_dim == 1
            and y.dim() == 1
            or lg_dim == 2
            and y.dim() == 1
            or lg_dim >= 3
            and (tgt[1:] == out[2:] or tgt[1:] == out[1:-1])
        )
        if fits and out[0] == tgt[0]:
            return
    elif out == tgt or (logits.numel() == y.numel() and out[0] == tgt[0]):
        return
    raise UserError(
        f"the model's output of shape {out} does not fit the targets of shape {tgt} for the "
        f"{loss} loss: the probe trains classifiers (outputs (N, C) with class labels (N,), or "
        "(N, C, ...) with (N, ...)) and models whose output has the targets' shape "
        "(--loss mse|bce); probe the whole model, not a building block"
    )


def class_axis_last(logits: torch.Tensor, y: torch.Tensor) -> bool:
    return (
        logits.dim() == 3
        and tuple(y.shape[1:]) == tuple(logits.shape[1:-1])
        and tuple(y.shape[1:]) != tuple(logits.shape[2:])
    )


def compute_loss(
    name: str, logits: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, number of correct predictions or None when accuracy has no meaning)."""
    is_class = class_targets(logits, y)
    if is_class:
        yl = y.long()
        lg = logits.movedim(-1, 1) if class_axis_last(logits, y) else logits
        if lg.dim() == 1:  # one output per sample with class-index targets: binary
            lg = lg.unsqueeze(1)
        correct = (
            (lg.argmax(1) == yl).sum() if lg.shape[1] > 1 else ((lg[:, 0] > 0).long() == yl).sum()
        )
        if name == "cross_entropy":
            if lg.shape[1] == 1:
                return F.binary_cross_entropy_with_logits(lg[:, 0], yl.float()), correct
            return F.cross_entropy(lg, yl, ignore_index=IGNORE_INDEX), correct
        target = (
            F.one_hot(yl.clamp_min(0), lg.shape[1]).movedim(-1, 1).to(lg.dtype)
            if lg.shape[1] > 1
            else yl.to(lg.dtype).unsqueeze(1)
        )
        if name == "mse":
            return F.mse_loss(lg, target), correct
        return F.binary_cross_entropy_with_logits(lg, target), correct
    target = y.to(logits.dtype)
    if target.shape != logits.shape and target.numel() == logits.numel():
        target = target.reshape(logits.shape)
    if name == "cross_entropy":  # soft labels (N, C)
        return F.cross_entropy(logits, target), None
    if name == "mse":
        return F.mse_loss(logits, target), None
    return F.binary_cross_entropy_with_logits(logits, target), None


def bad_labels(logits: torch.Tensor, y: torch.Tensor, loss: str) -> bool:
    if not class_targets(logits, y):
        return False
    c = num_outputs(logits, y) or 1
    c = max(c, 2) if c == 1 else c
    v = y.reshape(-1)
    if v.is_floating_point():
        v = v[torch.isfinite(v)]
        if bool((v != v.round()).any()):
            return loss == "cross_entropy"
        v = v.long()
    v = v[v != IGNORE_INDEX] if loss == "cross_entropy" else v
    return bool(((v < 0) | (v >= c)).any()) if v.numel() else False
