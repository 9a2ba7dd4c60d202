"""One optimizer of the user's training, as the watcher follows it step by step.

Every step costs a handful of device operations that never sync on their own: the total
gradient norm (fused `_foreach_norm`, grouped by device and dtype), a few small sampled
parameters cloned before the update and compared after it (did the step change anything?), and,
at each backward, whether those sampled parameters still held a non-zero gradient (was it
cleared since the last step?). The doctor stacks all of these with the loss into one host sync
per step (`PendingScalars`).
"""

from __future__ import annotations

import heapq
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from netdoctor.measure.facts import OptimizerFacts
from netdoctor.measure.params import local

SAMPLE = 4  # parameters sampled for the change and cleared-gradient checks
SAMPLE_MAX_NUMEL = 1 << 16  # ... each at most this big, so cloning them costs nothing
# ND503: the sampled parameters before a step and their values (one vector, or one each)
Snapshot = tuple[list[torch.nn.Parameter], torch.Tensor | list[torch.Tensor]]


class PendingScalars:
    """Device scalars waiting for the step's single host sync, each with what to do with its
    value. `add` never syncs; `resolve` moves them all to the host in one `.tolist()`."""

    def __init__(self) -> None:
        self.items: list[tuple[torch.Tensor, Callable[[float], None]]] = []

    def add(self, value: torch.Tensor, then: Callable[[float], None]) -> None:
        self.items.append((value.detach().reshape(()), then))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t, _ in self.items]

    def take(self) -> list[tuple[torch.Tensor, Callable[[float], None]]]:
        items, self.items = self.items, []
        return items

    @staticmethod
    def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        device = tensors[0].device
        return torch.stack([t.to(device=device, dtype=torch.float32) for t in tensors])

    def resolve(self) -> None:
        items = self.take()
        if not items:
            return
        values = self.stack([t for t, _ in items]).tolist()
        for (_, then), v in zip(items, values):
            then(v)


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The L2 norm over all gradients: one fused `_foreach_norm` per device and dtype, no host
    sync. Of a sharded (DTensor) gradient, this rank's shard: the ranks reduce them on deep
    steps (`distributed.sharded_square`)."""
    if not grads:
        return None
    grads = [local(g) for g in grads]
    first = grads[0]
    if all(g.device == first.device and g.dtype == first.dtype for g in grads):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    parts = [
        torch.stack(torch._foreach_norm(group)).to(device=first.device, dtype=torch.float32)
        for group in groups.values()
    ]
    return torch.linalg.vector_norm(torch.cat(parts))


def _carried(record: list[Any], index: int) -> Callable[[float], None]:
    """Where a backward's "is the consumed gradient still there?" flag goes."""

    def then(v: float) -> None:
        record[index] = v > 0.5

    return then


