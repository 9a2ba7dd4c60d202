"""The ranks of a torch.distributed job (torchrun, DDP) comparing what they measured, built so
that netdoctor can never hang, slow down for long or break the user's job.

* Discovery: at the doctor's first optimizer step, when `torch.distributed.is_initialized()` and
  the world holds more than one rank, `connect()` builds a `DistributedExchange` (else the doctor
  keeps its one-process `LocalExchange`).
* On deep steps only: every rank computes the same schedule from its own step counter, so every
  rank reaches the exchange on the same steps whatever data it sees. There the ranks all-gather a
  small float64 vector (`exchange_step`: the step's loss, gradient norm and learning rate, the
  first non-finite step, a pending --stop-on request, and the checksums of every DDP-replicated
  parameter, `replicas.checksums`) in two collectives on netdoctor's own gloo process group
  (`new_group(backend="gloo", timeout=...)`, CPU tensors): a fixed header (kind, step, length),
  then the vectors padded to the longest. Every rank sees every header, so when the ranks are not
  at the same exchange (one finished early or skipped one) they all skip the second collective
  alike and stop comparing. A timeout, a rank that died ("connection closed by peer") or any other
  error ends the comparison on that rank with a note -- never an exception in the user's loop.
  NCCL jobs use the same gloo group: the user's communicator is never touched (an NCCL timeout
  aborts the process; a gloo one raises an error that netdoctor catches).
* At the end, through the job's key-value store rather than a collective (a rank may end early,
  raise, or be terminated by torchrun when another fails): every rank but 0 publishes its own
  diagnosis (findings, notes, how it ended); rank 0 waits for them -- up to the timeout, a few
  seconds once the exchange has seen a rank go -- and writes the single report (`ranks.merge`).

Norms across shards (FSDP2 `fully_shard`, DTensor): a sharded parameter's norm is the square
root of the sum, over its shards, of the squared local norms; a replicated one is counted once,
not once per rank. DTensor's reductions do exactly that (`_foreach_norm` on DTensor gradients
gives partial norms that are reduced over the mesh when read), so the per-step gradient norm of
a sharded model is the full model's. ND508's checksums compare only plain, replicated tensors:
shards differ by design.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

from netdoctor.findings import Finding, Report
from netdoctor.loading.provenance import user_location
from netdoctor.measure.facts import DistributedFacts, LoopFacts
from netdoctor.measure.params import is_sharded, local
from netdoctor.watcher.events import ForwardStart, Part, StepStart
from netdoctor.watcher.localize import Localization
from netdoctor.watcher.optimizers import WatchedOptimizer
from netdoctor.watcher.ranks import NONFINITE_KINDS
from netdoctor.watcher.registry import Registry
from netdoctor.watcher.replicas import compare
from netdoctor.watcher.services import DirtyRules, Guard
from netdoctor.watcher.settings import WatchOptions

MAGIC = 508.0  # the header's first number: a netdoctor exchange
STEP = 1.0  # header kind: a deep step's statistics
PEER_GONE_WAIT = 5.0  # seconds rank 0 waits for summaries once a rank is known gone
_created = [0]  # exchanges created in this process: each one's keys in the store are its own
_hurry = [False]  # set when the process is being terminated: stop waiting for other ranks


def hurry() -> None:
    """The process is being terminated (torchrun stops every rank once one failed): rank 0
    writes its report with what it has instead of waiting for the other ranks."""
    _hurry[0] = True


def _short(e: BaseException, timeout: float | None = None) -> str:
    text = " ".join(str(e).split())
    low = text.lower()
    if "closed by peer" in low or "connection reset" in low or "broken pipe" in low:
        return "another rank's connection closed (that rank ended or crashed)"
    if "timed out" in low or "timeout" in low:
        within = f" within {timeout:g} s" if timeout is not None else ""
        return (
            f"no answer from the other ranks{within} (a rank ran out of batches earlier, "
            "e.g. uneven inputs under DDP's join(), or is stuck)"
        )
    text = text.split(" Exception raised from ")[0]
    return f"{type(e).__name__}: {text[:160]}"


class LocalExchange:
    """One process: every rank's statistics are this rank's (`DistributedExchange` replaces it
    under torchrun)."""

    rank = 0
    world_size = 1
    broken: str | None = None

    def gather(self, step: int, values: list[float]) -> list[list[float]] | None:
        return [values]

    def close(self) -> None:
        pass


class DistributedExchange:
    """netdoctor's side channel between the ranks (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, backend: str | None, timeout: float):
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.timeout = timeout
        self.group: Any = None
        self.store: Any = None
        self.broken: str | None = None
        self.peer_gone = False

    def gather(self, step: int, values: list[float]) -> list[list[float]] | None:
        """Every rank's `values` for this step (rank order), or None when the ranks cannot be
        compared (then `broken` says why, and no further collective is issued)."""
        import torch.distributed as dist

        if self.broken is not None or self.group is None:
            return None
        try:
            header = torch.tensor(
                [MAGIC, STEP, float(step), float(len(values))], dtype=torch.float64
            )
            heads = [torch.empty(4, dtype=torch.float64) for _ in range(self.world_size)]
            dist.all_gather(heads, header, group=self.group)
            rows = [h.tolist() for h in heads]
            if any(r[:3] != rows[0][:3] for r in rows):
                where = ", ".join(
                    f"rank {i} at step {int(r[2])}" if r[0] == MAGIC else f"rank {i} elsewhere"
                    for i, r in enumerate(rows)
                )
                self.broken = f"the ranks reached netdoctor's exchange out of step ({where})"
                return None
            longest = int(max(r[3] for r in rows))
            payload = torch.full((longest,), math.nan, dtype=torch.float64)
            if values:
                payload[: len(values)] = torch.tensor(values, dtype=torch.float64)
            outs = [torch.empty(longest, dtype=torch.float64) for _ in range(self.world_size)]
            dist.all_gather(outs, payload, group=self.group)
            return [o[: int(r[3])].tolist() for o, r in zip(outs, rows)]
        except Exception as e:  # a timeout, a rank gone: stop comparing, never raise
            self.broken = f"at step {step}: {_short(e, self.timeout)}"
            self.peer_gone = "closed" in self.broken or "gone" in self.broken
            return None

    # -- the end of the run -------------------------------------------------------------
    def publish(self, summary: dict[str, Any]) -> str | None:
        """A rank other than 0 hands rank 0 its diagnosis. Returns a note when it could not."""
        if self.store is None:
            return "no store to reach rank 0 through: this rank's findings are not in its report"
        try:
            self.store.set(f"summary/{self.rank}", pickle.dumps(summary))
        except Exception as e:
            return f"could not hand this rank's findings to rank 0: {_short(e)}"
        return None

    def collect(self) -> tuple[dict[int, dict[str, Any]], list[int]]:
        """Rank 0: the other ranks' summaries, waiting for them up to the timeout (less once a
        rank is known gone or the process is being terminated). (summaries, ranks missing)"""
        others = list(range(1, self.world_size))
        if self.store is None:
            return {}, others
        got: dict[int, dict[str, Any]] = {}
        limit = PEER_GONE_WAIT if self.peer_gone else self.timeout
        deadline = time.monotonic() + limit
        delay = 0.01
        while True:
            for r in others:
                if r in got:
                    continue
                try:
                    if self.store.check([f"summary/{r}"]):
                        got[r] = pickle.loads(self.store.get(f"summary/{r}"))
                except Exception:
                    continue
            if len(got) == len(others) or time.monotonic() >= deadline:
                break
            if _hurry[0]:
                deadline = min(deadline, time.monotonic() + 1.0)
            time.sleep(delay)
            delay = min(0.2, delay * 2)
        return got, [r for r in others if r not in got]

    def close(self) -> None:
        import torch.distributed as dist

        group, self.group = self.group, None
        if group is not None and self.broken is None:
            try:
                dist.destroy_process_group(group)
            except Exception:
                pass


