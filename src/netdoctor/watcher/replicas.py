"""Replicated parameters under DistributedDataParallel (ND508): the DDP wrappers the training
built, the training forwards that bypassed them, and the checksums the ranks compare.

DDP keeps its module's parameters identical on every rank: it broadcasts rank 0's values when it
is constructed and all-reduces the gradients in backward, so every rank applies the same update
to the same weights and the replicas stay bitwise equal (the all-reduce hands every rank the very
same reduced bits, whatever order it summed in). They drift apart when a training forward calls
the inner module directly (`model.module(x)`: DDP's backward hooks are not armed, no gradient is
all-reduced), when a parameter is added or replaced after wrapping (DDP's reducer never learns of
it), or when a rank changes its copy after construction.

Checksums, per replicated tensor, in float64: its L2 norm and a signed sum
h = sum_i w_i * s[i mod M], with s a fixed +-1 pattern (the same on every rank). The signed sum
catches what a norm misses: a perturbation d moves h by about |d|, while it moves the norm by
about <w, d> / |w|, which in a high-dimensional tensor is far smaller. It needs no copy of the
tensor: the elements are first summed per column of an (n / M, M) view.

Only plain tensors are compared: a DTensor (FSDP2, tensor parallel) is sharded or replicated
along a device mesh, and its shards differ by design.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from netdoctor.findings import Location
from netdoctor.measure.facts import BypassFacts, ReplicaDivergence

PATTERN = 61  # length of the sign pattern (prime: it does not line up with common widths)


def ddp_class() -> type | None:
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # a build without torch.distributed
        return None
    return DistributedDataParallel


def is_ddp(module: object) -> bool:
    cls = ddp_class()
    return cls is not None and isinstance(module, cls)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" or hasattr(t, "_local_tensor")


class Wrapper:
    """One DDP wrapper: where it was built, whether one of its forwards is running (so a
    forward of its inner module outside it is a bypass), and what it replicates."""

    def __init__(self, ddp: nn.Module, site: Location | None):
        self.ref = weakref.ref(ddp)
        inner = cast(nn.Module, ddp.module)
        self.inner_ref = weakref.ref(inner)
        self.site = site
        self.depth = 0
        self.ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
        registered = getattr(ddp, "_module_parameters", None)
        self.registered = {
            id(p) for p in (registered if registered is not None else inner.parameters())
        }
        self.bypass: BypassFacts | None = None
        self.handles = [
            ddp.register_forward_pre_hook(self._enter),
            ddp.register_forward_hook(self._leave, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self.depth += 1

    def _leave(self, module: nn.Module, args: tuple, out: object) -> None:
        self.depth = max(0, self.depth - 1)

    @property
    def inner(self) -> nn.Module | None:
        return self.inner_ref()

    def replicated(self) -> list[tuple[str, torch.Tensor]]:
        inner = self.inner
        if inner is None or self.ref() is None:
            return []
        return [
            (n, p)
            for n, p in inner.named_parameters()
            if n not in self.ignored and not _is_dtensor(p)
        ]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@dataclass
class Compared:
    """One replicated tensor, as the exchange vectors carry it."""

    model: str
    name: str
    added_after_wrap: bool


class Replicas:
    """The DDP wrappers seen while the doctor watches, in construction order (the same order on
    every rank, so the ranks' checksum vectors line up)."""

    def __init__(self) -> None:
        self.wrappers: list[Wrapper] = []
        self.compared: list[Compared] = []  # what the last checksum vector held

    def track(self, ddp: nn.Module, site: Location | None = None) -> Wrapper:
        for w in self.wrappers:
            if w.ref() is ddp:
                if w.site is None:
                    w.site = site
                return w
        w = Wrapper(ddp, site)
        self.wrappers.append(w)
        return w

    def wrapper_of(self, inner: nn.Module) -> Wrapper | None:
        return next((w for w in self.wrappers if w.inner is inner and w.ref() is not None), None)

    def hook_ids(self) -> set[int]:
        return {h.id for w in self.wrappers for h in w.handles}

    def note_forward(
        self, wrapper: Wrapper, label: str, site: Callable[[], Location | None]
    ) -> None:
        """A forward of the wrapped module with gradients enabled: a bypass unless the wrapper's
        own forward is running."""
        if wrapper.depth > 0:
            return
        if wrapper.bypass is None:
            wrapper.bypass = BypassFacts(model=label, site=site())
        wrapper.bypass.calls += 1

    def bypasses(self) -> list[BypassFacts]:
        return [w.bypass for w in self.wrappers if w.bypass is not None]

    def sites(self) -> list[Location]:
        return [w.site for w in self.wrappers if w.site is not None]

    def checksums(self, label_of) -> list[float]:
        """Two numbers per replicated tensor (norm, signed sum), one host sync for all."""
        self.compared = []
        tensors = []
        for w in self.wrappers:
            inner = w.inner
            if inner is None:
                continue
            label = label_of(inner)
            for name, p in w.replicated():
                self.compared.append(Compared(label, name, id(p) not in w.registered))
                tensors.append(p)
        return checksums(tensors)

    def close(self) -> None:
        for w in self.wrappers:
            w.close()


_SIGNS: dict[tuple, torch.Tensor] = {}


def _signs(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (str(device), dtype)
    if key not in _SIGNS:
        gen = torch.Generator().manual_seed(508)  # its own generator: no random number of yours
        pattern = torch.randint(0, 2, (PATTERN,), generator=gen).to(dtype) * 2 - 1
        _SIGNS[key] = pattern.to(device)
    return _SIGNS[key]


def checksums(tensors: list[torch.Tensor]) -> list[float]:
    """[norm_0, sum_0, norm_1, sum_1, ...] in float64 (float32 where the device has none)."""
    if not tensors:
        return []
    rows, norms = [], []
    with torch.no_grad():
        device = tensors[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        for t in tensors:
            flat = t.detach().reshape(-1)
            n = flat.numel()
            k = n // PATTERN
            acc = torch.zeros(PATTERN, dtype=dtype, device=flat.device)
            if k:
                acc += flat[: k * PATTERN].view(k, PATTERN).sum(0, dtype=dtype)
            if n > k * PATTERN:
                acc[: n - k * PATTERN] += flat[k * PATTERN :].to(dtype)
            rows.append(acc.to(device))
            norms.append(torch.linalg.vector_norm(flat).to(device=device, dtype=dtype))
        sums = torch.stack(rows) @ _signs(device, dtype)
        return torch.stack([torch.stack(norms), sums], dim=1).reshape(-1).tolist()


def _differ(a: float, b: float) -> float:
    if math.isfinite(a) and math.isfinite(b):
        return abs(a - b)
    return 0.0 if repr(a) == repr(b) else math.inf


def compare(
    rows: list[list[float]], compared: list[Compared], step: int, tolerance: float
) -> tuple[float, ReplicaDivergence | None]:
    """The ranks' checksum vectors (rank order) -> (largest relative difference, the divergence
    when one exceeds `tolerance`). Every rank holds the same rows, so every rank concludes the
    same."""
    reference = rows[0]
    largest = 0.0
    first: ReplicaDivergence | None = None
    differing = 0
    for i, c in enumerate(compared):
        norm = reference[2 * i] if 2 * i < len(reference) else math.nan
        scale = max(abs(norm), 1e-12) if math.isfinite(norm) else 1.0
        ranks, worst = [], 0.0
        for r, row in enumerate(rows[1:], start=1):
            if 2 * i + 1 >= len(row):
                d = math.inf
            else:
                d = (
                    max(
                        _differ(row[2 * i], reference[2 * i]),
                        _differ(row[2 * i + 1], reference[2 * i + 1]),
                    )
                    / scale
                )
            largest = max(largest, d)
            if d > tolerance:
                ranks.append(r)
                worst = max(worst, d)
        if ranks:
            differing += 1
            if first is None:
                first = ReplicaDivergence(
                    step=step,
                    model=c.model,
                    parameter=c.name,
                    ranks=ranks,
                    difference=worst,
                    tensors=0,
                    compared=len(compared),
                    added_after_wrap=c.added_after_wrap,
                )
    if first is not None:
        first.tensors = differing
    longest = max(len(r) for r in rows)
    if first is None and longest != min(len(r) for r in rows):
        first = ReplicaDivergence(
            step=step,
            model="?",
            parameter="(the number of replicated tensors)",
            ranks=[r for r, row in enumerate(rows) if len(row) != len(reference)],
            difference=math.inf,
            tensors=0,
            compared=len(compared),
        )
    return largest, first
