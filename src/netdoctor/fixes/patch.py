"""Fixes as diffs: a rule's edit of the user's source (made with libcst, formatting and comments
kept) becomes a `Fix` carrying a unified diff, or a paste-ready snippet when the code could not
be located.

The edit functions live in `netdoctor.fixes.edits` (adding or changing code) and
`netdoctor.fixes.removals` (taking code out), the code locating in `netdoctor.fixes.locate`;
they are importable from here, the one module the rules import fixes from.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path

from netdoctor.findings import Fix
from netdoctor.fixes.edits import (
    append_to_init,
    insert_args_after,
    insert_statement_after,
    insert_statement_before,
    replace_calls,
    set_keyword,
    set_positional,
    wrap_attribute,
    wrap_call,
    wrap_call_argument,
    wrap_receiver,
)
from netdoctor.fixes.locate import arg_code, attribute_line, cst, method_receiver
from netdoctor.fixes.removals import (
    call_wrapper_not_module,
    remove_arg,
    unwrap_attribute,
    unwrap_call,
    unwrap_with,
)
from netdoctor.loading.library import in_installed_package
from netdoctor.loading.target import display_path

__all__ = [
    "append_to_init",
    "arg_code",
    "attribute_line",
    "call_wrapper_not_module",
    "diff_fix",
    "insert_args_after",
    "insert_statement_after",
    "insert_statement_before",
    "method_receiver",
    "nn_prefix",
    "read",
    "remove_arg",
    "replace_calls",
    "set_keyword",
    "set_positional",
    "torch_function_prefix",
    "unified_diff",
    "unwrap_attribute",
    "unwrap_call",
    "unwrap_with",
    "wrap_attribute",
    "wrap_receiver",
    "wrap_call",
    "wrap_call_argument",
]


def read(path: str) -> str | None:
    """The text of a Python source file, or None (ONNX files and unreadable paths get snippets)."""
    if not str(path).endswith(".py"):
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def unified_diff(path: str, old: str, new: str) -> str:
    shown = display_path(path)
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"a/{shown}",
            tofile=f"b/{shown}",
        )
    )


def diff_fix(
    summary: str,
    path: str | None,
    edit: Callable[[str], str | None],
    snippet: str,
    safe: bool = True,
) -> Fix:
    """A Fix carrying a diff when `edit` locates the code in `path`, else the snippet. Never a
    diff against library code (a file of an installed package: the user cannot patch it, and
    `--fix` must not write there): the snippet."""
    if path and not in_installed_package(path):
        old = read(path)
        if old is not None:
            try:
                new = edit(old)
            except cst.ParserSyntaxError:
                new = None
            if new is not None and new != old:
                return Fix(
                    summary, unified_diff(path, old, new), "diff", path, safe, new_source=new
                )
    return Fix(summary, snippet, "snippet", None, safe)


def nn_prefix(source: str) -> str:
    """How this file spells torch.nn: 'nn.' or 'torch.nn.'."""
    if re.search(r"^\s*(from torch import .*\bnn\b|import torch\.nn as nn)", source, re.M):
        return "nn."
    return "torch.nn."


def torch_function_prefix(source: str) -> str | None:
    """How this file can call a torch function: 'torch.' or 'F.' (None if neither is imported)."""
    if re.search(r"^\s*import torch\b(?!\.)", source, re.M) or re.search(
        r"^\s*import torch\s*$", source, re.M
    ):
        return "torch."
    if re.search(
        r"^\s*import torch\.nn\.functional as F\b"
        r"|^\s*from torch\.nn import functional as F\b",
        source,
        re.M,
    ):
        return "F."
    return None