def connect(timeout: float) -> DistributedExchange | None:
    """The exchange of the process group the user initialised, or None in a one-process run.
    Called by every rank at its first optimizer step (creating a process group is itself
    collective: every rank of the job must do it at the same point)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world < 2:
        return None
    try:
        backend = str(dist.get_backend())
    except Exception:
        backend = None
    ex = DistributedExchange(dist.get_rank(), world, backend, timeout)
    _created[0] += 1
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        ex.store = dist.PrefixStore(f"netdoctor/{_created[0]}/", _get_default_store())
    except Exception:
        ex.store = None
    if not dist.is_gloo_available():
        ex.broken = "this torch build has no gloo backend for netdoctor's own process group"
        return ex
    try:
        ex.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    except Exception as e:
        ex.broken = f"could not create netdoctor's process group: {_short(e)}"
    return ex


# -- what the ranks compare ---------------------------------------------------------------
# loss, gradient norm, lr, first non-finite step, its kind, the --stop-on request, the sharded
# gradients' share of the squared norm
STATS = 7


def sharded_square(params: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(sum over the sharded (DTensor) gradients of this rank's squared local norm divided by
    the number of ranks that hold the same shard, the squared norm of the other gradients). The
    model's gradient norm is sqrt(own plain part + the sum of the first part over every rank):
    a shard counts once however many ranks replicate it, a plain (DDP-replicated) gradient is
    the same on every rank and counts once."""
    sharded, plain = [], []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if is_sharded(g):
            dt: Any = g  # a DTensor
            copies = 1
            for dim, placement in enumerate(dt.placements):
                if placement.is_replicate():
                    copies *= dt.device_mesh.size(dim)
            sharded.append(torch.linalg.vector_norm(local(g).float()) ** 2 / copies)
        else:
            plain.append(torch.linalg.vector_norm(g.detach().float()) ** 2)
    values = [torch.stack(x).sum().cpu() if x else torch.zeros(()) for x in (sharded, plain)]
    return float(values[0]), float(values[1])


