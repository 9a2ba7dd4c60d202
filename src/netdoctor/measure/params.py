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
    return t.to_local() if is_sharded(t) else t


class ParamMeter:
    """Fills one `ParamTrace` per parameter; used by the probe's loop and the watcher alike."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], module_types: dict[str, str]):
        self.params = [p for _, p in named]
        self.traces = [ParamTrace(n, n.rpartition(".")[0],
                                  module_types.get(n.rpartition(".")[0], "?"), tuple(p.shape))
                       for n, p in named]
        self._before: list[torch.Tensor] | None = None
        self._weights: list[float] = []
        self.bad_grad = False  # a gradient of the last measured step was non-finite

    def before_step(self, extra: list[torch.Tensor] | None = None) -> list[float]:
        """Record this step's gradient and weight norms (gradients as backward left them, weights
        before the update) and snapshot the weights for `after_step`. Returns `extra` as floats.
        A parameter without a gradient gets NaN and does not count in `steps_with_grad`."""
        extra = [e.detach().float().reshape(()) for e in (extra or [])]
        have = [p.grad is not None for p in self.params]
        present = [local(p.grad) for p in self.params if p.grad is not None]
        gnorms = torch._foreach_norm(present) if present else []
        weights = [local(p.detach()) for p in self.params]
        wnorms = torch._foreach_norm(weights) if weights else []
        self._before = [w.clone() for w in weights]
        scalars = extra + [v.float() for v in gnorms] + [v.float() for v in wnorms]
        values = torch.stack(scalars).tolist() if scalars else []
        k, n = len(extra), len(gnorms)
        measured = iter(values[k:k + n])
        grads = [next(measured) if h else math.nan for h in have]
        self._weights = values[k + n:]
        out = values[:k]
        self.bad_grad = False
        for tr, gv, wv, h in zip(self.traces, grads, self._weights, have):
            tr.grad_norm.append(gv)
            tr.weight_norm.append(wv)
            tr.steps_with_grad += int(h)
            self.bad_grad |= h and not math.isfinite(gv)
        return out

    def after_step(self) -> None:
        """Record each parameter's update relative to max(its weight norm, the norm default
        init gives its shape), so a zero-initialised layer does not look infinitely fast."""
        if self._before is None:
            return
        delta = torch._foreach_sub([local(p.detach()) for p in self.params], self._before)
        moved = torch.stack(torch._foreach_norm(delta)).tolist() if delta else []
        self._before = None
        for tr, d, w in zip(self.traces, moved, self._weights):
            scale = max(w, tr.reference_norm)
            tr.update_ratio.append(d / scale if scale > 0 else (math.inf if d > 0 else 0.0))

    def discard(self) -> None:
        """Drop the weight snapshot (the step was not taken)."""
        self._before = None
