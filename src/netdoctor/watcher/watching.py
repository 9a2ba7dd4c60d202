"""`netdoctor.watch(model, optimizer)`: a Doctor started on the user's objects, or joined to
the one `netdoctor run` already runs in this process."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn

from netdoctor.watcher.doctor import Doctor, running_doctor
from netdoctor.watcher.settings import WatchOptions


class JoinedDoctor:
    """What `netdoctor.watch()` returns inside a script that `netdoctor run` already watches:
    the models and optimizers join the running doctor, and closing this handle leaves it
    running (`netdoctor run` writes the one report)."""

    def __init__(self, doctor: Doctor):
        self._doctor = doctor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._doctor, name)

    def close(self) -> None:
        pass

    def __enter__(self) -> JoinedDoctor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        return False


def watch(
    model: nn.Module | list[nn.Module] | tuple[nn.Module, ...] | None = None,
    optimizer: torch.optim.Optimizer
    | list[torch.optim.Optimizer]
    | tuple[torch.optim.Optimizer, ...]
    | None = None,
    **options: Any,
) -> Doctor | JoinedDoctor:
    """See `netdoctor.watch`."""
    opts = WatchOptions.from_kwargs(**options)
    models = [] if model is None else list(model) if isinstance(model, (list, tuple)) else [model]
    optimizers = (
        []
        if optimizer is None
        else list(optimizer)
        if isinstance(optimizer, (list, tuple))
        else [optimizer]
    )
    running = running_doctor()
    if running is not None:
        running.export_to(opts.tensorboard)
        for m in models:
            running.add_model(m)
        for o in optimizers:
            running.add_optimizer(o)
        return JoinedDoctor(running)
    target = opts.name or (", ".join(type(m).__name__ for m in models) if models else "training")
    doctor = Doctor(
        opts, discover_models=not models, discover_optimizers=not optimizers, target=target
    )
    doctor.start()
    try:
        for m in models:
            doctor.add_model(m)
        for o in optimizers:
            doctor.add_optimizer(o)
    except BaseException:
        doctor.close()
        raise
    return doctor
