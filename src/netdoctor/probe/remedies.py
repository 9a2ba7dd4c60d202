"""Remedies: the in-memory version of a finding's fix, for the verified fix (`verify`).

A remedy edits a fresh deep copy of the model (`model_fn`), the input batches (`transform`) or
the optimizer settings (`config_fn`); the user's object and files are never touched. Fixes that
need a code change the probe cannot express in memory have no remedy (`remedy_for` -> None).
Remedies of different kinds combine; two of one kind (two data transforms, two learning-rate
changes) do not (`conflicts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from netdoctor.findings import Finding, Report
from netdoctor.measure.record import TrainingRun
from netdoctor.probe.engine import ProbeConfig


@dataclass
class Remedy:
    rule: str
    description: str  # what was changed, in words ("inputs scaled to [0, 1] (x / 255)")
    kind: str  # "model" | "data" | "lr" | "batchnorm"
    model_fn: Callable[[nn.Module], None] | None = None  # edits a copy of the model in place
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    lr_factor: float | None = None  # multiplies the learning rate
    retry: bool = False  # lr remedies: when no better, scale the lr again (at most twice)

    def config(self, base: ProbeConfig, times: int = 1) -> ProbeConfig:
        if self.lr_factor is None:
            return base
        return replace(base, lr=base.learning_rate * self.lr_factor**times)


def lr_remedy(rule: str, lr: float, factor: float, retry: bool = False) -> Remedy:
    return Remedy(rule, lr_text(lr, lr * factor), "lr", lr_factor=factor, retry=retry)


def lr_text(old: float, new: float) -> str:
    return f"learning rate {old:g} → {new:g}"


def conflicts(remedy: Remedy, chosen: list[Remedy]) -> bool:
    """Two changes of the data, or of the learning rate, do not stack; the same edit twice is
    one edit."""
    for other in chosen:
        if remedy.kind in ("data", "lr", "batchnorm") and other.kind == remedy.kind:
            return True
        if remedy.description == other.description:
            return True
    return False


# ------------------------------------------------------------------------------ model edits


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


def _insert_batchnorm(names: list[str]) -> Callable[[nn.Module], None]:
    def edit(model: nn.Module) -> None:
        for name, layer in _present(model, names):
            norm = _norm_after(layer)
            if norm is not None:
                _replace(model, name, nn.Sequential(layer, norm.to(_device_of(layer))))

    return edit


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _swap_to_relu(names: list[str]) -> Callable[[nn.Module], None]:
    def edit(model: nn.Module) -> None:
        for name, m in _present(model, names):
            if isinstance(m, (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign)):
                _replace(model, name, nn.ReLU())

    return edit


def _kaiming(names: list[str]) -> Callable[[nn.Module], None]:
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


def _bn_momentum(model: nn.Module) -> None:
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


def _identity(names: list[str]) -> Callable[[nn.Module], None]:
    def edit(model: nn.Module) -> None:
        for name in names:
            _replace(model, name, nn.Identity())

    return edit


def _is_activation_module(model: nn.Module, name: str | None) -> bool:
    if not name:
        return False
    try:
        return isinstance(model.get_submodule(name), _OUTPUT_ACTIVATIONS)
    except AttributeError:
        return False


def _init_scale(layers: list[tuple[str, float]]) -> Callable[[nn.Module], None]:
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


def _zero_last(name: str) -> Callable[[nn.Module], None]:
    def edit(model: nn.Module) -> None:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            return
        with torch.no_grad():
            for p in m.parameters(recurse=False):
                p.zero_()

    return edit


# ------------------------------------------------------------------------------ data edits


def _scale(factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x * factor if x.is_floating_point() else x


def _standardize(mean: Any, std: Any, axis: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
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
        m = float(mean[0] if isinstance(mean, (list, tuple)) else mean)
        s = float(std[0] if isinstance(std, (list, tuple)) else std)
        return (x - m) / max(s, 1e-8)

    return transform


# ------------------------------------------------------------------------------ the mapping


def remedy_for(
    finding: Finding, report: Report, run: TrainingRun, model: nn.Module | None = None
) -> Remedy | None:
    """The in-memory version of a finding's fix, or None when it needs a code change."""
    rule, ev = finding.rule, finding.evidence or {}
    lr = run.config.learning_rate
    if rule == "ND301":
        top = ev.get("range_max")
        if top:
            return Remedy(
                rule,
                f"inputs scaled to [0, 1] (x / {top:g})",
                "data",
                transform=_scale(1 / float(top)),
            )
        means, stds = ev.get("channel_mean"), ev.get("channel_std")
        if means and stds and len(means) > 1:
            return Remedy(
                rule,
                "inputs standardized per channel with the measured mean/std",
                "data",
                transform=_standardize(means, stds, 1),
            )
        m, s = ev.get("mean"), ev.get("std")
        if m is None or s is None or not (math.isfinite(m) and math.isfinite(s)):
            return None
        return Remedy(
            rule,
            f"inputs standardized: (x - {m:.4g}) / {s:.4g}",
            "data",
            transform=_standardize(m, s, None),
        )
    if rule == "ND302":
        axis, m, s = ev.get("axis"), ev.get("mean"), ev.get("std")
        if axis is None or not m or not s:
            return None
        word = "channel" if ev.get("word") == "channel" else "feature"
        return Remedy(
            rule,
            f"each input {word} standardized with its measured mean/std",
            "data",
            transform=_standardize(m, s, axis),
        )
    if rule == "ND102":
        acts = [a for a in ev.get("activations", []) if isinstance(a, str)]
        return (
            Remedy(
                rule,
                f"{len(acts)} sigmoid/tanh activations replaced by ReLU",
                "model",
                model_fn=_swap_to_relu(acts),
            )
            if acts
            else None
        )
    if rule == "ND101" or (rule == "ND403" and finding.cause is None):
        if rule == "ND101":
            layers = [d.get("module") for d in ev.get("layers", []) if isinstance(d, dict)]
        else:
            layers = [p.module for p in run.weight_layers()]
            layers = list(dict.fromkeys(layers))
        hidden = [n for n in layers[:-1] if n]
        return (
            Remedy(
                rule,
                f"BatchNorm inserted after {len(hidden)} hidden conv/linear layers",
                "model",
                model_fn=_insert_batchnorm(hidden),
            )
            if hidden
            else None
        )
    if rule == "ND202":
        names = sorted({f.module for f in report.findings if f.rule == "ND202" and f.module})
        return (
            Remedy(
                rule,
                f"{', '.join(names)} re-initialised (Kaiming normal)",
                "model",
                model_fn=_kaiming(names),
            )
            if names
            else None
        )
    if rule in ("ND203", "ND411"):
        return Remedy(rule, "BatchNorm momentum set to 0.1", "batchnorm", model_fn=_bn_momentum)
    if rule in ("ND105", "ND106"):
        if not _is_activation_module(model, finding.module):
            return None  # a functional softmax/relu in forward: a code change
        return Remedy(
            rule,
            f"{finding.module} removed from the output",
            "model",
            model_fn=_identity([finding.module]),
        )
    if rule == "ND201":
        layers = [
            (d["module"], float(d["expected"]))
            for d in ev.get("layers", [])
            if isinstance(d, dict) and d.get("module") and d.get("expected")
        ]
        return (
            Remedy(
                rule,
                f"{len(layers)} layer(s) re-initialised at the fan-in-preserving scale",
                "model",
                model_fn=_init_scale(layers),
            )
            if layers
            else None
        )
    lower = (
        rule in ("ND402", "ND404")
        or (rule == "ND406" and ev.get("direction") == "too-large")
        or (
            rule == "ND401"
            and finding.fix is not None
            and finding.fix.summary.startswith("lower the learning rate")
        )
    )
    if lower:
        return lr_remedy(rule, lr, 0.1, retry=True)
    if (
        rule == "ND406"
        and ev.get("direction") == "too-small"
        and finding.fix is not None
        and finding.fix.patch
    ) or (rule == "ND407" and finding.cause is None):
        return lr_remedy(rule, lr, 10.0)
    if rule == "ND408" and ev.get("loss_at_init", 0) > ev.get("expected", math.inf):
        last = next((p.module for p in reversed(run.weight_layers())), None)
        return (
            Remedy(rule, f"{last} initialised to zero", "model", model_fn=_zero_last(last))
            if last
            else None
        )
    return None
