"""Verified fixes: apply the report's top fix in memory and re-run the probe, before vs after.

The fix is applied to a fresh deep copy of the model, to the input batches (a transform) or to
the optimizer settings; the user's object and files are never touched. The re-run uses the same
batches (sources are deterministic for a seed), the same number of steps and no
instrumentation. Only fixes that can be expressed in memory are verified; the others get a note.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from netdoctor.findings import Finding, Report
from netdoctor.measure.record import TrainingRun
from netdoctor.probe.engine import ProbeConfig, run_probe


@dataclass
class Remedy:
    rule: str
    description: str  # what was changed, in words ("inputs scaled by 1/255")
    model_fn: Callable[[nn.Module], None] | None = None  # edits a copy of the model in place
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    config: ProbeConfig | None = None
    retry_factor: float | None = None  # lr fixes: if no better, scale the lr again (twice)


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
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None and (
                m.momentum == 0 or m.momentum >= 0.5):
            m.momentum = 0.1


_OUTPUT_ACTIVATIONS = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
                       nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus)


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
        if isinstance(mean, (list, tuple)) and axis is not None and len(mean) > 1 \
                and x.dim() > axis and x.shape[axis] == len(mean):
            shape = [1] * x.dim()
            shape[axis] = len(mean)
            m = torch.tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
            s = torch.tensor([max(float(v), 1e-8) for v in std], dtype=x.dtype,
                             device=x.device).reshape(shape)
            return (x - m) / s
        m = float(mean[0] if isinstance(mean, (list, tuple)) else mean)
        s = float(std[0] if isinstance(std, (list, tuple)) else std)
        return (x - m) / max(s, 1e-8)
    return transform


# ------------------------------------------------------------------------------ the mapping

def remedy_for(finding: Finding, report: Report, run: TrainingRun,
               model: nn.Module | None = None) -> Remedy | None:
    """The in-memory version of a finding's fix, or None when it needs a code change."""
    rule, ev = finding.rule, finding.evidence or {}
    cfg = run.config
    if rule == "ND301":
        if ev.get("looks_like") == "raw 0..255 pixels":
            return Remedy(rule, "inputs scaled to [0, 1] (x / 255)", transform=_scale(1 / 255))
        means, stds = ev.get("channel_mean"), ev.get("channel_std")
        if means and stds and len(means) > 1:
            return Remedy(rule, "inputs standardized per channel with the measured mean/std",
                          transform=_standardize(means, stds, 1))
        m, s = ev.get("mean"), ev.get("std")
        if m is None or s is None or not (math.isfinite(m) and math.isfinite(s)):
            return None
        return Remedy(rule, f"inputs standardized: (x - {m:.4g}) / {s:.4g}",
                      transform=_standardize(m, s, None))
    if rule == "ND302":
        axis, m, s = ev.get("axis"), ev.get("mean"), ev.get("std")
        if axis is None or not m or not s:
            return None
        return Remedy(rule, "each input feature standardized with its measured mean/std",
                      transform=_standardize(m, s, axis))
    if rule == "ND102":
        acts = [a for a in ev.get("activations", []) if isinstance(a, str)]
        return Remedy(rule, f"{len(acts)} sigmoid/tanh activations replaced by ReLU",
                      model_fn=_swap_to_relu(acts)) if acts else None
    if rule == "ND101" or (rule == "ND403" and finding.cause is None):
        if rule == "ND101":
            layers = [d.get("module") for d in ev.get("layers", []) if isinstance(d, dict)]
        else:
            layers = [p.module for p in run.weight_layers()]
            layers = list(dict.fromkeys(layers))
        hidden = [n for n in layers[:-1] if n]
        return Remedy(rule, f"BatchNorm inserted after {len(hidden)} hidden conv/linear layers",
                      model_fn=_insert_batchnorm(hidden)) if hidden else None
    if rule == "ND202":
        names = sorted({f.module for f in report.findings if f.rule == "ND202" and f.module})
        return Remedy(rule, f"{', '.join(names)} re-initialised (Kaiming normal)",
                      model_fn=_kaiming(names)) if names else None
    if rule in ("ND203", "ND411"):
        return Remedy(rule, "BatchNorm momentum set to 0.1", model_fn=_bn_momentum)
    if rule in ("ND105", "ND106"):
        if not _is_activation_module(model, finding.module):
            return None  # a functional softmax/relu in forward: a code change
        return Remedy(rule, f"{finding.module} removed from the output",
                      model_fn=_identity([finding.module]))
    if rule == "ND201":
        layers = [(d["module"], float(d["expected"])) for d in ev.get("layers", [])
                  if isinstance(d, dict) and d.get("module") and d.get("expected")]
        return Remedy(rule, f"{len(layers)} layer(s) re-initialised at the fan-in-preserving "
                      "scale", model_fn=_init_scale(layers)) if layers else None
    lower = (rule in ("ND402", "ND404") or (rule == "ND406" and ev.get("direction") ==
                                           "too-large")
             or (rule == "ND401" and finding.fix is not None
                 and finding.fix.summary.startswith("lower the learning rate")))
    if lower:
        lr = cfg.learning_rate / 10
        return Remedy(rule, f"learning rate lowered to {lr:g}", config=replace(cfg, lr=lr),
                      retry_factor=0.1)
    if (rule == "ND406" and ev.get("direction") == "too-small" and finding.fix is not None
            and finding.fix.patch) or (rule == "ND407" and finding.cause is None):
        lr = cfg.learning_rate * 10
        return Remedy(rule, f"learning rate raised to {lr:g}", config=replace(cfg, lr=lr))
    if rule == "ND408" and ev.get("loss_at_init", 0) > ev.get("expected", math.inf):
        last = next((p.module for p in reversed(run.weight_layers())), None)
        return Remedy(rule, f"{last} initialised to zero", model_fn=_zero_last(last)) \
            if last else None
    return None


