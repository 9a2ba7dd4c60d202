"""`# netdoctor: ignore[ND101]` comments: on the flagged layer's line or on its class line.

Reading (`is_suppressed`) and writing (`with_ignores`, for `check --add-ignore`) share one idea
of where the comment for a line goes: on that line, or, when the line cannot end in a comment
(it continues with a backslash, or a string literal runs on past it), on the line where that
continuation ends, the first one after it that can hold a comment.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from netdoctor.findings import Finding, Location

_COMMENT = re.compile(r"#\s*netdoctor:\s*ignore(?:\[(?P<ids>[^\]]*)\])?", re.I)


def _stamp(path: str) -> tuple[str, int] | None:
    # Cached by absolute path and modification time: a relative path (reports use paths relative
    # to the cwd) may name another file after a chdir, and a file may change between checks.
    try:
        resolved = Path(path).resolve()
        return str(resolved), resolved.stat().st_mtime_ns
    except OSError:
        return None


def _lines(path: str) -> tuple[str, ...]:
    stamp = _stamp(path)
    return _read_lines(*stamp) if stamp else ()


@lru_cache(maxsize=256)
def _read_lines(path: str, mtime_ns: int) -> tuple[str, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    return tuple(_split(text))


def _split(text: str) -> list[str]:
    """Lines as Python numbers them (str.splitlines also splits at form feeds and other
    separators that do not end a line of source)."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


@lru_cache(maxsize=256)
def _read_anchors(path: str, mtime_ns: int) -> dict[int, int]:
    return _anchors("\n".join(_read_lines(path, mtime_ns)) + "\n")


def _anchors(text: str) -> dict[int, int]:
    """{0-based line: 0-based line that holds its comment} for the lines that cannot end in a
    comment themselves (all others hold their own). Empty when the text does not tokenize."""
    can_end: set[int] = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT):
                can_end.add(tok.start[0] - 1)
    except (tokenize.TokenError, SyntaxError):
        return {}
    anchors: dict[int, int] = {}
    pending: list[int] = []
    for index in range(text.count("\n") + 1):
        if index in can_end:
            anchors.update((p, index) for p in pending)
            pending.clear()
        else:
            pending.append(index)
    return anchors


def comment_index(path: str, index: int) -> int:
    """The 0-based line that holds the ignore comment for 0-based line `index` of `path`."""
    stamp = _stamp(path)
    return _read_anchors(*stamp).get(index, index) if stamp else index


def ignored_ids(line: str) -> set[str] | None:
    """The rule IDs a line's netdoctor comment ignores: None without one, {"*"} for a bare
    `# netdoctor: ignore` (every rule)."""
    m = _COMMENT.search(line)
    if not m:
        return None
    ids = m.group("ids")
    if ids is None:
        return {"*"}
    return {i.strip().upper() for i in ids.split(",") if i.strip()}


def _ignores(line: str, rule_id: str) -> bool:
    ids = ignored_ids(line)
    return ids is not None and ("*" in ids or rule_id.upper() in ids)


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


def is_suppressed(finding: Finding, extra_class_lines: Sequence[Location | None] = ()) -> bool:
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
        for i in {index, comment_index(path, index)}:
            if 0 <= i < len(lines) and _ignores(lines[i], finding.rule):
                return True
    return False


# -- writing ------------------------------------------------------------------------------------


def with_ignores(text: str, wanted: dict[int, set[str]]) -> tuple[str, int]:
    """`text` with `# netdoctor: ignore[...]` for the rule IDs in `wanted` ({1-based line: IDs})
    on the line that holds each line's comment. An existing netdoctor comment there gets the new
    IDs merged into its brackets; any other comment is kept, the new one goes after it; nothing
    else on the line changes. Returns (new text, number of lines changed)."""
    lines = text.split("\n")  # each without its "\n" (a "\r" stays with the line's end)
    anchors = _anchors(text)
    comments = _comment_columns(text)
    by_line: dict[int, list[str]] = {}
    for line, ids in wanted.items():
        index = anchors.get(line - 1, line - 1)
        if 0 <= index < len(lines):
            by_line.setdefault(index, []).extend(ids)
    changed = 0
    for index, line_ids in by_line.items():
        new = _add_to_line(lines[index], sorted(set(line_ids)), comments.get(index))
        if new != lines[index]:
            lines[index] = new
            changed += 1
    return "\n".join(lines), changed


def _comment_columns(text: str) -> dict[int, int]:
    """{0-based line: column where its comment starts}."""
    found: dict[int, int] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                found[tok.start[0] - 1] = tok.start[1]
    except (tokenize.TokenError, SyntaxError):
        pass
    return found


def _add_to_line(line: str, ids: list[str], comment_col: int | None) -> str:
    body = line.removesuffix("\r")
    ending = line[len(body) :]
    if comment_col is not None:
        comment = body[comment_col:]
        m = _COMMENT.search(comment)
        if m is not None:
            if m.group("ids") is None:  # a bare ignore already covers every rule
                return line
            have = [i.strip() for i in m.group("ids").split(",") if i.strip()]
            merged = have + [i for i in ids if i.upper() not in {h.upper() for h in have}]
            if len(merged) == len(have):
                return line
            start = comment_col + m.start("ids")
            return body[:start] + ", ".join(merged) + body[comment_col + m.end("ids") :] + ending
    return f"{body}  # netdoctor: ignore[{', '.join(ids)}]{ending}"
