"""Running one forward pass on the user's model safely: eval mode, no grad, hooks always removed,
modes restored, and on failure the innermost submodule that raised (for ND002)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ForwardFailure(Exception):
    """The model's forward raised. `module` is the innermost submodule running at the time."""

    error: BaseException
    module: str | None  # qualified path; None when it raised outside any submodule
    module_type: str | None
    input_shapes: list[tuple[int, ...]]
    param_shapes: dict[str, tuple[int, ...]]

    def __str__(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag afterwards, whatever happens."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def preserved_buffers(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Put back, in place, every buffer of these modules (and their submodules) afterwards: the
    running statistics a BatchNorm updates in a forward netdoctor runs."""
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


@contextlib.contextmanager
def preserved_attributes(model: nn.Module) -> Iterator[None]:
    """Put back every plain attribute a forward or a trace assigned on any submodule (a call
    counter, a cache, a flag: `self.calls += 1` in a forward that netdoctor runs or that
    torch.fx traces, which would leave a Proxy behind), and remove the ones it added. Tensors
    changed in place are not covered here (BatchNorm statistics are restored where they run)."""
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            current = m.__dict__
            for key in [k for k in current if k not in attrs]:
                del current[key]
            for key, value in attrs.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value


_MISSING = object()


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nest of lists, tuples and dicts (forward arguments and outputs)."""
    out: list[torch.Tensor] = []

    def visit(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)

    visit(value)
    return out


def tensor_shapes(values: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors_in(values)]


def main_output(value: Any) -> torch.Tensor | None:
    """A model's main output tensor: a tensor, .logits, a dict's 'logits', or the first one."""
    if isinstance(value, torch.Tensor):
        return value
    logits = getattr(value, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(value, dict):
        if isinstance(value.get("logits"), torch.Tensor):
            return value["logits"]
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            t = main_output(v)
            if t is not None:
                return t
    return None


def model_device(model: nn.Module) -> torch.device:
    """Where the model lives (its first parameter or buffer): example inputs go there (a model
    watched while it trains on a GPU)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        # a model built on the meta device (too large to build) computes on the CPU, its
        # weights materialised at the ops that use them (netdoctor.loading.deferred)
        return torch.device("cpu") if t.is_meta else t.device
    return torch.device("cpu")


def example_input(
    shape: tuple[int, ...], dtype: str = "float32", batch: int = 2, vocab: int | None = None
) -> torch.Tensor:
    """A deterministic example batch: unit-variance floats, or token ids below `vocab`."""
    gen = torch.Generator().manual_seed(0)
    if dtype in ("long", "int64", "int"):
        return torch.randint(0, max(1, vocab or 2), (batch, *shape), generator=gen)
    return torch.randn((batch, *shape), generator=gen, dtype=getattr(torch, dtype))


def run_forward(
    model: nn.Module, x: torch.Tensor, extra_modules: dict[str, nn.Module] | None = None
) -> Any:
    """Forward `x` in eval mode without grad; raise ForwardFailure naming the failing submodule."""
    names = {m: n for n, m in model.named_modules()}
    for n, m in (extra_modules or {}).items():
        names.setdefault(m, n)
    x = x.to(model_device(model))
    stack: list[tuple[nn.Module, list[tuple[int, ...]]]] = []
    failed: list[tuple[nn.Module, list[tuple[int, ...]]]] = []

    def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
        stack.append((mod, tensor_shapes(args)))

    def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    try:
        for m in names:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        with preserved_modes(model), torch.no_grad():
            model.eval()
            try:
                return model(x)
            except Exception as e:
                failed = list(stack)
                inner = failed[-1] if failed else None
                mod = inner[0] if inner else None
                name = names.get(mod) if mod is not None else None
                raise ForwardFailure(
                    error=e,
                    module=name if name else None,
                    module_type=type(mod).__name__ if mod is not None else None,
                    input_shapes=inner[1] if inner else tensor_shapes(x),
                    param_shapes={k: tuple(p.shape) for k, p in mod.named_parameters(recurse=False)}
                    if mod is not None
                    else {},
                ) from e
    finally:
        for h in handles:
            h.remove()
