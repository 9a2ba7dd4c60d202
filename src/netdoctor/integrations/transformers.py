"""netdoctor in a Hugging Face Trainer: `Trainer(..., callbacks=[DoctorCallback(output=...)])`.

`DoctorCallback(**options)` takes the options of `netdoctor.watch` (`output`, `format`, `every`,
`select`, `ignore`, `stop_on`, `fail_on`, `rule_options`, `announce`, `static`, `name`,
`tensorboard`). It is
a `transformers.TrainerCallback`, built when first looked up: importing this module imports
neither transformers nor torch.

What it hooks:

* `on_train_begin`: the doctor starts with the Trainer's model. The Trainer creates its optimizer
  inside `train()` and does not hand it to callbacks in every version (`optimizer` may be None):
  the optimizer is then the one whose first step updates the model's parameters (torch's step
  hooks see it; an `AcceleratedOptimizer` wrapper is looked through). The model's forward
  returns a `ModelOutput`; its loss is the tensor backward runs on;
* TensorBoard: with `tensorboard=DIR` the doctor's curves and findings go to DIR; by default
  (`tensorboard=None`), when `report_to` includes "tensorboard", into the writer of the
  Trainer's `TensorBoardCallback` (tags under `netdoctor/`); `tensorboard=False` writes none;
* `on_log`: the logged loss, for steps whose backward netdoctor did not see;
* `on_step_end`: `control.should_training_stop = True` once `stop_on` fires (agreed across
  ranks under torch.distributed, so every rank stops at the same step);
* `on_train_end`: every hook removed, then the report written to `output` (in `format`) or
  printed -- on the main process only. The Trainer calls no callback when `train()` raises: the
  watch is then finished when the interpreter exits (or by `callback.close()`).

In a script run by `netdoctor run`, the callback joins the run's doctor (one attachment; the run
writes the one report).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from netdoctor.integrations.session import SessionResults, TrainerSession, any_rank


class _DoctorHooks(SessionResults):
    """The hooks; `DoctorCallback` puts them before `transformers.TrainerCallback`."""

    def __init__(self, **options: Any):
        super().__init__()
        self._session = TrainerSession(options, "DoctorCallback")

    # -- Trainer events --------------------------------------------------------------------
    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        main = bool(state.is_world_process_zero)
        tensorboard = None
        if main and self._session.options.tensorboard is None:
            # the Trainer hands a callback no reference to the others: its TensorBoardCallback
            # is found in the list of the CallbackHandler calling this hook
            caller = sys._getframe(1).f_locals.get("self")
            tensorboard = _trainer_tensorboard(args, getattr(caller, "callbacks", None))
        self._session.start(
            type(model).__name__ if model is not None else "training",
            models=[model] if model is not None else [],
            optimizers=[optimizer] if optimizer is not None else [],
            discover_models=model is None,
            discover_optimizers=True,
            main=main,
            tensorboard=tensorboard,
        )

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if logs and isinstance(logs.get("loss"), (int, float)):
            self._session.observe_loss(logs["loss"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        agree = any_rank if getattr(args, "world_size", 1) > 1 else None
        if self._session.should_stop(agree):
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.finish()

    # -- after training --------------------------------------------------------------------
    def close(self) -> None:
        """Finish the watch now (`on_train_end` does it; after a `train()` that raised, this
        removes the hooks and writes the report; idempotent)."""
        self._session.finish(stopped="exception" if self._session.watching else None)


def _trainer_tensorboard(args: Any, callbacks: Any) -> Any:
    """Where the Trainer's own TensorBoard logging goes, when `report_to` includes it: the
    writer of its `TensorBoardCallback` (made in that callback's `on_train_begin`, which runs
    before a user's callback), else that callback's log directory, else `args.logging_dir`
    (transformers 4) or $TENSORBOARD_LOGGING_DIR; None when it logs to no TensorBoard."""
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    if "tensorboard" not in report_to and "all" not in report_to:
        return None
    found = [cb for cb in callbacks or [] if type(cb).__name__ == "TensorBoardCallback"]
    for cb in found:
        writer = getattr(cb, "tb_writer", None)
        if writer is not None:
            return writer
        if getattr(cb, "logging_dir", None):
            return cb.logging_dir
    if not found and "all" in report_to:
        return None  # tensorboard not installed: "all" left it out
    return getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")


def _build() -> type:
    try:
        base = importlib.import_module("transformers").TrainerCallback
    except ImportError as e:
        raise ImportError(
            "netdoctor.integrations.transformers needs Hugging Face "
            "transformers: pip install netdoctor[transformers]"
        ) from e
    return type(
        "DoctorCallback",
        (_DoctorHooks, base),
        {
            "__module__": __name__,
            "__qualname__": "DoctorCallback",
            "__doc__": "netdoctor watching a Hugging Face Trainer: `Trainer(..., callbacks=["
            "DoctorCallback(output='report.json', format='json')])`. Options as "
            "`netdoctor.watch`; see netdoctor.integrations.transformers.",
        },
    )


def __getattr__(name: str) -> Any:
    if name == "DoctorCallback":
        cls = globals()["DoctorCallback"] = _build()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
