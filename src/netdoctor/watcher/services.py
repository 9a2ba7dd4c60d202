"""What the doctor's parts share besides the events (`events`): small public objects, so that no
part reaches into another's state.

* `Guard`: netdoctor's side of every hook -- whether netdoctor is busy with its own forwards (a
  static check's trace, a NaN replay: the hooks then record nothing), the guard that times a
  body and turns an internal error into a note (never an exception in the user's loop), and the
  report's notes;
* `DirtyRules`: the rules whose facts changed since the last live judgement (`live`).

Torch-free.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from netdoctor.errors import StopTraining

T = TypeVar("T")


class Guard:
    """See the module docstring. `active`: the doctor is started and not closed (hooks that
    still fire outside that are ignored: `busy`)."""

    def __init__(self) -> None:
        self.active = False
        self.depth = 0  # netdoctor's own forwards, nested
        self.seconds = 0.0  # netdoctor's time inside the user's training (outermost guards)
        self.errors: dict[str, int] = {}  # internal errors -> how often
        self.notes: list[str] = []  # the report's notes, in order
        self._nested = 0

    @property
    def busy(self) -> bool:
        return self.depth > 0 or not self.active

    @contextmanager
    def busy_scope(self) -> Iterator[None]:
        """netdoctor runs a forward of its own in here: the hooks ignore it."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def run(self, body: Callable[[], T]) -> T | None:
        """Run netdoctor's part of a hook: time it, and turn an internal error into a note
        (None then). `StopTraining` goes through."""
        t0 = time.perf_counter()
        self._nested += 1
        try:
            return body()
        except StopTraining:
            raise
        except Exception as e:
            self.note_error(e)
            return None
        finally:
            self._nested -= 1
            if not self._nested:  # nested guards are timed once, by the outermost
                self.seconds += time.perf_counter() - t0

    def note_error(self, e: Exception) -> None:
        """An internal error: counted, and a note in the report."""
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
        key = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}{at}"
        self.errors[key] = self.errors.get(key, 0) + 1
        if os.environ.get("NETDOCTOR_DEBUG"):
            traceback.print_exception(e)


class DirtyRules:
    """Rules whose facts changed: judged live at the end of the step (`live.LiveJudge`)."""

    def __init__(self) -> None:
        self._rules: set[str] = set()

    def mark(self, *rules: str) -> None:
        self._rules.update(rules)

    def take(self) -> set[str]:
        """The marked rules; none are marked afterwards."""
        rules, self._rules = self._rules, set()
        return rules

    def __bool__(self) -> bool:
        return bool(self._rules)
