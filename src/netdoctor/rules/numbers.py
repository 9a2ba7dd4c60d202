"""How rule messages write numbers: `g` (3 significant digits, scientific when tiny or huge) and
`pct` (a share as a percentage)."""

from __future__ import annotations

import math
from typing import Any


def g(v: Any) -> str:
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return str(f)
    if f == 0:
        return "0"
    if abs(f) >= 1e4 or abs(f) < 1e-3:
        return f"{f:.2e}"
    return f"{f:.3g}"


def pct(v: float) -> str:
    return f"{100 * v:.0f}%" if v < 0.995 or v >= 1 else f"{100 * v:.1f}%"