def step_statistics(wo: WatchedOptimizer) -> list[float]:
    """The small vector the ranks compare on deep steps: loss, total gradient norm, largest lr
    (the first of `STATS`; DDP's checksums follow them)."""
    f = wo.facts
    return [
        f.loss[-1] if f.loss else math.nan,
        f.grad_norm[-1] if f.grad_norm else math.nan,
        max(f.lr[-1]) if f.lr and f.lr[-1] else math.nan,
    ]


class Distributed(Part):
    """The doctor's part under torchrun: the process group looked for at the first step, the
    deep steps' exchange (`exchange_step`), a --stop-on request held for the next exchange
    (`request_stop`), forwards that bypass a DDP wrapper, and at the end the ranks' diagnoses
    handed to rank 0 (`finish`). In one process, `exchange` stays a `LocalExchange`."""

    def __init__(
        self,
        options: WatchOptions,
        facts: LoopFacts,
        registry: Registry,
        localization: Localization,
        guard: Guard,
        dirty: DirtyRules,
    ):
        self.options = options
        self.facts = facts
        self.registry = registry
        self.localization = localization
        self.guard = guard
        self.dirty = dirty
        self.exchange: LocalExchange | DistributedExchange = LocalExchange()
        self.stop_request: Finding | None = None  # --stop-on under torchrun: at the next exchange
        self.summaries: dict[int, dict[str, Any]] = {}  # rank 0: what the other ranks reported
        self.missing: list[int] = []  # rank 0: ranks whose summary never came
        self.seconds = 0.0  # the exchanges with the other ranks (mostly waiting for the slowest)
        self._connected = False  # the process group was looked for (at the first step)

    @property
    def world_size(self) -> int:
        return self.exchange.world_size

    @property
    def rank(self) -> int:
        """This process's rank: the process group's, else torchrun's RANK, else 0."""
        if self.exchange.world_size > 1:
            return self.exchange.rank
        try:
            return int(os.environ.get("RANK", "0"))
        except ValueError:
            return 0

    def request_stop(self, finding: Finding) -> None:
        """Stop every rank at the next exchange (the first request stands)."""
        self.stop_request = self.stop_request or finding

    # -- events ----------------------------------------------------------------------------
    def on_forward_start(self, event: ForwardStart) -> None:
        replicas = self.registry.replicas
        wrapper = replicas.wrapper_of(event.module) if replicas.wrappers else None
        if wrapper is not None:  # called outside its DDP wrapper? (ND508's line)
            replicas.note_forward(wrapper, event.model.facts.label, user_location)

    def on_step_start(self, event: StepStart) -> None:
        if not self._connected:
            self.guard.run(self._connect)

    def _connect(self) -> None:
        """The process group the user initialised (looked for once, at the first optimizer
        step, on every rank alike: creating netdoctor's group is itself collective)."""
        self._connected = True
        t0 = time.perf_counter()
        ex = connect(self.options.dist_timeout)
        self.seconds += time.perf_counter() - t0
        if ex is not None:
            self.exchange = ex
            self.facts.distributed = DistributedFacts(
                rank=ex.rank,
                world_size=ex.world_size,
                backend=ex.backend,
                broken=ex.broken,
                wrapper_sites=self.registry.replicas.sites(),
            )

    # -- the deep steps' exchange ------------------------------------------------------------
    def exchange_step(self, event: StepStart) -> bool:
        """The deep step's exchange, on every rank alike. Updates `facts.distributed`; returns
        True when a rank asked to stop (--stop-on), so that every rank stops here."""
        ex = self.exchange
        facts = self.facts.distributed
        if facts is None or not isinstance(ex, DistributedExchange):
            return False
        wo, step = event.optimizer, event.step
        replicas = self.registry.replicas
        values: list[float] = []
        plain = 0.0
        try:  # whatever fails here, this rank still joins the collective (with what it has)
            nf_step, nf_kind = self.localization.first() or (0, 0.0)
            request = float(self.stop_request.rule[2:]) if self.stop_request is not None else 0.0
            sharded, plain = sharded_square(wo.trainable)
            values = step_statistics(wo) + [float(nf_step), nf_kind, request, sharded]
            values += replicas.checksums(self.registry.label_of)
        except Exception as e:
            self.guard.note_error(e)
            values = values[:STATS]
        t0 = time.perf_counter()
        rows = ex.gather(step, values)
        self.seconds += time.perf_counter() - t0
        if rows is None:
            facts.broken = ex.broken
            return False
        facts.exchanges += 1
        stop = False
        for r, row in enumerate(rows):
            row = row + [math.nan] * (STATS - len(row))
            if row[3] > 0 and r not in facts.nonfinite:
                facts.nonfinite[r] = (int(row[3]), NONFINITE_KINDS.get(row[4], "non-finite"))
            if row[5] > 0:
                facts.stop_requested.setdefault(r, f"ND{int(row[5]):03d}")
                stop = True
        shards = [row[6] for row in rows if len(row) > 6]
        if any(v > 0 for v in shards):  # FSDP/DTensor: the model's norm, reduced over the shards
            facts.grad_norms.append((step, math.sqrt(plain + sum(shards))))
        checks = [row[STATS:] for row in rows]
        facts.compared_tensors = len(replicas.compared)
        facts.bypass = replicas.bypasses()
        facts.wrapper_sites = replicas.sites()
        if replicas.compared or any(checks):
            from netdoctor.rules.loop.nd508_replicas_diverged import RULE as ND508

            tolerance = self.options.rule_settings().options_of(ND508).tolerance
            largest, divergence = compare(checks, replicas.compared, step, tolerance)
            facts.largest_difference = max(facts.largest_difference, largest)
            if divergence is not None and facts.divergence is None:
                divergence.last_equal_step = facts.last_equal_step
                facts.divergence = divergence
                self.dirty.mark("ND508")
            elif divergence is None:
                facts.last_equal_step = step
        return stop

    # -- the end of the run ---------------------------------------------------------------
    def finish(self, summary: Callable[[], dict[str, Any]]) -> None:
        """Every rank but 0 hands rank 0 its `summary()`; rank 0 collects them."""
        ex = self.exchange
        if not isinstance(ex, DistributedExchange):
            return
        try:
            if self.facts.distributed is not None:
                self.facts.distributed.bypass = self.registry.replicas.bypasses()
                self.facts.distributed.wrapper_sites = self.registry.replicas.sites()
            if ex.rank == 0:
                self.summaries, self.missing = ex.collect()
            else:
                note = ex.publish(summary())
                if note:
                    self.guard.notes.append(note)
        finally:
            ex.close()


def summary(
    report: Report, facts: LoopFacts, nonfinite: tuple[int, float] | None
) -> dict[str, Any]:
    """What a rank other than 0 hands rank 0 at the end: its findings, notes and how it ended."""
    return {
        "findings": list(report.findings),
        "notes": list(report.notes),
        "steps": facts.iterations,
        "stopped": facts.stopped,
        "error": facts.error,
        "nonfinite": nonfinite,
    }
