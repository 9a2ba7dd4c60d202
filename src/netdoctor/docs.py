"""Rule docs (rules/NDxxx.md): found in the installed package or, in a source checkout, the repo."""

from __future__ import annotations

import re
from pathlib import Path


def docs_dir() -> Path | None:
    shipped = Path(__file__).parent / "rule_docs"
    if shipped.is_dir():
        return shipped
    repo = Path(__file__).resolve().parents[2] / "rules"
    return repo if repo.is_dir() else None


def doc_path(rule_id: str) -> Path | None:
    folder = docs_dir()
    if folder is None:
        return None
    path = folder / f"{rule_id}.md"
    return path if path.is_file() else None


def read_doc(rule_id: str) -> str | None:
    path = doc_path(rule_id)
    return path.read_text(encoding="utf-8") if path else None


_FENCE = re.compile(r"```python\n(.*?)```", re.S)


def examples(text: str) -> dict[str, str]:
    """The doc's code examples: the first python block under '## Example' (bad) and under
    '## Fix' (good)."""
    out: dict[str, str] = {}
    for heading, key in (("## Example", "bad"), ("## Fix", "good")):
        start = text.find(heading)
        if start < 0:
            continue
        nxt = text.find("\n## ", start + len(heading))
        section = text[start : nxt if nxt > 0 else len(text)]
        m = _FENCE.search(section)
        if m:
            out[key] = m.group(1)
    return out
