"""Which training steps get the deep (per-layer) measurements.

Every step is measured cheaply (loss, total gradient norm, learning rates, a parameter-change
check, finiteness: fused norms and one host sync). The expensive measurements -- activation
statistics of every layer, per-parameter gradient norms and update/weight ratios -- run on the
first `warm` steps (where init and data problems show), on log-spaced steps after them (8, 16,
32, ... below `every`) and then every `every` steps. Under DDP every rank computes the same
schedule from the same step counter, so all ranks measure (and all-reduce) on the same steps.
"""

from __future__ import annotations

from netdoctor.watcher.settings import DEFAULT_EVERY, WARM_STEPS


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Schedule:
    def __init__(self, every: int = DEFAULT_EVERY, warm: int = WARM_STEPS):
        self.every = max(1, int(every))
        self.warm = max(0, int(warm))

    def is_deep(self, step: int) -> bool:
        """Whether training step `step` (1-based) is measured deeply."""
        if step < 1:
            return False
        if step <= self.warm or step % self.every == 0:
            return True
        return step < self.every and _power_of_two(step)

    def restarts_window(self, step: int) -> bool:
        """Deep steps at which the "never active" window of the activation statistics starts
        again (doubling intervals, so the window covers roughly the latest half of the run)."""
        if not self.is_deep(step) or step <= 2 * self.warm:
            return False
        if _power_of_two(step):
            return True
        return step % self.every == 0 and _power_of_two(step // self.every)

    def describe(self) -> str:
        if self.every == 1:
            return "every step"
        return (
            f"steps 1-{self.warm}, log-spaced steps up to {self.every}, then every "
            f"{self.every} steps"
        )
