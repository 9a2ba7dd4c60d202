"""Per-step timing for the benchmark training scripts: the wall and CPU time of each optimizer
step (zero_grad .. step .. loss.item()), written as JSON where `--timings` says, with the time
the script itself ran.

Taking turns: when `BENCH_TURN_FDS=READ,WRITE` is set (`benchmarks/run_overhead.py` sets it),
each step first waits for a byte on READ and, once timed, passes one on to WRITE. The driver
chains the bare script and its netdoctor runs in a ring, so their steps alternate one by one
and load on a shared machine falls on all of them alike. The waiting is outside the timing.
"""

from __future__ import annotations

import json
import os
import time


class StepTimer:
    def __init__(self, path: str | None):
        self.path = path
        self.started = time.perf_counter()
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._t0 = (0.0, 0.0)
        turn = os.environ.get("BENCH_TURN_FDS")
        self._turn = tuple(int(fd) for fd in turn.split(",")) if turn else None

    def __enter__(self) -> StepTimer:
        if self._turn is not None:
            os.read(self._turn[0], 1)
        self._t0 = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc) -> None:
        self.wall.append(time.perf_counter() - self._t0[0])
        self.cpu.append(time.process_time() - self._t0[1])
        if self._turn is not None:
            try:
                os.write(self._turn[1], b".")
            except BrokenPipeError:  # the next process in the ring ran its last step and left
                pass

    def write(self) -> None:
        if self.path:
            with open(self.path, "w") as f:
                json.dump(
                    {
                        "wall": self.wall,
                        "cpu": self.cpu,
                        "script": time.perf_counter() - self.started,
                    },
                    f,
                )
