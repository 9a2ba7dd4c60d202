"""Running the user's script in this process exactly as `python SCRIPT.py ARGS` (or
`python -m MODULE ARGS`) would, with a doctor watching.

`sys.argv`, `__name__ == "__main__"`, `sys.path[0]` (the script's folder, or the current folder
for -m) and the script's own stdout are as Python sets them. Construction sites of modules and
optimizers are recorded while it runs (`loading.provenance`), so findings point at the user's
lines. However the script ends -- normally, `sys.exit(code)`, an exception (its traceback is
printed as Python prints it, netdoctor's frames left out), Ctrl-C, SIGTERM, or netdoctor's own
`StopTraining` -- the doctor is closed and the outcome says which, with the exit code Python
would have used.

SIGTERM (torchrun stops every rank this way once one rank failed; schedulers preempt jobs with
it) would end the process on the spot, with no report. While the script runs, and only when
nothing else handles SIGTERM, it is turned into `Terminated`, an exception that unwinds the
script like Ctrl-C does; once the script is over a second SIGTERM only makes rank 0 stop waiting
for the other ranks (`distributed.hurry`), and the report is written before the process ends.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from netdoctor.errors import StopTraining, UserError
from netdoctor.loading.provenance import Provenance

_NETDOCTOR_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ScriptOutcome:
    kind: str  # "ok", "exit", "exception", "interrupted", "terminated", "stopped"
    exit_code: int  # what Python would have exited with (0 for ok and stopped)
    error: BaseException | None = None


class Terminated(BaseException):
    """SIGTERM arrived while the script ran (a BaseException: `except Exception` in the user's
    loop does not swallow it)."""


def _terminated(signum, frame) -> None:
    raise Terminated("terminated by SIGTERM")


def _late_sigterm(signum, frame) -> None:
    from netdoctor.watcher.distributed import hurry

    hurry()


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def resolve(script: str | None, module: str | None) -> tuple[str, str]:
    """(how the report names it, the path or module name); UserError when it cannot run."""
    if module:
        import importlib.util

        sys.path.insert(0, os.getcwd())  # as `python -m` would see it
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError) as e:
            raise UserError(f"-m {module}: {e}") from None
        finally:
            del sys.path[0]
        if spec is None:
            raise UserError(f"-m {module}: no module named {module!r}")
        return f"-m {module}", module
    if not script:
        raise UserError(
            "no script given: netdoctor run [OPTIONS] train.py [ARGS...] (or -m "
            "package.module [ARGS...])"
        )
    path = Path(script)
    if not path.is_file():
        raise UserError(f"{script}: no such file")
    from netdoctor.loading.target import display_path

    return display_path(path), str(path)


def run_script(
    where: str, args: list[str], module: bool, doctor, provenance: Provenance
) -> ScriptOutcome:
    """Run it under `doctor` (started here, closed here)."""
    saved_argv, saved_path0 = list(sys.argv), sys.path[0] if sys.path else None
    if module:
        sys.argv = [where, *args]  # runpy replaces argv[0] with the module's file
        sys.path[0:1] = [os.getcwd()] if sys.path else [os.getcwd()]
    else:
        sys.argv = [where, *args]
        folder = os.path.dirname(os.path.abspath(where))
        if sys.path:
            sys.path[0] = folder
        else:
            sys.path.append(folder)
    outcome = ScriptOutcome("ok", 0)
    ours = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )
    try:
        if ours:
            signal.signal(signal.SIGTERM, _terminated)
        with provenance.recording((torch.nn.Module, torch.optim.Optimizer)):
            doctor.start()
            try:
                if module:
                    runpy.run_module(where, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(where, run_name="__main__")
            except SystemExit as e:
                outcome = _system_exit(e)
            except StopTraining as e:
                doctor.facts.stopped = "stop-on"
                outcome = ScriptOutcome("stopped", 0, e)
            except KeyboardInterrupt as e:
                doctor.facts.stopped = "interrupted"
                print_user_traceback(e)
                outcome = ScriptOutcome("interrupted", 130, e)
            except Terminated as e:
                doctor.facts.stopped = "terminated"
                outcome = ScriptOutcome("terminated", 128 + signal.SIGTERM, e)
            except BaseException as e:  # the user's script failed: Python's exit code is 1
                doctor.facts.stopped = "exception"
                doctor.facts.error = _describe(e)
                print_user_traceback(e)
                outcome = ScriptOutcome("exception", 1, e)
            finally:
                if ours and signal.getsignal(signal.SIGTERM) is _terminated:
                    signal.signal(signal.SIGTERM, _late_sigterm)  # the report still comes
                doctor.close()
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None and sys.path:
            sys.path[0] = saved_path0
    return outcome


def _system_exit(e: SystemExit) -> ScriptOutcome:
    code = e.code
    if code is None:
        return ScriptOutcome("exit", 0, e)
    if isinstance(code, int):
        return ScriptOutcome("exit", code, e)
    print(code, file=sys.stderr)
    return ScriptOutcome("exit", 1, e)


def _is_ours(filename: str) -> bool:
    return (
        filename.startswith(_NETDOCTOR_DIR)
        or filename == runpy.__file__
        or os.path.basename(filename) == "runpy.py"
        or filename == "<frozen runpy>"
    )


def print_user_traceback(error: BaseException) -> None:
    """The traceback as `python script.py` prints it: netdoctor's and runpy's frames left out."""
    te = traceback.TracebackException.from_exception(error)
    seen: set[int] = set()

    def trim(t: traceback.TracebackException | None) -> None:
        while t is not None and id(t) not in seen:
            seen.add(id(t))
            t.stack = traceback.StackSummary.from_list(
                [f for f in t.stack if not _is_ours(f.filename)]
            )
            trim(t.__cause__)
            t = t.__context__

    trim(te)
    sys.stderr.write("".join(te.format()))
    sys.stderr.flush()
