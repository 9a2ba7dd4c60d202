"""An allocation budget for a model's construction: past it, the model is built on the meta
device instead (`loading.deferred`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from netdoctor.loading.deferred import storage_key


class TooLarge(BaseException):  # not swallowed by a constructor's `except Exception`
    """A real construction went past its allocation budget (`allocation_budget`)."""


class _Budget(TorchFunctionMode):
    """Counts the bytes of the new tensors a construction makes (a function mode: a dispatch
    mode would cost every check the import of sympy)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.allocated = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and not out.is_meta:
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            key = storage_key(out)
            if all(storage_key(t) != key for t in inputs if not t.is_meta):
                self.allocated += out.untyped_storage().nbytes()
                if self.allocated > self.limit:
                    raise TooLarge(f"construction allocated over {self.limit} bytes")
        return out


@contextmanager
def allocation_budget(limit: int | None) -> Iterator[None]:
    """Meanwhile, raise TooLarge once new tensors total more than `limit` bytes (None: no
    limit). What a model's construction allocates is its weights and buffers (and a few
    temporaries): past a limit, it is cheaper to stop and build it on the meta device."""
    if limit is None:
        yield
        return
    with _Budget(limit):
        yield
