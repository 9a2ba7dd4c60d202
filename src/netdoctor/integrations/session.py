"""One watched fit, as a trainer callback drives it: the part both callbacks share.

`start()` builds a `Doctor` for the trainer's model and optimizers (or joins the doctor of
`netdoctor run` when the script runs under it: never two attachments), `observe_loss()` passes a
trainer's reported loss, `should_stop()` says whether `stop_on` fired (agreed across ranks, so
every rank stops at the same step), and `finish()` closes the doctor -- every hook removed --
and, on the main process only, writes the report to `output` or prints it.

A netdoctor failure here is one line on stderr, never an exception in the user's training. The
trainers call no callback when their loop raises (Hugging Face) or may not reach `teardown`, so
an unfinished session is also finished when the interpreter exits (the report still comes).
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from netdoctor.watcher.settings import WatchOptions

if TYPE_CHECKING:  # imported with torch when a fit starts
    from netdoctor.watcher.doctor import Doctor


def _say(line: str) -> None:
    print(f"netdoctor: {line}", file=sys.stderr, flush=True)


class TrainerSession:
    """See the module docstring. `owner` names the callback in messages."""

    def __init__(self, options: dict[str, Any], owner: str):
        options = dict(options)
        if "stop_action" in options:
            raise TypeError(
                f"{owner} does not take stop_action: it stops training through the "
                "trainer when stop_on fires"
            )
        self.owner = owner
        self.options = WatchOptions.from_kwargs(stop_action="flag", **options)
        self.doctor: Doctor | None = None  # once started
        self.joined = False  # the doctor is netdoctor run's: it reports, not this session
        self.main = True  # the process that reports (global rank 0)
        self._exit_hook: Callable[[], None] | None = None

    # -- life cycle ----------------------------------------------------------------------
    def start(
        self,
        target: str,
        *,
        models: Iterable[Any] = (),
        optimizers: Iterable[Any] = (),
        scope: Any = None,
        discover_models: bool = False,
        discover_optimizers: bool = False,
        main: bool = True,
        tensorboard: Any = None,
    ) -> None:
        """Watch a fit. Never raises: a failure to attach is one line on stderr and an
        unwatched fit. `tensorboard`: the trainer's own TensorBoard writer (or its log
        directory), used when the callback's `tensorboard` option is None."""
        self.finish()  # a previous fit of this callback that ended without its end hook
        self.main = main
        try:
            self._start(
                target, list(models), list(optimizers), scope, discover_models, discover_optimizers
            )
        except Exception as e:
            self.doctor = None
            self._failed("not attached", e)
            return
        chosen = self.options.tensorboard
        export = tensorboard if chosen is None else chosen
        if self.doctor is not None and export is not None and export is not False:
            try:
                self.doctor.export_to(export)
            except Exception as e:
                self._failed("cannot export to TensorBoard", e)

    def _start(
        self,
        target: str,
        models: list[Any],
        optimizers: list[Any],
        scope: Any,
        discover_models: bool,
        discover_optimizers: bool,
    ) -> None:
        from netdoctor.watcher.doctor import Doctor, running_doctor

        running = running_doctor()
        if running is not None:  # netdoctor run: its options apply, it writes the report
            doctor, self.joined = running, True
            self.doctor = doctor
        else:
            opts = replace(
                self.options,
                output=None,
                announce=self.options.announce and self.main,
                tensorboard=None,  # set up by start(), with the trainer's writer
            )
            doctor = self.doctor = Doctor(
                opts,
                discover_models=discover_models,
                discover_optimizers=discover_optimizers,
                target=self.options.name or target,
                scope=scope,
            )
            self.joined = False
            doctor.start()
            self._exit_hook = self._at_exit
            atexit.register(self._exit_hook)
        for m in models:
            doctor.add_model(m)
        for o in optimizers:
            doctor.add_optimizer(o)

    def finish(self, stopped: str | None = None) -> None:
        """Close the doctor (idempotent) and, on the main process, write or print the report.
        `stopped`: "exception" or "interrupted" when the fit ended that way."""
        doctor = self.doctor
        if self._exit_hook is not None:
            atexit.unregister(self._exit_hook)
            self._exit_hook = None
        if doctor is None or self.joined or doctor.closed:
            return
        try:
            if stopped and not doctor.facts.stopped:
                doctor.facts.stopped = stopped
            doctor.close()
        except Exception as e:  # close() removes every hook in its own finally
            self._failed("could not finish", e)
        if self.main:
            self._emit()

    def _emit(self) -> None:
        output, fmt = self.options.output, self.options.format
        if self.doctor is None:
            return
        try:
            text = self.doctor.report(format=fmt, color=False if output else None)
        except Exception as e:
            self._failed("could not build the report", e)
            return
        if output:
            try:
                with open(output, "w", encoding="utf-8") as fh:
                    fh.write(text)
                return
            except OSError as e:
                _say(f"could not write the report to {output} ({e.strerror or e}); here it is")
        print(text, flush=True)

    def _at_exit(self) -> None:
        self._exit_hook = None
        self.finish(stopped="exception")

    def _failed(self, what: str, error: BaseException) -> None:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        _say(f"{self.owner} {what}: {type(error).__name__}{': ' + detail if detail else ''}")
        if os.environ.get("NETDOCTOR_DEBUG"):
            traceback.print_exception(error)

    # -- during the fit ------------------------------------------------------------------
    @property
    def watching(self) -> bool:
        return self.doctor is not None and not self.joined and not self.doctor.closed

    def observe_loss(self, value: Any) -> None:
        """The loss a trainer reports after a step (used when netdoctor saw no backward)."""
        doctor = self.doctor
        if doctor is not None and self.watching and value is not None:
            doctor.observe_loss(value, after_step=True)

    def should_stop(self, agree: Callable[[bool], bool] | None = None) -> bool:
        """Whether stop_on fired. `agree(flag) -> any rank's flag`: a collective every rank
        calls at the same point of every step (only when stop_on is set), so all ranks stop at
        the same step and none waits on a collective the others left."""
        if self.options.stop_on == "never" or self.joined:  # the same on every rank
            return False
        flag = self.doctor is not None and bool(self.doctor.should_stop)
        return agree(flag) if agree is not None else flag

    # -- after the fit -------------------------------------------------------------------
    def report(self, format: str | None = None, output: str | None = None) -> str:
        if self.doctor is None:
            raise RuntimeError(f"{self.owner} has not watched a fit yet")
        return self.doctor.report(format=format, output=output)

    @property
    def findings(self) -> list:
        return [] if self.doctor is None else self.doctor.findings

    def exit_code(self) -> int:
        """0/1 by `fail_on` (for a CI script: `sys.exit(callback.exit_code())`)."""
        if self.doctor is None:
            return 0
        return self.doctor.exit_code(self.options.fail_on)


class SessionResults:
    """What a trainer callback offers after training: its session's doctor, findings, report
    and exit code (both callbacks inherit it; their hooks fill `self._session`)."""

    _session: TrainerSession

    @property
    def doctor(self) -> Doctor | None:
        """The `Doctor` of the latest training (None before the first)."""
        return self._session.doctor

    @property
    def findings(self) -> list:
        """The findings of the latest training, in priority order."""
        return self._session.findings

    def report(self, format: str | None = None, output: str | None = None) -> str:
        """The latest training's report as text/json/sarif/github (written to `output`)."""
        return self._session.report(format=format, output=output)

    def exit_code(self) -> int:
        """0/1 by `fail_on`: `sys.exit(callback.exit_code())` fails a CI job on a finding."""
        return self._session.exit_code()


def any_rank(flag: bool) -> bool:
    """`flag` of any process of the default torch.distributed group (the flag itself when
    there is no such group): one tiny all-reduce."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
