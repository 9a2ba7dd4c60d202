"""`# netdoctor: ignore[ND101]` comments: on the flagged layer's line or on its class line."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from netdoctor.findings import Finding, Location

_COMMENT = re.compile(r"#\s*netdoctor:\s*ignore(?:\[(?P<ids>[^\]]*)\])?", re.I)


def _lines(path: str) -> tuple[str, ...]:
    # Cached by absolute path and modification time: a relative path (reports use paths relative
    # to the cwd) may name another file after a chdir, and a file may change between checks.
    try:
        resolved = Path(path).resolve()
        return _read_lines(str(resolved), resolved.stat().st_mtime_ns)
    except OSError:
        return ()


@lru_cache(maxsize=256)
def _read_lines(path: str, mtime_ns: int) -> tuple[str, ...]:
    try:
        return tuple(Path(path).read_text(encoding="utf-8", errors="replace").splitlines())
    except OSError:
        return ()


def _ignores(line: str, rule_id: str) -> bool:
    m = _COMMENT.search(line)
    if not m:
        return False
    ids = m.group("ids")
    if ids is None:
        return True
    return rule_id.upper() in {i.strip().upper() for i in ids.split(",")}


def _enclosing_class_line(lines: tuple[str, ...], index: int) -> int | None:
    if index >= len(lines):
        return None
    indent = len(lines[index]) - len(lines[index].lstrip())
    for i in range(index - 1, -1, -1):
        text = lines[i]
        stripped = text.lstrip()
        if not stripped:
            continue
        this_indent = len(text) - len(stripped)
        if this_indent < indent and stripped.startswith("class "):
            return i
        if this_indent == 0 and not stripped.startswith(("class ", "#", "@")):
            return None
    return None


def is_suppressed(finding: Finding, extra_class_lines: list[Location] = ()) -> bool:
    candidates: list[tuple[str, int]] = []
    loc = finding.location
    if loc is not None and loc.line:
        lines = _lines(loc.path)
        if lines:
            candidates.append((loc.path, loc.line - 1))
            cls = _enclosing_class_line(lines, loc.line - 1)
            if cls is not None:
                candidates.append((loc.path, cls))
    for c in extra_class_lines:
        if c is not None and c.line:
            candidates.append((c.path, c.line - 1))
    for path, index in candidates:
        lines = _lines(path)
        if 0 <= index < len(lines) and _ignores(lines[index], finding.rule):
            return True
    return False
