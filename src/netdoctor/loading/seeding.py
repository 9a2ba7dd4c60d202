"""One seed for everything random while netdoctor builds and runs a user's model.

A model's random initialisation is part of what `check` and `probe` judge (weight scales, the
signal at init), so the same target and flags must see the same weights in every process:
Python's `random`, NumPy's global generator and torch (CPU, and CUDA when it is in use) are
seeded for the block. The caller's random states are restored afterwards, so a Python caller's
own random stream is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

from netdoctor.errors import UserError

DEFAULT_SEED = 0
MAX_SEED = 2**32 - 1  # NumPy's global generator takes seeds in [0, 2**32)


def parse_seed(value: object, source: str = "--seed") -> int:
    """An integer seed in [0, 2**32) from the command line or the config; anything else is a
    UserError naming where it came from."""
    if isinstance(value, bool):
        value = None  # `seed = true` in TOML is not a number
    try:
        seed = int(value) if isinstance(value, (int, str)) else None
    except ValueError:
        seed = None
    if seed is None or not 0 <= seed <= MAX_SEED:
        raise UserError(f"{source} must be an integer from 0 to {MAX_SEED}, got {value!r}")
    return seed


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed random, NumPy and torch for the block; restore the caller's states after it."""
    import numpy as np
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device (lazily when not initialised)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
