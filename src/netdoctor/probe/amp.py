"""The probe's mixed precision (`--precision`): the autocast around forward and loss, and the
GradScaler of a float16 run, as PyTorch's AMP recipe has them (scale -> backward -> unscale_ ->
step -> update). The parameters stay float32: autocast casts per op."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from netdoctor.errors import UserError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A fresh context per use: torch.autocast(device, dtype) for fp16/bf16, else nothing."""
    dtype = DTYPES.get(precision)
    if dtype is None:
        return nullcontext
    try:
        with torch.autocast(device.type, dtype=dtype):
            pass
    except (RuntimeError, ValueError, AssertionError) as e:
        raise UserError(
            f"--precision {precision}: torch {torch.__version__} has no {dtype} autocast on "
            f"{device.type} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None

    def context() -> AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype)

    return context


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16: a GradScaler on the probe's device (bfloat16 has float32's range: none)."""
    if precision != "fp16":
        return None
    scaler_cls = getattr(getattr(torch, "amp", None), "GradScaler", None)
    if scaler_cls is None:
        raise UserError(
            f"--precision fp16 needs torch.amp.GradScaler (torch >= 2.3; this is "
            f"{torch.__version__}): use --precision bf16"
        )
    try:
        return scaler_cls(device.type)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(
            f"--precision fp16: no GradScaler for {device.type} in torch {torch.__version__} "
            f"({type(e).__name__}): use --precision bf16"
        ) from None


class _KeepFloat32:
    """Mixed into a module's class by `keep_float32`: its forward runs with autocast off and
    its floating inputs cast to float32 (the remedy of ND605, on the probe's copy)."""

    def forward(self, *args, **kwargs):
        device = next(
            (a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)),
            "cpu",
        )

        def f32(a: object) -> object:
            return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

        with torch.autocast(device, enabled=False):
            return super().forward(  # type: ignore[misc]
                *(f32(a) for a in args), **{k: f32(v) for k, v in kwargs.items()}
            )


_FLOAT32_CLASSES: dict[type, type] = {}


def keep_float32(names: list[str]) -> Callable[[torch.nn.Module], None]:
    """An edit of a copy of the model: the named modules compute in float32 under autocast.
    Each keeps its name, parameters and class name (a subclass with `_KeepFloat32` first), so
    the copy deep-copies and reports like the original."""

    def edit(model: torch.nn.Module) -> None:
        for name in names:
            try:
                m = model.get_submodule(name)
            except AttributeError:
                continue
            cls = type(m)
            if issubclass(cls, _KeepFloat32):
                continue
            sub = _FLOAT32_CLASSES.get(cls)
            if sub is None:
                sub = _FLOAT32_CLASSES[cls] = type(cls.__name__, (_KeepFloat32, cls), {})
            m.__class__ = sub

    return edit
