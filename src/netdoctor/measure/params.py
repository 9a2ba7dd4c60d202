"""Per-parameter gradient norms, weight norms and update/weight ratios.

`ParamMeter` measures a list of parameters around one optimizer step: `before_step()` after
backward (gradient and weight norms, a snapshot of the weights), `after_step()` after the update
(how far each weight moved). Norms are fused `torch._foreach_norm` calls and everything one call
needs crosses to the host in a single `.tolist()` -- extra scalars of the caller's (the loss, the
number of correct predictions) ride along on the same sync.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from netdoctor.measure.record import ParamTrace


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (FSDP2 `fully_shard`, tensor parallelism): a shard of a tensor laid out over a
    device mesh."""
    return callable(getattr(t, "to_local", None)) and hasattr(t, "placements")


def local(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `t`: a DTensor's local shard (measuring it needs no collective:
    a norm or a host sync of a DTensor would all-reduce over the user's mesh), else `t`."""
    # a DTensor is a torch.Tensor subclass with to_local() (torch.distributed.tensor.DTensor)
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


class ParamMeter:
    """Fills one `ParamTrace` per parameter; used by the probe's loop and the watcher alike.

    `before_step(extra)` measures and syncs in one go; a caller that gathers other device
    scalars into the same sync uses `prepare()` (device scalars, no sync) and `record(values)`.
    The weight snapshot's buffers are kept for the next measured step while `keep` is set (every
    step measured: a copy into them costs less than a fresh allocation); the watcher clears it
    when the next step is not measured, so no copy of the weights stays between deep steps."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], module_types: dict[str, str]) -> None:
        self.params = [p for _, p in named]
        self.traces = [
            ParamTrace(
                n, n.rpartition(".")[0], module_types.get(n.rpartition(".")[0], "?"), tuple(p.shape)
            )
            for n, p in named
        ]
        self._before: list[torch.Tensor] | None = None
        self._spare: list[torch.Tensor] | None = None  # buffers for the next snapshot
        self._weights: list[float] = []
        self.have: list[bool] = []  # per parameter: it had a gradient at `prepare()`
        self.n_grads = 0  # how many of `prepare()`'s scalars are gradient norms (they lead)
        self.keep = True
        self.bad_grad = False  # a gradient of the last measured step was non-finite

    def prepare(self) -> list[torch.Tensor]:
        """This step's gradient norms (of the parameters that have a gradient, as backward left
        it) then weight norms (before the update), as float32 device scalars; snapshots the
        weights for `after_step`. No host sync."""
        self.have = [p.grad is not None for p in self.params]
        present = [local(p.grad) for p in self.params if p.grad is not None]
        gnorms = torch._foreach_norm(present) if present else []
        weights = [local(p.detach()) for p in self.params]
        wnorms = torch._foreach_norm(weights) if weights else []
        self._snapshot(weights)
        self.n_grads = len(gnorms)
        return [v.float() for v in gnorms] + [v.float() for v in wnorms]

    def record(self, values: list[float]) -> None:
        """Fill the traces from `prepare()`'s scalars as host floats. A parameter without a
        gradient gets NaN and does not count in `steps_with_grad`."""
        n = self.n_grads
        measured = iter(values[:n])
        grads = [next(measured) if h else math.nan for h in self.have]
        self._weights = list(values[n:])
        self.bad_grad = False
        for tr, gv, wv, h in zip(self.traces, grads, self._weights, self.have):
            tr.grad_norm.append(gv)
            tr.weight_norm.append(wv)
            tr.steps_with_grad += int(h)
            self.bad_grad |= h and not math.isfinite(gv)

    def before_step(self, extra: list[torch.Tensor] | None = None) -> list[float]:
        """Record this step's gradient and weight norms and snapshot the weights for
        `after_step`, in one host sync. Returns `extra` as floats."""
        extra = [e.detach().float().reshape(()) for e in (extra or [])]
        scalars = extra + self.prepare()
        values = torch.stack(scalars).tolist() if scalars else []
        self.record(values[len(extra) :])
        return values[: len(extra)]

    def _snapshot(self, weights: list[torch.Tensor]) -> None:
        spare, self._spare = self._spare, None
        if (
            spare is not None
            and len(spare) == len(weights)
            and all(
                b.shape == w.shape and b.dtype == w.dtype and b.device == w.device
                for b, w in zip(spare, weights)
            )
        ):
            torch._foreach_copy_(spare, weights)
            self._before = spare
        else:
            self._before = [w.clone() for w in weights]

    def after_step(self) -> None:
        """Record each parameter's update relative to max(its weight norm, the norm default
        init gives its shape), so a zero-initialised layer does not look infinitely fast."""
        before, self._before = self._before, None
        if before is None:
            return
        if before:  # before - after, in place: the update's norm without another copy
            torch._foreach_sub_(before, [local(p.detach()) for p in self.params])
        moved = torch.stack(torch._foreach_norm(before)).tolist() if before else []
        self._spare = before if self.keep else None
        for tr, d, w in zip(self.traces, moved, self._weights):
            scale = max(w, tr.reference_norm)
            tr.update_ratio.append(d / scale if scale > 0 else (math.inf if d > 0 else 0.0))

    def discard(self) -> None:
        """Drop the weight snapshot (the step was not taken)."""
        self._before = None
        self._spare = None
