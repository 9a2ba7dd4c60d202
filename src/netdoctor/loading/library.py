"""Library code: the files of installed packages (timm, transformers, ...), which the user cannot
patch. Named by the folder they are installed in (`site-packages`, `dist-packages`), wherever
that folder sits: a virtual environment keeps it outside the standard library's folder, a system
Python inside it, and reports must not depend on which.

Torch-free: findings (`Rule.finding`), fixes (`diff_fix`) and reporters ask it too.
"""

from __future__ import annotations

import os

_FOLDERS = ("site-packages", "dist-packages")


def _parts(path: str | os.PathLike[str]) -> list[str]:
    return os.fspath(path).replace("\\", "/").split("/")


def in_installed_package(path: str | os.PathLike[str] | None) -> bool:
    """Whether `path` lies inside an installed package's folder."""
    if not path:
        return False
    return any(folder in _parts(path)[:-1] for folder in _FOLDERS)


def package_path(path: str | os.PathLike[str]) -> str | None:
    """The path inside the packages folder, as the import system sees it
    (`.../site-packages/timm/models/nfnet.py` -> `timm/models/nfnet.py`), or None when `path`
    is not in an installed package."""
    parts = _parts(path)
    for i in range(len(parts) - 2, -1, -1):  # the innermost packages folder
        if parts[i] in _FOLDERS:
            return "/".join(parts[i + 1 :])
    return None


def package_name(path: str | os.PathLike[str]) -> str | None:
    """The top-level package (or module) a library file belongs to: `timm`, `transformers`."""
    inner = package_path(path)
    if not inner:
        return None
    top = inner.split("/")[0]
    return top[:-3] if top.endswith(".py") else top
