"""Fixes applied in memory, for the verified fix: edits of a fresh copy of the model and
transforms of the input batches that a rule's remedy hands the probe (`Remedy.model_fn`,
`Remedy.transform`). The user's model object and files are never touched: the probe edits its
own deep copy.

Each function returns the edit; rule modules import this module inside their remedy (it
imports torch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

# -- model edits ---------------------------------------------------------------------------------


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None
    return (parent, attr) if attr in parent._modules else None


def _replace(model: nn.Module, name: str, new: nn.Module) -> bool:
    found = _parent(model, name)
    if found is None:
        return False
    parent, attr = found
    setattr(parent, attr, new)
    return True


def _norm_after(module: nn.Module) -> nn.Module | None:
    if isinstance(module, nn.Conv2d):
        return nn.BatchNorm2d(module.out_channels)
    if isinstance(module, nn.Conv1d):
        return nn.BatchNorm1d(module.out_channels)
    if isinstance(module, nn.Conv3d):
        return nn.BatchNorm3d(module.out_channels)
    if isinstance(module, nn.Linear):
        return nn.BatchNorm1d(module.out_features)
    return None


def _present(model: nn.Module, names: list[str]) -> Iterator[tuple[str, nn.Module]]:
    """The named submodules that exist in this copy of the model."""
    for name in names:
        try:
            yield name, model.get_submodule(name)
        except AttributeError:
            continue


def insert_batchnorm(names: list[str]) -> Callable[[nn.Module], None]:
    def edit(model: nn.Module) -> None:
        for name, layer in _present(model, names):
            norm = _norm_after(layer)
            if norm is not None:
                _replace(model, name, nn.Sequential(layer, norm.to(_device_of(layer))))

    return edit


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def swap_to_relu(names: list[str]) -> Callable[[nn.Module], None]:
    def edit(model: nn.Module) -> None:
        for name, m in _present(model, names):
            if isinstance(m, (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign)):
                _replace(model, name, nn.ReLU())

    return edit


def kaiming(names: list[str]) -> Callable[[nn.Module], None]:
    def edit(model: nn.Module) -> None:
        for _name, m in _present(model, names):
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                with torch.no_grad():
                    nn.init.kaiming_normal_(w, nonlinearity="relu")
                    b = getattr(m, "bias", None)
                    if isinstance(b, torch.Tensor):
                        b.zero_()

    return edit


def bn_momentum(model: nn.Module) -> None:
    for m in model.modules():
        if (
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.momentum is not None
            and (m.momentum == 0 or m.momentum >= 0.5)
        ):
            m.momentum = 0.1


_OUTPUT_ACTIVATIONS = (
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softmin,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
)


def identity(names: list[str]) -> Callable[[nn.Module], None]:
    def edit(model: nn.Module) -> None:
        for name in names:
            _replace(model, name, nn.Identity())

    return edit


def is_activation_module(model: nn.Module | None, name: str | None) -> bool:
    if not name or model is None:
        return False
    try:
        return isinstance(model.get_submodule(name), _OUTPUT_ACTIVATIONS)
    except AttributeError:
        return False


def init_scale(layers: list[tuple[str, float]]) -> Callable[[nn.Module], None]:
    def edit(model: nn.Module) -> None:
        for name, std in layers:
            try:
                w = getattr(model.get_submodule(name), "weight", None)
            except AttributeError:
                continue
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                with torch.no_grad():
                    nn.init.normal_(w, mean=0.0, std=std)

    return edit


def zero_parameters(name: str) -> Callable[[nn.Module], None]:
    def edit(model: nn.Module) -> None:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            return
        with torch.no_grad():
            for p in m.parameters(recurse=False):
                p.zero_()

    return edit


# -- data edits ----------------------------------------------------------------------------------


def scale(factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x * factor if x.is_floating_point() else x


def standardize(mean: Any, std: Any, axis: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    def transform(x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return x
        if (
            isinstance(mean, (list, tuple))
            and axis is not None
            and len(mean) > 1
            and x.dim() > axis
            and x.shape[axis] == len(mean)
        ):
            shape = [1] * x.dim()
            shape[axis] = len(mean)
            m = torch.tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
            s = torch.tensor(
                [max(float(v), 1e-8) for v in std], dtype=x.dtype, device=x.device
            ).reshape(shape)
            return (x - m) / s
        m0 = float(mean[0] if isinstance(mean, (list, tuple)) else mean)
        s0 = float(std[0] if isinstance(std, (list, tuple)) else std)
        return (x - m0) / max(s0, 1e-8)

    return transform
