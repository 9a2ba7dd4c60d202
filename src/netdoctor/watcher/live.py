"""The live judgement: at the end of every step whose facts changed (`services.DirtyRules`), the
rules concerned are judged on the facts so far (`diagnosis.live_findings`); what is newly
confirmed and severe is announced on stderr, once, and with `stop_on` training stops there --
`StopTraining` (a BaseException) from the optimizer step hook, before the update, or only
`should_stop` with `stop_action="flag"`.

Under torchrun, rank 0 announces, the other ranks only what their own measurements show (a NaN
of theirs), prefixed with their rank; a stop waits for the next exchange, so that every rank
stops at the same step (`distributed.Distributed.request_stop`), except for a NaN (DDP's
all-reduce spreads it to every rank's gradients in the same step) and ND508 (judged from the
exchange itself, alike on every rank).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from netdoctor.errors import StopTraining
from netdoctor.findings import Finding, Severity
from netdoctor.watcher.diagnosis import Gathered, live_findings
from netdoctor.watcher.services import DirtyRules


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class LiveJudge:
    """See the module docstring. `announce_to`: where the one-line announcements go."""

    def __init__(self, gathered: Gathered, dirty: DirtyRules):
        self.gathered = gathered
        self.dirty = dirty
        self.announce_to: Callable[[str], None] = _to_stderr
        # told every finding confirmed live, with its step (the TensorBoard export)
        self.on_confirmed: Callable[[list[Finding], int], None] | None = None
        self.announced: set[tuple[object, ...]] = set()
        self.should_stop = False
        self.stopped_by: Finding | None = None
        self._settled: set[str] = set()  # rules already confirmed: not judged live again

    def judge(self, step: int) -> StopTraining | None:
        """Judge the rules whose facts changed (and a NaN) now; announce what is newly
        confirmed and severe; with stop_on, stop there."""
        if not self.dirty:
            return None
        rules = self.dirty.take() - self._settled
        if not rules:
            return None
        g = self.gathered
        with g.guard.busy_scope():
            found = live_findings(g, rules)
        if found and self.on_confirmed is not None:
            self.on_confirmed(found, step)
        self._settled |= {f.rule for f in found} - {"ND502"}  # ND502: per model
        options = g.options
        stop_level = None if options.stop_on == "never" else Severity.parse(options.stop_on)
        announce_level = min(Severity.ERROR, stop_level or Severity.ERROR)
        dist = g.distributed
        rank = dist.rank
        for f in found:
            key = (f.rule, f.module, str(f.location), (f.evidence or {}).get("model"))
            if key in self.announced:
                continue
            self.announced.add(key)
            # under torchrun, rank 0 announces; the others only what their own measurements
            # show (a NaN of theirs), prefixed with their rank
            if (
                options.announce
                and f.severity >= announce_level
                and (rank == 0 or f.rule.startswith("ND4"))
            ):
                who = "netdoctor" if rank == 0 else f"netdoctor [rank {rank}]"
                where = f" at {f.location}" if f.location else ""
                self.announce_to(
                    f"{who}: step {step}: {f.rule} {f.name} [{f.severity.label}]"
                    f"{where}: {_one_line(f.message)}"
                )
            if stop_level is not None and f.severity >= stop_level and not self.should_stop:
                if dist.world_size > 1 and f.rule not in ("ND401", "ND508"):
                    # another rank may confirm it a step later: stop together at the next
                    # exchange (a NaN reaches every rank's gradients in the same step, and
                    # ND508 is judged from the exchange itself, alike on every rank)
                    dist.request_stop(f)
                    continue
                return self.stop(f, step)
        return None

    def stop(self, f: Finding | None, step: int) -> StopTraining | None:
        """Stop training at `step` (for `f`): the StopTraining to raise, or None with
        `stop_action="flag"` (`should_stop` is set either way)."""
        self.should_stop = True
        self.stopped_by = f
        self.gathered.facts.stopped = "stop-on"
        if self.gathered.options.stop_action == "raise":
            return StopTraining(f, step)
        return None


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
