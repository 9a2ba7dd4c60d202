"""netdoctor in a Lightning fit: `trainer = Trainer(callbacks=[DoctorCallback(output=...)])`.

`DoctorCallback(**options)` takes the options of `netdoctor.watch` (`output`, `format`, `every`,
`select`, `ignore`, `stop_on`, `fail_on`, `rule_options`, `announce`, `static`, `name`,
`tensorboard`). It is
a `Callback` of every Lightning flavour installed (`lightning.pytorch`, `pytorch_lightning`),
built when first looked up: importing this module imports neither Lightning nor torch.

What it hooks:

* `on_fit_start`: the doctor starts with `trainer.optimizers`. Lightning calls `training_step`,
  not the LightningModule's forward, so the models are the parts of the LightningModule that
  `training_step` calls with gradients enabled (the LightningModule itself when it calls
  `self(x)`), named by their path in it; the validation loop (no gradients) is not a training
  forward. Lightning's `optimizer.step(closure)` is measured when the closure's backward
  returns;
* TensorBoard: with `tensorboard=DIR` the doctor's curves and findings go to DIR; by default
  (`tensorboard=None`), when the trainer has a `TensorBoardLogger`, into its writer
  (`logger.experiment`, tags under `netdoctor/`); `tensorboard=False` writes none;
* `on_train_batch_end`: the loss `training_step` returned, for steps whose backward netdoctor did
  not see; `trainer.should_stop = True` once `stop_on` fires (agreed across ranks with the
  strategy's `reduce_boolean_decision`, so every rank stops at the same step);
* `on_fit_end` / `on_exception` / `teardown`: every hook removed, then the report written to
  `output` (in `format`) or printed -- on global rank 0 only.

In a script run by `netdoctor run`, the callback joins the run's doctor (one attachment; the run
writes the one report).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import Any

from netdoctor.integrations.session import SessionResults, TrainerSession

_FLAVOURS = ("lightning.pytorch", "pytorch_lightning")


def _loss_of(outputs: Any) -> Any:
    """The loss in what `training_step` returned (a tensor, or a mapping with "loss")."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    numel = getattr(outputs, "numel", None)
    return outputs if callable(numel) and numel() == 1 else None


class _DoctorHooks(SessionResults):
    """The hooks; `DoctorCallback` puts them before Lightning's `Callback` (see the module
    docstring)."""

    def __init__(self, **options: Any):
        super().__init__()
        self._session = TrainerSession(options, "DoctorCallback")

    # -- Lightning hooks -------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        main = bool(trainer.is_global_zero)
        self._session.start(
            type(pl_module).__name__,
            optimizers=list(trainer.optimizers),
            scope=pl_module,
            discover_models=True,
            discover_optimizers=False,
            main=main,
            tensorboard=_logger_writer(trainer)
            if main and self._session.options.tensorboard is None
            else None,
        )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        s = self._session
        doctor = s.doctor
        if s.watching and doctor is not None:
            s.observe_loss(_loss_of(outputs))
            if not doctor.models and trainer.global_step >= 1:
                # training_step called no module with gradients: watch the LightningModule's
                # parameters as one model (the loop facts still hold)
                doctor.add_model(pl_module)
        agree = None
        if getattr(trainer, "world_size", 1) > 1:

            def agree(flag: bool) -> bool:
                return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))

        if s.should_stop(agree):
            trainer.should_stop = True

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._session.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._session.finish(
            stopped="interrupted" if isinstance(exception, KeyboardInterrupt) else "exception"
        )

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._session.finish()

    # -- after the fit ---------------------------------------------------------------------
    def close(self) -> None:
        """Finish the fit's watch now (the trainer's end hooks do it; idempotent)."""
        self._session.finish()


def _logger_writer(trainer: Any) -> Any:
    """The SummaryWriter of the trainer's `TensorBoardLogger` (either Lightning flavour), when
    it has one; looked up on global rank 0 only (elsewhere Lightning's is a stand-in)."""
    try:
        for logger in getattr(trainer, "loggers", None) or []:
            if any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__):
                return logger.experiment
    except Exception:  # a logger that cannot open its writer: no export, the fit goes on
        return None
    return None


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for name in _FLAVOURS:
        try:
            if importlib.util.find_spec(name.split(".")[0]) is None:
                continue
            bases.append(importlib.import_module(name).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "netdoctor.integrations.lightning needs PyTorch Lightning: pip "
            "install netdoctor[lightning] (or pip install lightning)"
        )
    return tuple(bases)


def _build() -> type:
    return type(
        "DoctorCallback",
        (_DoctorHooks, *_callback_bases()),
        {
            "__module__": __name__,
            "__qualname__": "DoctorCallback",
            "__doc__": "netdoctor watching a Lightning fit: `Trainer(callbacks=[DoctorCallback("
            "output='report.json', format='json')])`. Options as `netdoctor.watch`; "
            "see netdoctor.integrations.lightning.",
        },
    )


def __getattr__(name: str) -> Any:
    if name == "DoctorCallback":
        cls = globals()["DoctorCallback"] = _build()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
