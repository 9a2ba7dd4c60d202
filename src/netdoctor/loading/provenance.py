"""Records, for every module built while loading a model, the line of user code that built it.

While active, `nn.Module.__init__` is wrapped: on each construction it walks the call stack
outwards past torch internals, netdoctor itself and the module's own `__init__` chain, and keeps
the first frame left (the user's `nn.Conv2d(...)` line). The wrapper is always removed.
`recording(bases=...)` records other classes the same way (`netdoctor run` also records where
each optimizer was built), and `user_frame()` finds the user's line of any call in progress
(the `optimizer.step()` that a hook runs inside).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import os
import sys
import textwrap
import weakref
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import torch
from torch import nn

from netdoctor.findings import Location
from netdoctor.loading.library import in_installed_package

_TORCH_DIR = os.path.dirname(torch.__file__)
_NETDOCTOR_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP_PREFIXES = (_TORCH_DIR, _NETDOCTOR_DIR, os.path.dirname(contextlib.__file__))


class Provenance:
    """Object (a module, an optimizer) -> construction Location (absolute path; reporters
    relativize).

    Keyed by identity, held weakly: a module's own `__hash__`/`__eq__` are never called (a
    torchmetrics Metric hashes its state, which does not exist yet while `nn.Module.__init__`
    runs)."""

    def __init__(self) -> None:
        self._sites: dict[int, tuple[weakref.ref, Location]] = {}

    def site(self, obj: object) -> Location | None:
        entry = self._sites.get(id(obj))
        return entry[1] if entry is not None and entry[0]() is obj else None

    def record(self, obj: object, location: Location) -> None:
        key = id(obj)
        entry = self._sites.get(key)
        if entry is not None and entry[0]() is obj:
            return  # the first record stays (as setdefault)
        sites = self._sites

        def forget(ref: weakref.ref, key: int = key) -> None:
            if sites.get(key, (None,))[0] is ref:
                del sites[key]

        try:
            self._sites[key] = (weakref.ref(obj, forget), location)
        except TypeError:
            pass

    @contextlib.contextmanager
    def recording(self, bases: tuple[type, ...] = (nn.Module,)) -> Iterator[Provenance]:
        """Record the construction site of every instance of `bases` built meanwhile."""
        originals = {base: base.__dict__["__init__"] for base in bases}
        prov = self

        def wrap(original: Callable[..., None]) -> Callable[..., None]:
            def __init__(self_obj: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807
                original(self_obj, *args, **kwargs)
                loc = _construction_site(self_obj)
                if loc is not None:
                    prov.record(self_obj, loc)

            return __init__

        for base, original in originals.items():
            base.__init__ = wrap(original)  # type: ignore[misc]  # patching the class on purpose
        try:
            yield self
        finally:
            for base, original in originals.items():
                base.__init__ = original  # type: ignore[misc]  # restoring it


def _is_internal(filename: str) -> bool:
    """Not the user's code: torch, netdoctor, the standard library, installed packages (a
    trainer library's frames) and generated code. Installed packages are named by their folder,
    not by where they sit (`netdoctor.loading.library`)."""
    return (
        filename.startswith(_SKIP_PREFIXES)
        or filename.startswith("<")
        or in_installed_package(filename)
    )


def _is_library(filename: str) -> bool:
    """Library code worth naming when no user code is on the stack: an installed package other
    than torch and netdoctor (timm's or transformers' line that built a layer or called an op)."""
    return not filename.startswith(_SKIP_PREFIXES) and in_installed_package(filename)


def user_frame(depth: int = 1) -> FrameType | None:
    """The innermost frame of the user's own code in the current call stack: past torch,
    netdoctor, the standard library's runpy/contextlib and installed packages (a trainer
    library's frames), or None."""
    import runpy

    skip = _SKIP_PREFIXES + (os.path.dirname(runpy.__file__),)
    frame: FrameType | None = sys._getframe(depth)
    library = None
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(skip) or name.startswith("<")):
            if not in_installed_package(name):
                return frame
            library = library or frame
        frame = frame.f_back
    return library


def user_location(depth: int = 1) -> Location | None:
    """`user_frame()` as a Location (absolute path; reporters relativize)."""
    frame = user_frame(depth + 1)
    if frame is None:
        return None
    return Location(os.path.abspath(frame.f_code.co_filename), frame.f_lineno)


def _construction_site(module: nn.Module) -> Location | None:
    """The user's line that built `module`, carrying the innermost library line that built it
    when library code did on the user's behalf (a layer inside a library's model: the user's
    `create_model(...)` line, and the library's `nn.Linear(...)` line); when no user code is on
    the stack (a library's model built by name), that library line itself. Findings name the
    library line as library code and point at the user's line (`Rule.finding`, `judge`)."""
    frame: FrameType | None = sys._getframe(2)
    library: Location | None = None
    while frame is not None:
        code = frame.f_code
        name = code.co_filename
        if _is_internal(name) and not _is_library(name):
            frame = frame.f_back
            continue
        # Skip the module's own __init__ chain (super().__init__() calls in user subclasses).
        if code.co_name == "__init__" and frame.f_locals.get("self") is module:
            frame = frame.f_back
            continue
        if _is_library(name):
            library = library or Location(os.path.abspath(name), frame.f_lineno)
            frame = frame.f_back
            continue
        return Location(os.path.abspath(name), frame.f_lineno).through(library)
    return library


def class_location(cls: type) -> Location | None:
    """Where a class is defined (for root models and suppression on the class line)."""
    try:
        path = inspect.getsourcefile(cls)
        _, line = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return None
    if not path or _is_internal(os.path.abspath(path)):
        return None
    return Location(os.path.abspath(path), line)


def assignment_site(root: nn.Module, name: str) -> Location | None:
    """Where the user's own code assigns the submodule `name` of `root` -- the `self.head = ...`
    line in its parent's class -- for models built before recording began (`netdoctor.watch`,
    trainer callbacks). A child of a container (`net.0` of an `nn.Sequential`) is placed at the
    container's assignment. None when no user source says (library classes are not the user's
    lines)."""
    parts = name.split(".") if name else []
    while parts:
        try:
            parent = root.get_submodule(".".join(parts[:-1]))
        except AttributeError:
            return None
        cls: type = type(parent)  # the cache key (as type[Module], mypy misreads its __hash__)
        loc = _attribute_line(cls, parts[-1])
        if loc is not None:
            return loc
        parts = parts[:-1]
    return None


@functools.lru_cache(maxsize=512)
def _attribute_line(cls: type, attr: str) -> Location | None:
    """The line of `self.<attr> = ...` in a user-written class of `cls`'s MRO (in `__init__`
    first, else any method)."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        try:
            path = os.path.abspath(inspect.getsourcefile(klass) or "")
            lines, start = inspect.getsourcelines(klass)
        except (OSError, TypeError):
            continue
        if _is_internal(path):
            continue
        try:
            tree = ast.parse(textwrap.dedent("".join(lines)))
        except SyntaxError:
            continue
        found: list[tuple[bool, int]] = []
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, ast.AnnAssign):
                    targets = [node.target]
                else:
                    continue
                if any(
                    isinstance(t, ast.Attribute)
                    and t.attr == attr
                    and isinstance(t.value, ast.Name)
                    and t.value.id == "self"
                    for t in targets
                ):
                    found.append((fn.name != "__init__", node.lineno))
        if found:
            return Location(path, start + min(found)[1] - 1)
    return None
