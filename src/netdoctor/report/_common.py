"""Helpers shared by the reporters (torch-free)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from netdoctor.findings import Report, Severity

_TARGET_RE = re.compile(r"^(?P<file>.+?):(?P<name>[A-Za-z_][\w.]*)$")
_PATHLIKE_SUFFIXES = (".py", ".onnx", ".pt", ".pth", ".ckpt", ".pyi")


def rel_path(path: str) -> str:
    """A posix path, made relative to the cwd when it is absolute and under it."""
    p = Path(path)
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(Path.cwd().resolve())
        except (ValueError, OSError):
            return p.as_posix()
    return p.as_posix().removeprefix("./")


def is_relative(path: str) -> bool:
    return not (PurePosixPath(path).is_absolute() or re.match(r"^[A-Za-z]:[\\/]", path))


def target_file(target: str) -> str | None:
    """The file part of a target (`path/x.py:Net` -> `path/x.py`) when it looks like a path."""
    m = _TARGET_RE.match(target)
    candidate = m.group("file") if m else target
    if (
        "/" in candidate
        or os.sep in candidate
        or candidate.lower().endswith(_PATHLIKE_SUFFIXES)
        or os.path.exists(candidate)
    ):
        return candidate
    return None


def aggregate_summary(reports: list[Report]) -> dict[str, int]:
    counts = {"error": 0, "warning": 0, "info": 0, "total": 0}
    for r in reports:
        for key, value in r.summary().items():
            if key in counts:
                counts[key] += value
    counts["targets"] = len(reports)
    return counts


def summary_phrase(counts: dict[str, int]) -> str:
    """'2 errors, 1 warning, 0 info' or 'no problems found'."""
    if not (counts.get("error") or counts.get("warning") or counts.get("info")):
        return "no problems found"
    e, w, i = counts.get("error", 0), counts.get("warning", 0), counts.get("info", 0)
    return f"{e} error{'' if e == 1 else 's'}, {w} warning{'' if w == 1 else 's'}, {i} info"


def json_safe(obj: Any) -> Any:
    """Make measurements/evidence strict-JSON serializable.

    Non-finite floats become null; numpy scalars/arrays, tuples, sets and paths are converted;
    anything else unknown becomes its str().
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Severity):
        return obj.label
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [json_safe(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    for method in ("tolist", "item"):  # numpy/torch scalars and arrays, without importing them
        convert = getattr(obj, method, None)
        if callable(convert):
            try:
                value = convert()
            except (TypeError, ValueError, RuntimeError):
                continue
            if value is not obj:
                return json_safe(value)
    return str(obj)
