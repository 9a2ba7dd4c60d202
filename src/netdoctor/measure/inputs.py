"""Statistics of a data sample's tensors, as the data rules (ND3xx) read them: finite values,
overall and per-channel mean/std/min/max, quantiles of |x|, the channel axis, label counts and
where the non-finite values are."""

from __future__ import annotations

import math
from typing import Any

import torch


def finite_values(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    if not flat.is_floating_point():
        return flat.to(torch.float64)
    flat = flat.to(torch.float64)
    return flat[torch.isfinite(flat)]


def unit_stats(t: torch.Tensor) -> dict[str, float]:
    v = finite_values(t)
    if v.numel() == 0:
        return {"mean": math.nan, "std": math.nan, "abs_q999": math.nan}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(unbiased=False)),
        "abs_q999": abs_quantile(v, 0.999),
    }


def abs_quantile(v: torch.Tensor, q: float) -> float:
    a = v.abs()
    if a.numel() > 2_000_000:  # torch.quantile's size limit; a strided subsample is plenty
        a = a[:: a.numel() // 1_000_000 + 1]
    return float(torch.quantile(a, q))


def channel_dim(x: torch.Tensor) -> int | None:
    """The axis holding channels/features: (N, F) -> 1, (N, C, H, W[, ...]) -> 1,
    (N, T, F) -> 2 (sequences); None for (N,) and square (N, H, W) single-channel images."""
    if x.dim() == 2 or x.dim() >= 4:
        return 1
    if x.dim() == 3 and x.shape[1] != x.shape[2]:
        return 2
    return None


def per_channel(x: torch.Tensor, dim: int | None) -> dict[str, torch.Tensor]:
    """Per-channel count/mean/std/min/max over finite values, in float64 (two passes)."""
    if dim is None:
        flat = x.reshape(-1, 1)
    else:
        flat = x.movedim(dim, -1).reshape(-1, x.shape[dim])
    flat = flat.to(torch.float64)
    finite = torch.isfinite(flat)
    zeros = torch.zeros((), dtype=torch.float64)
    count = finite.sum(0).to(torch.float64)
    safe = torch.where(finite, flat, zeros)
    mean = safe.sum(0) / count.clamp_min(1)
    dev = torch.where(finite, flat - mean, zeros)
    std = (dev.square().sum(0) / count.clamp_min(1)).sqrt()
    inf = torch.tensor(math.inf, dtype=torch.float64)
    lo = torch.where(finite, flat, inf).amin(0)
    hi = torch.where(finite, flat, -inf).amax(0)
    return {
        "count": count,
        "mean": mean,
        "std": std,
        "min": lo,
        "max": hi,
        "flat": flat,
        "finite": finite,
    }


def overall(ch: dict[str, torch.Tensor]) -> dict[str, float]:
    count = ch["count"]
    n = float(count.sum())
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    mean = float((ch["mean"] * count).sum() / n)
    var = float((count * (ch["std"].square() + (ch["mean"] - mean).square())).sum() / n)
    return {
        "mean": mean,
        "std": math.sqrt(max(var, 0.0)),
        "min": float(ch["min"].min()),
        "max": float(ch["max"].max()),
    }


MAX_STAT_VALUES = 8_000_000


def limit(x: torch.Tensor) -> torch.Tensor:
    """Every k-th sample, so statistics read at most ~8M values (big image batches)."""
    per = max(1, x[0].numel()) if x.dim() and x.shape[0] else 1
    k = (x.shape[0] * per) // MAX_STAT_VALUES + 1 if x.dim() else 1
    return x[::k] if k > 1 else x


def is_float_input(x: torch.Tensor) -> bool:
    """Inputs whose scale matters: floats, and uint8 (raw pixels); not token ids."""
    return x.is_floating_point() or x.dtype == torch.uint8


def value_counts(v: torch.Tensor, limit: int = 10) -> dict[str, int]:
    vals, counts = torch.unique(v, return_counts=True)
    pairs = sorted(zip(vals.tolist(), counts.tolist()), key=lambda p: p[0])
    return {label(a): int(c) for a, c in pairs[:limit]}


def label(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def nonfinite(t: torch.Tensor, batch_size: int | None) -> dict[str, Any] | None:
    if not t.is_floating_point() or t.numel() == 0:
        return None
    nan = torch.isnan(t)
    inf = torch.isinf(t)
    n_nan, n_inf = int(nan.sum()), int(inf.sum())
    if not (n_nan or n_inf):
        return None
    per_sample = (nan | inf).reshape(t.shape[0], -1).any(1) if t.dim() else (nan | inf)
    rows = torch.nonzero(per_sample).reshape(-1).tolist()
    out = {
        "nan": n_nan,
        "inf": n_inf,
        "values": int(t.numel()),
        "fraction": (n_nan + n_inf) / t.numel(),
        "samples": len(rows),
        "of_samples": int(t.shape[0]) if t.dim() else 1,
        "first_samples": rows[:10],
    }
    if t.dim() >= 2 and t.shape[0] > 1:
        always = (nan | inf).reshape(t.shape[0], -1).all(0)
        out["always_nonfinite_positions"] = int(always.sum())
    if batch_size:
        out["first_batch_rows"] = [[i // batch_size, i % batch_size] for i in rows[:10]]
    return out
