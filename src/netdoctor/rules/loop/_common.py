"""What the loop rules share: whether a location is the user's own file (where a fix can patch),
how a message names a line, and a short list of names."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable

from netdoctor.findings import Fix, Location

_LIBRARY = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


def user_file(loc: Location | None) -> bool:
    """True for a Python file of the user's (not an installed library's)."""
    return loc is not None and loc.path.endswith(".py") and not any(m in loc.path for m in _LIBRARY)


def where(loc: Location | None) -> str:
    """`path:line` as reports show it ("?" when unknown)."""
    if loc is None:
        return "?"
    from netdoctor.loading.target import display_path

    return f"{display_path(loc.path)}:{loc.line}" if loc.line else display_path(loc.path)


def names(items: Iterable[str], limit: int = 4) -> str:
    """The first `limit` names, and how many more."""
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def scaler_names(step_site: Location | None) -> tuple[str, str]:
    """The scaler's and the optimizer's names in the user's `scaler.step(optimizer)` line."""
    from netdoctor.fixes.patch import read

    if step_site is not None and step_site.line:
        text = (read(step_site.path) or "").splitlines()
        if 0 < step_site.line <= len(text):
            m = re.search(r"([\w.]+)\.step\(\s*([\w.]+)", text[step_site.line - 1])
            if m:
                return m.group(1), m.group(2)
    return "scaler", "optimizer"


def line_fix(
    summary: str,
    snippet: str,
    site: Location | None,
    draft: bool,
    edit: Callable[[str, int], str | None],
) -> Fix:
    """A patch that `edit(source, line)` makes at the user's `site` line, else the snippet (a
    live draft, a site in library code or unknown: the snippet)."""
    if draft or site is None or site.line is None or not user_file(site):
        return Fix(summary, snippet)
    from netdoctor.fixes.patch import diff_fix

    line = site.line
    return diff_fix(summary, site.path, lambda source: edit(source, line), snippet)