def _flat(params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The parameters' values as one vector (one copy), when they share device and dtype."""
    first = params[0]
    if not all(p.device == first.device and p.dtype == first.dtype for p in params):
        return None
    return torch.cat([local(p.detach()).reshape(-1) for p in params])


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer whose `step` runs torch's step hooks, inside a trainer's wrapper that does
    not (accelerate's `AcceleratedOptimizer` holds it in `.optimizer`, Lightning's
    `LightningOptimizer` in `._optimizer`). A wrapper that is itself a hooked Optimizer (e.g.
    Lookahead built on `torch.optim.Optimizer`) is kept: its steps are the ones that count."""
    seen: set[int] = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        if getattr(getattr(type(optimizer), "step", None), "hooked", False):
            return optimizer
        inner = next(
            (
                v
                for v in (
                    getattr(optimizer, "optimizer", None),
                    getattr(optimizer, "_optimizer", None),
                )
                if isinstance(v, torch.optim.Optimizer)
            ),
            None,
        )
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


class WatchedOptimizer:
    """Follows one optimizer: its parameters, the per-step facts, and the ND501/ND503 checks."""

    def __init__(self, optimizer: torch.optim.Optimizer, facts: OptimizerFacts):
        self.ref = weakref.ref(optimizer)
        self.facts = facts
        self._signature: tuple = ()
        self.params: list[torch.nn.Parameter] = []
        self.trainable: list[torch.nn.Parameter] = []
        self.ids: set[int] = set()
        self.in_step = False
        # ND501: per backward since the last step, whether every sampled parameter that had a
        # gradient still held a non-zero one (None: could not tell yet)
        self.carried: list[list[Any]] = []
        self.last_backward_site = None
        self._before: Snapshot | None = None
        self.sampled: list[torch.nn.Parameter] = []  # had a gradient at the last step
        self._sample_key: tuple = ()
        self.step_reason: str | None = None  # why the current step may change nothing
        self.meters: list = []  # (WatchedModel, ParamMeter) pairs, built on deep steps
        self.meter_signature: tuple = ()
        self.deep_steps: list[int] = []
        self.grad_seen: set[int] = set()  # ids with a gradient after a backward (deep steps)
        self.loss_fns: list[set] = []  # per step: the loss functions backward ran on
        self.loss_unseen = False  # the latest step's loss came from no backward nor a trainer
        self.accuracy: list[float | None] = []  # per step (deep steps with class targets)
        self.seen_lrs: list[float] = []  # the lrs when last seen (a skipped step records none)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.ref()

    # -- parameters ---------------------------------------------------------------------
    def refresh(self) -> bool:
        """Re-read the param groups when they changed (add_param_group, requires_grad
        toggled). Returns whether anything changed."""
        opt = self.optimizer
        if opt is None:
            return False
        groups = opt.param_groups
        sig: tuple[Any, ...] = tuple(
            (len(g["params"]), id(g["params"][0]) if g["params"] else 0) for g in groups
        )
        params = [p for g in groups for p in g["params"]]
        trainable_sig = sum(1 for p in params if p.requires_grad)
        sig = sig + (trainable_sig,)
        if sig == self._signature:
            return False
        self._signature = sig
        self.params = params
        self.trainable = [p for p in params if p.requires_grad]
        self.ids = {id(p) for p in params}
        self.facts.n_params = len(params)
        self.facts.n_trainable = len(self.trainable)
        return True

    def lrs(self) -> list[float]:
        opt = self.optimizer
        if opt is None:
            return list(self.seen_lrs)
        out = []
        for g in opt.param_groups if opt is not None else ():
            lr = g.get("lr", math.nan)
            try:
                out.append(float(lr))
            except (TypeError, ValueError, RuntimeError):
                out.append(math.nan)
        self.seen_lrs = out
        return out

    def hyper(self, key: str) -> float | None:
        opt = self.optimizer
        if opt is None or not opt.param_groups:
            return None
        v = opt.param_groups[0].get(key)
        try:
            return float(v) if v is not None else None
        except (TypeError, ValueError, RuntimeError):
            return None

    @staticmethod
    def _sample(candidates: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """A few parameters for the cheap checks: the largest that are still small, so a
        clone costs nothing and a zero gradient is unlikely to be a property of one bias."""
        small = [p for p in candidates if p.numel() <= SAMPLE_MAX_NUMEL]
        if small:
            return heapq.nlargest(SAMPLE, small, key=lambda p: p.numel())
        return heapq.nsmallest(SAMPLE, candidates, key=lambda p: p.numel())

    # -- ND501: was the last step's gradient cleared before this backward? ----------------
    def before_backward(self, pending: PendingScalars, site) -> None:
        """Called as a backward starts. Only after this optimizer's first step: is its
        consumed gradient still there (non-zero), or was it reset (None or zeroed)?"""
        if self.facts.steps == 0 or self.in_step or not self.sampled:
            return
        record: list[Any] = []
        for p in self.sampled:
            if p.grad is None:
                record.append(False)  # reset to None
                continue
            record.append(None)
            index = len(record) - 1
            pending.add(torch.count_nonzero(local(p.grad)) > 0, _carried(record, index))
        self.carried.append(record)
        self.last_backward_site = site

    def judge_stale(self) -> bool | None:
        """At a step: True when every backward since the previous step accumulated into a
        gradient that was never reset, i.e. this step consumes the previous step's gradient
        again. None when no backward ran since (nothing to judge)."""
        records, self.carried = self.carried, []
        if self.facts.steps == 0 or not records:
            return None
        for record in records:
            if not all(v is True for v in record):
                return False  # some backward found the gradient reset (None or zero)
        return True

    # -- ND503: did the step change anything? ----------------------------------------------
    def choose_sample(self, with_grad: list[torch.nn.Parameter]) -> None:
        """The parameters the next backward and this step's change check look at (chosen again
        when the set of parameters with a gradient changes)."""
        key = (len(with_grad), len(self.trainable))
        if key != self._sample_key or any(p.grad is None for p in self.sampled):
            self.sampled = self._sample(with_grad)
            self._sample_key = key

    def snapshot(self) -> None:
        params = list(self.sampled)
        if not params:
            self._before = None
            return
        flat = _flat(params)
        self._before = (
            params,
            flat if flat is not None else [local(p.detach()).clone() for p in params],
        )

    def changed(self) -> torch.Tensor | None:
        """A device bool: whether any sampled parameter moved in the step (None: none
        sampled)."""
        before, self._before = self._before, None
        if before is None:
            return None
        params, old = before
        if isinstance(old, torch.Tensor):
            return torch.ne(cast(torch.Tensor, _flat(params)), old).any()
        flags = [torch.ne(local(p.detach()), o).any() for p, o in zip(params, old)]
        return torch.stack([f.to(flags[0].device) for f in flags]).any()