def verify(model: nn.Module, source, run: TrainingRun, report: Report,
           progress: Any = None) -> tuple[dict[str, Any] | None, str | None]:
    """Re-run the probe with the top fix applied. Returns (measurement, note)."""
    first = report.fix_first()
    if first is None:
        return None, None
    if run.steps_run == 0:
        return None, None  # nothing to compare with (the report says why it did not train)
    remedy = remedy_for(first, report, run, model)
    if remedy is None:
        return None, (f"fix first ({first.rule} {first.name}) changes code that cannot be applied "
                      "in memory: not verified")
    net = model
    if remedy.model_fn is not None:
        net = copy.deepcopy(model)
        remedy.model_fn(net)
    config = remedy.config or run.config
    before = run.summary_side()
    description = remedy.description
    tried: list[str] = []
    for attempt in range(3 if remedy.retry_factor else 1):
        try:
            after = run_probe(net, source, config, instrument=False, transform=remedy.transform,
                              progress=progress, label="verify fix", overfit=False,
                              train_eval=False)
        except Exception as e:  # the edited model may not run (e.g. BatchNorm1d on 3-D input)
            return None, (f"fix first ({first.rule}) was applied in memory ({description}) "
                          f"but the re-run failed: {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]}")
        after_side = after.summary_side()
        better = improved(before, after_side)
        if better or not remedy.retry_factor or attempt == 2:
            break
        tried.append(f"{config.learning_rate:g}")
        config = replace(config, lr=config.learning_rate * remedy.retry_factor)
        description = f"learning rate lowered to {config.learning_rate:g}"
    if tried:
        description += f" ({', '.join(tried)} did not help)"
    return {"fix": first.fix.summary if first.fix and not tried else description,
            "rule": first.rule, "applied": description,
            "before": before, "after": after_side,
            "improved": better}, None


def improved(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """The fix helped: the re-run learns (its loss falls from its own start) and ends lower
    than before, or its accuracy is clearly higher."""
    b, a, a0 = before.get("loss_last"), after.get("loss_last"), after.get("loss_first")
    if a is None or not math.isfinite(a):
        return False
    ba, aa = before.get("accuracy"), after.get("accuracy")
    if ba is not None and aa is not None and aa >= ba + 0.1:
        return True
    learns = a0 is None or not math.isfinite(a0) or a < 0.9 * a0
    lower = b is None or not math.isfinite(b) or a < 0.9 * b
    return learns and lower and (ba is None or aa is None or aa >= ba)
