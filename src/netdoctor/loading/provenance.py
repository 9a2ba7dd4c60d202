"""Records, for every module built while loading a model, the line of user code that built it.

While active, `nn.Module.__init__` is wrapped: on each construction it walks the call stack
outwards past torch internals, netdoctor itself and the module's own `__init__` chain, and keeps
the first frame left (the user's `nn.Conv2d(...)` line). The wrapper is always removed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from netdoctor.findings import Location

_TORCH_DIR = os.path.dirname(torch.__file__)
_NETDOCTOR_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP_PREFIXES = (_TORCH_DIR, _NETDOCTOR_DIR, os.path.dirname(contextlib.__file__))


class Provenance:
    """Module object -> construction Location (absolute path; reporters relativize)."""

    def __init__(self) -> None:
        self._sites: weakref.WeakKeyDictionary[nn.Module, Location] = weakref.WeakKeyDictionary()

    def site(self, module: nn.Module) -> Location | None:
        try:
            return self._sites.get(module)
        except TypeError:
            return None

    def record(self, module: nn.Module, location: Location) -> None:
        try:
            self._sites.setdefault(module, location)
        except TypeError:
            pass

    @contextlib.contextmanager
    def recording(self) -> Iterator[Provenance]:
        original = nn.Module.__init__
        prov = self

        def __init__(self_module, *args, **kwargs):  # noqa: N807 - mirrors nn.Module
            original(self_module, *args, **kwargs)
            loc = _construction_site(self_module)
            if loc is not None:
                prov.record(self_module, loc)

        nn.Module.__init__ = __init__  # type: ignore[method-assign]
        try:
            yield self
        finally:
            nn.Module.__init__ = original  # type: ignore[method-assign]


def _is_internal(filename: str) -> bool:
    return filename.startswith(_SKIP_PREFIXES) or filename.startswith("<")


def _construction_site(module: nn.Module) -> Location | None:
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if _is_internal(code.co_filename):
            frame = frame.f_back
            continue
        # Skip the module's own __init__ chain (super().__init__() calls in user subclasses).
        if code.co_name == "__init__" and frame.f_locals.get("self") is module:
            frame = frame.f_back
            continue
        return Location(os.path.abspath(code.co_filename), frame.f_lineno)
    return None


def class_location(cls: type) -> Location | None:
    """Where a class is defined (for root models and suppression on the class line)."""
    import inspect

    try:
        path = inspect.getsourcefile(cls)
        _, line = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return None
    if not path or _is_internal(os.path.abspath(path)):
        return None
    return Location(os.path.abspath(path), line)
