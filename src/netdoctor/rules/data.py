"""ND3xx: problems visible in a sample of the data (`netdoctor check --data`, `netdoctor probe`).

The rules read `ctx.data`, a `DataSample`. Build one with `sample_data(source, model)` (draws the
first batches of an opened `netdoctor.data.DataSource` and measures the model's output size), or
construct it directly:

    DataSample(x=x, y=y, description="my tensors")            # nothing known about the model
    DataSample(x, y, "FashionMNIST ...", num_outputs=10, loss="cross_entropy")

Only `x` and `y` are required; every other field refines what the rules may conclude:

* `num_outputs` (C) enables the label-range checks of ND303; `output_shape` tells class-index
  targets (y of shape (N,) or (N, H, W) against outputs (N, C[, H, W])) from per-output targets
  (y shaped like the output: regression, multi-label, soft labels), which ND303 leaves alone.
* `loss`: the loss the probe trains with (``"cross_entropy"``, ``"nll"``, ``"mse"``, ...). None
  means unknown: class-index targets are then recognised from y's dtype and shape.
* `builtin` / `raw` / `normalized`: how a built-in set was served (`--raw`, `--normalize`), so
  fixes can say "drop --raw".
* `num_classes`: classes the source *declares* (built-in sets); None when only inferred from
  labels (synthetic data has as many classes as it was asked for, so it declares nothing).
* `model_input`: statistics of what the model's first weight layer (Linear/Conv/RNN) received on
  a few samples; when the raw data is off-scale but this is at unit scale, the model rescales its
  input itself (e.g. ``x / 255`` inside forward) and ND301 stays silent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from netdoctor.findings import Fix
from netdoctor.loading.forward import main_output
from netdoctor.rules.registry import Context, rule

# Losses whose targets are class indices (the names the probe uses, case-insensitive).
CLASS_INDEX_LOSSES = {
    "cross_entropy",
    "crossentropy",
    "crossentropyloss",
    "ce",
    "nll",
    "nll_loss",
    "nllloss",
}

_WEIGHT_LAYERS = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.RNNBase)


@dataclass
class DataSample:
    """A sample of the data, as the ND3xx rules see it.

    x: inputs of a few batches concatenated (N, ...). Float inputs are checked for scale;
        integer inputs (token ids) are not.
    y: the matching targets (N, ...).
    description: one line saying what was sampled (goes into the report's notes).
    num_outputs: the model's output size C (classes), from an eval-mode forward of a couple of
        samples; None when no model was given or its forward failed.
    output_shape: the full output shape of that forward (batch of `probe_batch`), or None.
    loss: the loss in use when known ("cross_entropy", "nll", "mse", "bce", ...); None: unknown.
    source: the data source string (``"fashionmnist"``, ``"data.npz"``, ``"file.py:fn"``).
    builtin: a built-in set (fashionmnist/mnist) served by netdoctor.
    raw: a built-in set served raw (0..255, ``--raw``).
    normalized: a built-in set served with ``--normalize``.
    num_classes: classes the source declares (built-in sets); None when unknown.
    batch_size: samples per batch when netdoctor did the batching (to name batch/row).
    model_input: stats of the first weight layer's input on `probe_batch` samples:
        {"module", "mean", "std", "abs_q999"}; None when unknown.
    notes: lines for the report (e.g. the model's forward failed on the data).
    """

    x: torch.Tensor
    y: torch.Tensor
    description: str = ""
    num_outputs: int | None = None
    output_shape: tuple[int, ...] | None = None
    loss: str | None = None
    source: str | None = None
    builtin: bool = False
    raw: bool = False
    normalized: bool = False
    num_classes: int | None = None
    batch_size: int | None = None
    model_input: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_source(cls, source, n_batches: int = 4, spec=None) -> DataSample:
        """Draw the first `n_batches` batches of an opened DataSource (no model involved)."""
        from netdoctor.data.sources import BUILTIN_SETS

        x, y = source.sample(n_batches)
        name = getattr(spec, "source", None)
        key = (name or "").strip().lower().replace("-", "").replace("_", "")
        if spec is not None:
            builtin = key in BUILTIN_SETS
            raw = bool(spec.raw) and builtin
            normalized = bool(spec.normalize) and builtin
        else:  # read it off the source itself
            builtin = type(source).__name__ == "_BuiltinSource"
            raw = builtin and "(raw)" in source.description
            normalized = builtin and "normalized" in source.description
        return cls(
            x=x,
            y=y,
            description=source.description,
            source=name,
            builtin=builtin,
            raw=raw,
            normalized=normalized,
            num_classes=source.num_classes if builtin else None,
            batch_size=source.batch_size,
        )

    def for_model(self, model: nn.Module | None, probe_batch: int = 8) -> DataSample:
        """A copy with num_outputs / output_shape / model_input measured on `model`.

        Runs one no-grad eval-mode forward of the first `probe_batch` samples (modes restored);
        a failing forward leaves those fields None and adds a note.
        """
        out = replace(
            self, notes=list(self.notes), num_outputs=None, output_shape=None, model_input=None
        )
        if model is None or self.x.shape[0] == 0:
            return out
        from netdoctor.loading.forward import ForwardFailure, run_forward

        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        if self.x[0].numel() > 100_000:  # ImageNet-sized inputs: two samples say enough
            probe_batch = min(probe_batch, 2)
        xb = self.x[:probe_batch].to(device)
        seen: dict[str, Any] = {}
        names = {m: n for n, m in model.named_modules()}

        def pre(mod, args):
            if seen or not args or not isinstance(args[0], torch.Tensor):
                return
            t = args[0]
            if t.is_floating_point():
                seen.update(_unit_stats(t.detach()), module=names.get(mod) or type(mod).__name__)

        handles = [
            m.register_forward_pre_hook(pre)
            for m in model.modules()
            if isinstance(m, _WEIGHT_LAYERS)
        ]
        try:
            result = run_forward(model, xb)
        except ForwardFailure as e:
            where = f" in {e.module}" if e.module else ""
            out.notes.append(
                f"data: the model's forward failed on a data batch of shape "
                f"{tuple(xb.shape)}{where} ({e}); label checks against the "
                "model's outputs skipped"
            )
            return out
        finally:
            for h in handles:
                h.remove()
        logits = main_output(result)
        if logits is not None:
            out.output_shape = tuple(logits.shape)
            out.num_outputs = _classes_from_output(tuple(logits.shape), tuple(self.y.shape))
        out.model_input = seen or None
        return out


def sample_data(
    source, model: nn.Module | None = None, n_batches: int = 4, spec=None
) -> DataSample:
    """Draw a DataSample from an opened DataSource and, given a model, measure its outputs.

    `spec` (the DataSpec the source was opened with) lets the rules know a built-in set was
    served raw or normalized; without it the sample says nothing about that.
    """
    return DataSample.from_source(source, n_batches, spec).for_model(model)


# -------------------------------------------------------------------------------- helpers


def _classes_from_output(out: tuple[int, ...], y: tuple[int, ...]) -> int | None:
    """C of the output, reading class-index conventions: (N, C), (N, C, *S) against y (N, *S),
    (N, T, C) against y (N, T)."""
    if len(out) == 1:
        return 1
    if len(out) == 2:
        return out[1]
    if len(y) >= 1 and tuple(y[1:]) == tuple(out[2:]):
        return out[1]
    if len(y) >= 1 and tuple(y[1:]) == tuple(out[1:-1]):
        return out[-1]
    return out[1]


def _finite_values(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    if not flat.is_floating_point():
        return flat.to(torch.float64)
    flat = flat.to(torch.float64)
    return flat[torch.isfinite(flat)]


def _unit_stats(t: torch.Tensor) -> dict[str, float]:
    v = _finite_values(t)
    if v.numel() == 0:
        return {"mean": math.nan, "std": math.nan, "abs_q999": math.nan}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(unbiased=False)),
        "abs_q999": _abs_quantile(v, 0.999),
    }


def _abs_quantile(v: torch.Tensor, q: float) -> float:
    a = v.abs()
    if a.numel() > 2_000_000:  # torch.quantile's size limit; a strided subsample is plenty
        a = a[:: a.numel() // 1_000_000 + 1]
    return float(torch.quantile(a, q))


def _channel_dim(x: torch.Tensor) -> int | None:
    """The axis holding channels/features: (N, F) -> 1, (N, C, H, W[, ...]) -> 1,
    (N, T, F) -> 2 (sequences); None for (N,) and square (N, H, W) single-channel images."""
    if x.dim() == 2 or x.dim() >= 4:
        return 1
    if x.dim() == 3 and x.shape[1] != x.shape[2]:
        return 2
    return None


def _per_channel(x: torch.Tensor, dim: int | None) -> dict[str, torch.Tensor]:
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


def _overall(ch: dict[str, torch.Tensor]) -> dict[str, float]:
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


_MAX_STAT_VALUES = 8_000_000


def _limit(x: torch.Tensor) -> torch.Tensor:
    """Every k-th sample, so statistics read at most ~8M values (big image batches)."""
    per = max(1, x[0].numel()) if x.dim() and x.shape[0] else 1
    k = (x.shape[0] * per) // _MAX_STAT_VALUES + 1 if x.dim() else 1
    return x[::k] if k > 1 else x


def _is_float_input(x: torch.Tensor) -> bool:
    """Inputs whose scale matters: floats, and uint8 (raw pixels); not token ids."""
    return x.is_floating_point() or x.dtype == torch.uint8


def _f4(v: float) -> str:
    return f"{v:.4f}"


def _tuple(values: list[float]) -> str:
    return "(" + ", ".join(_f4(v) for v in values) + ("," if len(values) == 1 else "") + ")"


def _g(v: float) -> str:
    return f"{v:.4g}"


# -------------------------------------------------------------------------------- ND301

# Fixed ranges of integer-coded inputs: the scale fix divides by the range's top. A range
# fits data whose maximum lies in its upper three quarters (0..255 for a maximum of 64..255).
_RANGES = (16.0, 255.0, 1023.0, 4095.0, 65535.0)
_RANGE_NAMES = {
    16.0: "e.g. 4-bit intensities such as scikit-learn's 8x8 digits",
    1023.0: "10-bit values",
    4095.0: "12-bit sensor values",
    65535.0: "16-bit images",
}


def _nominal_range(stats: dict[str, float], integer_coded: bool) -> float | None:
    """The fixed range (0..16, 0..255, ..., 0..65535) non-negative integer data is coded in,
    or None when it is not such data (signed, fractional, or a maximum no range fits)."""
    if not integer_coded or stats["min"] < 0 or not stats["max"] > 1:
        return None
    for top in _RANGES:
        if top / 4 <= stats["max"] <= top:
            return top
    return None


def _standardize(mean: float, std: float) -> str:
    shift = f"x - {_g(mean)}" if mean >= 0 else f"x + {_g(-mean)}"
    return f"({shift}) / {_g(std)}"


def _off_scale(stats: dict[str, float], limits: tuple[float, float, float, float]) -> list[str]:
    """Which unit-scale limits (max |mean|, max std, min std, max 99.9th percentile of |x|) the
    statistics break; empty: at unit scale."""
    max_mean, max_std, min_std, max_abs = limits
    reasons: list[str] = []
    if not all(math.isfinite(stats[k]) for k in ("mean", "std")):
        return reasons
    if abs(stats["mean"]) > max_mean:
        reasons.append(f"|mean| {_g(abs(stats['mean']))} > {_g(max_mean)}")
    if stats["std"] > max_std:
        reasons.append(f"std {_g(stats['std'])} > {_g(max_std)}")
    if stats["std"] < min_std:
        reasons.append(f"std {_g(stats['std'])} < {_g(min_std)}")
    q = stats.get("abs_q999", math.nan)
    if math.isfinite(q) and q > max_abs:
        reasons.append(f"99.9th percentile of |x| {_g(q)} > {_g(max_abs)}")
    return reasons


@rule("ND301", needs="data")
def input_not_normalized(ctx: Context):
    s: DataSample = ctx.data
    x = s.x
    if not _is_float_input(x) or x.numel() == 0 or x.dim() == 0:
        return
    x = _limit(x)
    dim = _channel_dim(x) if x.dim() >= 4 else None  # Normalize works per image channel
    ch = _per_channel(x, dim)
    stats = _overall(ch)
    if not math.isfinite(stats["mean"]):
        return
    limits = (
        float(ctx.option("ND301", "max-abs-mean", 3.0)),
        float(ctx.option("ND301", "max-std", 10.0)),
        float(ctx.option("ND301", "min-std", 0.01)),
        float(ctx.option("ND301", "max-abs", 20.0)),
    )
    values = ch["flat"][ch["finite"]]
    stats["abs_q999"] = _abs_quantile(values, 0.999)
    reasons = _off_scale(stats, limits)
    if not reasons:
        return
    mi = s.model_input
    if mi and not _off_scale({k: mi.get(k, math.nan) for k in ("mean", "std", "abs_q999")}, limits):
        return  # the model rescales its input itself before the first weight layer

    integer_valued = bool(torch.equal(values, values.round()))
    top = _nominal_range(stats, integer_valued or s.raw)
    twice = 0 <= stats["min"] and 0 < stats["max"] <= 1 / 255 + 1e-9
    evidence: dict[str, Any] = {
        "mean": stats["mean"],
        "std": stats["std"],
        "min": stats["min"],
        "max": stats["max"],
        "abs_q999": stats["abs_q999"],
        "samples": int(x.shape[0]),
        "integer_valued": integer_valued,
        "limits_broken": reasons,
    }
    measured = (
        f"mean {_g(stats['mean'])}, std {_g(stats['std'])}, min {_g(stats['min'])}, "
        f"max {_g(stats['max'])}"
    )
    means = (ch["mean"]).tolist()
    stds = ch["std"].tolist()
    if top is not None:
        t = f"{top:g}"
        scaled_m = [m / top for m in means]
        scaled_s = [max(v / top, 1e-8) for v in stds]
        evidence["looks_like"] = "raw 0..255 pixels" if top == 255 else f"integers in 0..{t}"
        evidence["range_max"] = float(top)
        evidence["scaled_mean"] = scaled_m
        evidence["scaled_std"] = scaled_s
        norm = f"transforms.Normalize({_tuple(scaled_m)}, {_tuple(scaled_s)})"
        what = (
            "raw 0..255 pixels"
            if top == 255
            else f"integer values in 0..{t} ({_RANGE_NAMES.get(top, 'a fixed-range encoding')})"
        )
        message = (
            f"the inputs are {what} ({measured} over {x.shape[0]} samples; "
            f"{'; '.join(reasons)}): with values this large the first layer's outputs "
            "are large, and at a high learning rate ReLUs die or saturate and the loss "
            "stalls"
            + (
                " (the 784-300-10 MLP on raw FashionMNIST pixels reached accuracy 0.1)"
                if top == 255
                else ""
            )
            + f". Scale them to [0, 1] by their range (x / {t}) and standardize: after "
            f"the division the measured mean is {_tuple(scaled_m)} and std "
            f"{_tuple(scaled_s)}."
        )
        lines = []
        if s.builtin and s.raw:
            lines.append(
                "# netdoctor served this built-in set raw because of --raw: drop --raw "
                "(the default is [0, 1], like ToTensor)"
            )
            lines.append("# or add --normalize to standardize with the measured statistics.")
        lines += [
            f"# scale the 0..{t} values to [0, 1] before they reach the model:",
            f"x = x / {top:.1f}",
        ]
        if top == 255:
            lines += [
                "# then standardize; in a torchvision pipeline (ToTensor already divides by 255):",
                f"transforms.Compose([transforms.ToTensor(), {norm}])",
            ]
        else:
            lines += [
                "# then standardize with the statistics measured after the division:",
                norm if len(means) > 1 else f"x = (x - {_f4(scaled_m[0])}) / {_f4(scaled_s[0])}",
            ]
        if len(means) == 1 and top == 255:
            lines += ["# or by hand:", f"x = (x / 255.0 - {_f4(scaled_m[0])}) / {_f4(scaled_s[0])}"]
        summary = (
            f"scale the inputs: x = x / {top:.1f}, then Normalize({_tuple(scaled_m)}, "
            f"{_tuple(scaled_s)})"
        )
    else:
        m, sd = stats["mean"], max(stats["std"], 1e-12)
        message = (
            f"the inputs are far from unit scale ({measured} over {x.shape[0]} samples; "
            f"{'; '.join(reasons)}): the first layer's pre-activations inherit this "
            "scale, so ReLUs die or saturate and gradients are off by the same factor. "
            "Standardize them to mean 0, std 1."
        )
        lines = []
        if twice:
            message += " They look divided by 255 twice (max <= 1/255)."
            lines.append("# the values are <= 1/255: remove the second division by 255, or:")
        if s.builtin and s.normalized is False and s.raw:
            lines.append("# drop --raw (or add --normalize)")
        fdim = _channel_dim(x)
        if len(means) > 1:
            norm = f"transforms.Normalize({_tuple(means)}, {_tuple([max(v, 1e-8) for v in stds])})"
            lines += ["# per channel, with the measured statistics:", norm]
            summary = f"standardize per channel: {norm}"
        elif fdim is not None and x.shape[fdim] > 1:
            # tabular / sequence features: standardize each one (StandardScaler)
            dims = _dims_but(x, fdim)
            lines += [
                "# standardize each feature with statistics of the TRAINING data:",
                f"mean = x_train.mean(dim={dims}, keepdim=True)",
                f"std = x_train.std(dim={dims}, keepdim=True).clamp_min(1e-8)",
                "x = (x - mean) / std",
                f"# (over all features at once: x = {_standardize(m, sd)})",
            ]
            summary = "standardize each feature: x = (x - mean) / std (training-set statistics)"
        else:
            lines += ["# standardize with the measured statistics:", f"x = {_standardize(m, sd)}"]
            summary = f"standardize the inputs: x = {_standardize(m, sd)}"
    evidence["channel_mean"] = means
    evidence["channel_std"] = stds
    yield ctx.finding(
        "ND301",
        message,
        fix=Fix(summary, "\n".join(lines) + "\n", "snippet"),
        evidence=evidence,
        impact=10.0,
    )


# -------------------------------------------------------------------------------- ND302


@rule("ND302", needs="data")
def feature_scale_mismatch(ctx: Context):
    s: DataSample = ctx.data
    x = s.x
    if not _is_float_input(x) or x.numel() == 0 or x.dim() == 0:
        return
    x = _limit(x)
    dim = _channel_dim(x)
    if dim is None or x.shape[dim] < 2:
        return
    max_ratio = float(ctx.option("ND302", "max-ratio", 100.0))
    min_share = float(ctx.option("ND302", "min-varying-share", 0.1))
    ch = _per_channel(x, dim)
    word = "channel" if x.dim() >= 4 else "feature"
    std = ch["std"]
    constant = [i for i in range(std.numel()) if not std[i] > 0]
    # A feature that differs from its own median in under `min_share` of the values is sparse
    # (a border pixel, a rare one-hot column): its std measures rarity, not units.
    flat, finite = ch["flat"], ch["finite"]
    rows = flat if flat.shape[0] <= 200_000 else flat[:: flat.shape[0] // 100_000 + 1]
    fin = finite if flat.shape[0] <= 200_000 else finite[:: flat.shape[0] // 100_000 + 1]
    filled = torch.where(fin, rows, torch.full_like(rows, math.nan))
    median = filled.nanmedian(0).values
    varying = ((rows != median) & fin).to(torch.float64).sum(0) / fin.sum(0).clamp_min(1)
    sparse = [i for i in range(std.numel()) if i not in constant and float(varying[i]) < min_share]
    dense = [i for i in range(std.numel()) if i not in constant and i not in sparse]
    if len(dense) < 2:
        return
    dstd = std[dense]
    hi_i, lo_i = dense[int(dstd.argmax())], dense[int(dstd.argmin())]
    ratio = float(std[hi_i] / std[lo_i])
    if not ratio > max_ratio:
        return
    order = sorted(dense, key=lambda i: float(std[i]))
    big = [i for i in reversed(order) if float(std[i]) > max_ratio * float(std[lo_i])][:5]
    small = [i for i in order if float(std[hi_i]) > max_ratio * float(std[i])][:5]

    def named(ids):
        return ", ".join(f"{word} {i} (std {_g(float(std[i]))})" for i in ids)

    message = (
        f"input {word}s differ in scale by {ratio:.3g}x (std of {word} {hi_i}: "
        f"{_g(float(std[hi_i]))}, of {word} {lo_i}: {_g(float(std[lo_i]))}; threshold "
        f"{_g(max_ratio)}x): largest {named(big)}; smallest {named(small)}. The large "
        f"{word}s dominate the first layer and its gradients, the small ones are "
        "effectively ignored, and no single learning rate suits both (BatchNorm after "
        "the first layer does not undo this)."
    )
    if constant:
        message += (
            f" {len(constant)} {word}(s) are constant and carry no information: "
            f"{', '.join(map(str, constant[:10]))}{' ...' if len(constant) > 10 else ''}."
        )
    means = ch["mean"].tolist()
    stds = [max(float(v), 1e-8) for v in std.tolist()]
    if word == "channel":
        norm = f"transforms.Normalize({_tuple(means)}, {_tuple(stds)})"
        lines = ["# standardize each channel with the measured statistics:", norm]
        summary = f"standardize per channel: {norm}"
    else:
        lines = [
            (
                "# standardize each feature with statistics of the TRAINING data "
                "(reuse them for validation/test):"
            ),
            f"mean = x_train.mean(dim={_dims_but(x, dim)}, keepdim=True)",
            f"std = x_train.std(dim={_dims_but(x, dim)}, keepdim=True).clamp_min(1e-8)",
            "x = (x - mean) / std",
            "# or: sklearn.preprocessing.StandardScaler().fit(x_train).transform(x)",
        ]
        if len(means) <= 8:
            lines += [
                "# measured on this sample:",
                f"mean = torch.tensor({[round(m, 6) for m in means]})",
                f"std = torch.tensor({[round(v, 6) for v in stds]})",
            ]
        summary = "standardize each feature: x = (x - mean) / std, per feature"
    yield ctx.finding(
        "ND302",
        message,
        fix=Fix(summary, "\n".join(lines) + "\n", "snippet"),
        evidence={
            "axis": dim,
            "word": word,
            "ratio": ratio,
            "max_ratio": max_ratio,
            "largest": {str(i): float(std[i]) for i in big},
            "smallest": {str(i): float(std[i]) for i in small},
            "std": std.tolist(),
            "mean": means,
            "constant": constant,
            "sparse": sparse,
        },
        impact=11.0,
    )  # above ND301's: standardizing each feature also fixes the overall scale


def _dims_but(x: torch.Tensor, dim: int) -> str:
    dims = [d for d in range(x.dim()) if d != dim]
    return str(dims[0]) if len(dims) == 1 else "(" + ", ".join(map(str, dims)) + ")"


# -------------------------------------------------------------------------------- ND303


def _value_counts(v: torch.Tensor, limit: int = 10) -> dict[str, int]:
    vals, counts = torch.unique(v, return_counts=True)
    pairs = sorted(zip(vals.tolist(), counts.tolist()), key=lambda p: p[0])
    return {_label(a): int(c) for a, c in pairs[:limit]}


def _label(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} (x{c})" for k, c in counts.items())


@rule("ND303", needs="data")
def label_mismatch(ctx: Context):
    s: DataSample = ctx.data
    y = s.y
    C = s.num_outputs
    loss = (s.loss or "").strip().lower().replace("-", "_")
    ce = loss in CLASS_INDEX_LOSSES
    if (loss and not ce) or y.numel() == 0 or y.dtype == torch.bool:
        return
    if (s.source or "").strip().lower() == "synthetic":
        return  # netdoctor made these labels up, with as many classes as it was asked for
    if (
        s.output_shape is not None
        and tuple(y.shape[1:]) == tuple(s.output_shape[1:])
        and y.dim() >= 2
    ):
        return  # targets shaped like the outputs: regression, multi-label or soft labels
    is_float = y.is_floating_point()
    if is_float and not ce and not (C is not None and C > 1):
        return  # float targets with no class-index loss in sight: regression
    if not is_float and C == 1 and not ce:
        return  # one output: binary or regression targets, not class indices
    ignore_index = int(ctx.option("ND303", "ignore-index", -100))
    min_per_class = int(ctx.option("ND303", "min-samples-per-class", 20))

    v = y.reshape(-1)
    if is_float:
        v = v.to(torch.float64)
        v = v[torch.isfinite(v)]  # ND304 reports non-finite targets
    else:
        v = v.to(torch.int64)
    problems: list[str] = []
    fixes: list[str] = []
    evidence: dict[str, Any] = {"num_outputs": C, "labels": int(v.numel())}
    if v.numel() == 0:
        return
    if is_float:
        frac = v != v.round()
        n_frac = int(frac.sum())
        if n_frac:
            counts = _value_counts(v[frac], 5)
            problems.append(
                f"{n_frac} of {v.numel()} labels are not integers "
                f"(e.g. {_counts_text(counts)}): class labels must be integer "
                "indices 0..C-1"
            )
            fixes += [
                "# class labels must be int64 indices in [0, C):",
                "y = y.round().long()   # if they are class ids stored with noise",
                (
                    "# soft/probability targets must have shape (N, C); use a regression "
                    "loss (MSELoss) for real-valued targets"
                ),
            ]
            evidence["fractional"] = n_frac
            evidence["fractional_examples"] = counts
        else:
            problems.append(
                f"the class labels are stored as {str(y.dtype).replace('torch.', '')}"
                ": CrossEntropyLoss needs int64 class indices"
            )
            fixes += ["y = y.long()"]
            evidence["float_labels"] = True
        v = v.round().to(torch.int64)
    ignored = int((v == ignore_index).sum())
    if ignored:
        evidence["ignored"] = ignored
        v = v[v != ignore_index]
    if v.numel() == 0:
        return
    lo, hi = int(v.min()), int(v.max())
    seen = torch.unique(v)
    evidence.update(label_min=lo, label_max=hi, classes_seen=int(seen.numel()))
    if C is not None:
        bad = (v < 0) | (v >= C)
        n_bad = int(bad.sum())
        if n_bad:
            counts = _value_counts(v[bad])
            evidence["out_of_range"] = counts
            evidence["out_of_range_count"] = n_bad
            problems.append(
                f"{n_bad} of {v.numel()} labels are outside [0, {C}) for the "
                f"model's {C} outputs: {_counts_text(counts)}"
                f"{' ...' if len(torch.unique(v[bad])) > len(counts) else ''}"
            )
            if lo == 1 and hi == C:
                problems[-1] += f" (labels run 1..{C}: they look 1-based)"
                fixes += ["# the labels are 1-based (1..C): shift them to 0..C-1", "y = y - 1"]
            elif lo >= 0:
                fixes += [
                    (
                        f"# the data has labels up to {hi}: give the last layer {hi + 1} "
                        f"outputs (e.g. nn.Linear(..., {hi + 1})),"
                    ),
                    f"# or remap the labels into 0..{C - 1}",
                ]
            else:
                fixes += [
                    (
                        f"# remap the labels into 0..{C - 1} (negative labels are invalid; "
                        f"only {ignore_index} is ignored by CrossEntropyLoss)"
                    )
                ]
        if int(seen.numel()) > C:
            problems.append(f"{int(seen.numel())} classes seen but the model has {C} outputs")
        declared = s.num_classes
        if declared is not None and declared != C and not n_bad:
            problems.append(f"the data set has {declared} classes but the model has {C} outputs")
            fixes += [
                f"# make the last layer output {declared} classes (nn.Linear(..., {declared}))"
            ]
            evidence["declared_classes"] = declared
        elif declared is None and hi + 1 < C and not n_bad:
            flat_y = y.reshape(-1)
            sorted_sample = bool((flat_y[1:] >= flat_y[:-1]).all()) if flat_y.numel() > 1 else True
            if v.numel() >= min_per_class * C and not sorted_sample:
                problems.append(
                    f"the model has {C} outputs but only labels 0..{hi} "
                    f"({int(seen.numel())} classes) appear in {v.numel()} samples: "
                    f"outputs {hi + 1}..{C - 1} are never a target (this may be "
                    "fine if those classes are rare; check the last layer's size)"
                )
                fixes += [
                    (
                        f"# if the data has {hi + 1} classes, make the last layer output "
                        f"{hi + 1} (e.g. nn.Linear(..., {hi + 1}))"
                    )
                ]
    if not problems:
        return
    out_txt = f" (model outputs: {C})" if C is not None else ""
    message = "label mismatch" + out_txt + ": " + "; ".join(problems) + "."
    summary = (
        ("fix the labels: " + fixes[0].lstrip("# ").rstrip(","))
        if fixes
        else "make the labels class indices in [0, C) for the model's C outputs"
    )
    for line in fixes:
        if not line.startswith("#"):
            summary = f"fix the labels: {line.split('#')[0].strip()}"
            break
    yield ctx.finding(
        "ND303",
        message,
        fix=Fix(summary, "\n".join(fixes) + "\n", "snippet"),
        evidence=evidence,
        impact=20.0,
    )


# -------------------------------------------------------------------------------- ND304


def _nonfinite(t: torch.Tensor, batch_size: int | None) -> dict[str, Any] | None:
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


@rule("ND304", needs="data")
def non_finite_input(ctx: Context):
    s: DataSample = ctx.data
    found = {
        name: r
        for name, r in (("x", _nonfinite(s.x, s.batch_size)), ("y", _nonfinite(s.y, s.batch_size)))
        if r
    }
    if not found:
        return
    parts = []
    for name, r in found.items():
        where = ", ".join(map(str, r["first_samples"]))
        more = " ..." if r["samples"] > len(r["first_samples"]) else ""
        parts.append(
            f"{name} holds {r['nan']} NaN and {r['inf']} Inf values "
            f"({100 * r['fraction']:.3g}% of {r['values']}) in {r['samples']} of "
            f"{r['of_samples']} samples (first sample positions: {where}{more})"
        )
    systematic = [n for n, r in found.items() if r.get("always_nonfinite_positions")]
    if systematic:
        r = found[systematic[0]]
        parts.append(
            f"{r['always_nonfinite_positions']} positions of {systematic[0]} are "
            "non-finite in every sample: a per-feature statistic is the likely cause "
            "(standardizing by a std of 0 gives 0/0 = NaN), not a few bad samples"
        )
    message = (
        "non-finite data: " + "; ".join(parts) + ". One NaN input makes the loss and "
        "every gradient NaN, and the weights stay NaN after the update. Positions count "
        "samples in the order served (built-in sets and .npz files are shuffled)."
    )
    lines = (
        ["# standardizing per feature? guard the division:", "x = (x - mean) / std.clamp_min(1e-8)"]
        if systematic
        else []
    )
    lines += [
        (
            "# find where they come from (a division by a zero std, log(0), missing values)"
            " and fix it there; or drop the bad samples:"
        ),
        "bad = ~torch.isfinite(x).flatten(1).all(1)"
        if "x" in found
        else "bad = ~torch.isfinite(y.reshape(len(y), -1)).all(1)",
    ]
    if "x" in found and "y" in found:
        lines.append("bad |= ~torch.isfinite(y.reshape(len(y), -1)).all(1)")
    lines += [
        "x, y = x[~bad], y[~bad]",
        "# or replace them: x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)",
    ]
    yield ctx.finding(
        "ND304",
        message,
        fix=Fix(
            "guard the per-feature standardization: x = (x - mean) / std.clamp_min(1e-8)"
            if systematic
            else "remove or repair the non-finite samples before training",
            "\n".join(lines) + "\n",
            "snippet",
        ),
        evidence=found,
        impact=30.0,
    )
