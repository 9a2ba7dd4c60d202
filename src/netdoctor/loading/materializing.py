"""A deferred model's forward on real values: its meta weights materialised at the ops that use
them, one at a time (`loading.deferred` records how; this runs the forward)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from netdoctor.loading.deferred import Deferred, _Ref, storage_key

CACHE_BYTES = 1 << 28  # materialised tensors kept for reuse during a forward (256 MiB)


# What a tensor's metadata answers, which the meta tensor holds (`.device` reads the CPU,
# where its values are computed): these never materialise it.
_METADATA = frozenset(
    [
        *(getattr(torch.Tensor, name).__get__ for name in (
            "device", "shape", "dtype", "requires_grad", "is_meta", "ndim", "layout", "is_cuda",
            "is_sparse", "is_quantized")),
        *(getattr(torch.Tensor, name) for name in (
            "size", "dim", "ndimension", "numel", "nelement", "stride", "is_floating_point",
            "is_complex", "element_size", "storage_offset", "is_contiguous")),
    ]
)  # fmt: skip


class _Materializing(TorchFunctionMode):
    """Hands torch functions real tensors for the deferred model's meta ones."""

    def __init__(self, deferred: Deferred) -> None:
        super().__init__()
        self.deferred = deferred
        self.owned = set(deferred._created)  # what construction wrote: also the tensors of
        # modules held in plain lists or dicts, which model.parameters() does not list
        self.cache: OrderedDict[int, torch.Tensor] = OrderedDict()  # storage -> whole tensor
        self.cached_bytes = 0
        self.anchor = torch.zeros((), requires_grad=True)
        self.depth = 0  # module forwards running
        self.touched: set[int] = set()  # storages whose values a forward has used
        # storages of weights never drawn: the inputs their outputs were sampled for, and
        # those inputs' versions then (an input changed in place since cannot condition)
        self.sampled: dict[int, tuple[torch.Tensor, int]] = {}
        self.pinned: dict[int, torch.Tensor] = {}  # drawn given a sampled output: kept

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, torch.fx.Proxy) for a in tree_flatten((args, kwargs))[0]):
            return func(*args, **kwargs)  # torch.fx tracing: no values, nothing to compute
        if args and func in _METADATA and self._owned(args[0]):
            if func == torch.Tensor.device.__get__:
                return torch.device("cpu")
            return func(*args, **kwargs)  # the meta tensor knows: nothing to materialise
        if func is torch._C._nn.linear:
            sampled = self._sampled_linear(*args, **kwargs)
            if sampled is not None:
                return sampled
        args = tree_map(self._real, args)
        kwargs = tree_map(self._real, kwargs)
        return func(*args, **kwargs)

    def _sampled_linear(self, input: Any, weight: Any, bias: Any = None) -> torch.Tensor | None:
        """`F.linear(input, weight, bias)` for a weight of one Gaussian draw, N(m, s^2), that
        no op has used yet: its output drawn from its exact distribution given the input,
        without drawing the weight. With the input's n rows as X (n x in), X W^T's columns are
        independent, each N(m X 1, s^2 X X^T): R E with R R^T = X X^T and E of n x out
        standard normals. A weight read again later is then drawn given what this showed
        (`_conditioned`). None when this does not apply (the op runs as it is)."""
        if not self._owned(weight) or not isinstance(input, torch.Tensor) or input.is_meta:
            return None
        key = storage_key(weight)
        if key in self.touched or weight.dim() != 2 or input.dtype != weight.dtype:
            return None
        out_features, in_features = weight.shape
        n = input.numel() // max(1, in_features)
        if not input.is_floating_point() or input.shape[-1] != in_features or 2 * n > in_features:
            return None  # as many rows as inputs: drawing the weight costs no more
        gaussian = self.deferred.gaussian(weight)
        if gaussian is None:
            return None
        mean, std = gaussian
        bias = self._real(bias)
        self.touched.add(key)
        with torch._C.DisableTorchFunction(), torch.no_grad():
            # no copy: the inputs of q, k and v are one tensor
            self.sampled[key] = (input.detach(), input._version)
            x, drawn = self._drawn(key, out_features)
            out = std * drawn + mean * x.sum(dim=1, keepdim=True)
            out = out.to(input.dtype).reshape(*input.shape[:-1], out_features)
            if bias is not None:
                out = out + bias.detach()
        if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad):
            with torch._C.DisableTorchFunction():
                out = _Alias.apply(out, self.anchor)
        return out

    def _drawn(self, key: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """X (float64) and R E for the weight of storage `key`: the same on every call."""
        inputs, _ = self.sampled[key]
        x = inputs.reshape(-1, inputs.shape[-1]).double()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a small eigh: on several threads it can take 30x longer
        try:
            values, vectors = torch.linalg.eigh(x @ x.T)
        finally:
            torch.set_num_threads(threads)
        root = vectors * values.clamp_min(0).sqrt()
        gen = torch.Generator().manual_seed(self.deferred.seed_of(key))
        return x, root @ torch.randn(len(x), out_features, generator=gen, dtype=torch.float64)

    def _conditioned(self, t: torch.Tensor, key: int) -> torch.Tensor | None:
        """A weight whose output `_sampled_linear` drew, drawn given that output: the Gaussian
        conditioned on X W^T, so that every use of it in the forward agrees. None when the
        input was changed in place since (the weight is then drawn afresh)."""
        inputs, version = self.sampled.pop(key)
        gaussian = self.deferred.gaussian(t)
        if inputs._version != version or gaussian is None:
            return None
        self.sampled[key] = (inputs, version)
        mean, std = gaussian
        gen = torch.Generator().manual_seed(self.deferred.seed_of(key) + 1)
        with torch._C.DisableTorchFunction(), torch.no_grad():
            x, drawn = self._drawn(key, t.shape[0])
            free = torch.randn(tuple(t.shape), generator=gen)
            # free + (drawn^T - free X^T) X^+^T: X z = drawn for each row z, the rest free
            missing = drawn.T - (free @ x.T.float()).double()  # out x n: small
            given = missing.float() @ torch.linalg.pinv(x).T.float()
            del self.sampled[key]
            return (mean + std * (free + given)).to(t.dtype)

    @staticmethod
    def pack(t: torch.Tensor) -> None:
        """A tensor autograd saves for a backward: dropped. `check` runs no backward, and
        a forward with grad enabled would otherwise hold every weight it used and every
        activation until it ends."""
        return None

    @staticmethod
    def unpack(packed: None) -> torch.Tensor:
        raise RuntimeError("netdoctor: a deferred model's forward keeps nothing for a backward")

    def _owned(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.is_meta and storage_key(t) in self.owned

    def _real(self, t: Any) -> Any:
        if not self._owned(t):
            return t
        key = storage_key(t)
        ref = _Ref.of(t)
        self.touched.add(key)
        if key in self.sampled:
            conditioned = self._conditioned(t, key)
            if conditioned is not None:
                self.pinned[key] = conditioned
        base = self.pinned.get(key)
        if base is None:
            base = self.cache.get(key)
        if base is None:
            with torch._C.DisableTorchFunction():
                base = self.deferred.materialize(t)
            nbytes = base.untyped_storage().nbytes()
            if nbytes <= CACHE_BYTES:
                self.cache[key] = base
                self.cached_bytes += nbytes
                while self.cached_bytes > CACHE_BYTES:
                    _, old = self.cache.popitem(last=False)
                    self.cached_bytes -= old.untyped_storage().nbytes()
            else:
                return base
        elif key in self.cache:
            self.cache.move_to_end(key)
        out = torch.empty(0, dtype=ref.dtype)
        out.set_(base.untyped_storage(), ref.offset, ref.size, ref.stride)
        if t.requires_grad and self.depth <= 0:
            out.requires_grad_(True)  # outside a module's forward (torch.fx copying the model,
            # its interpreter replaying the graph): a leaf, as a parameter is
        elif t.requires_grad:
            # inside a forward, not a leaf of its own: autograd's accumulator of a leaf holds
            # the leaf, and the forward's output would then keep every weight it used alive
            with torch._C.DisableTorchFunction():
                out = _Alias.apply(out, self.anchor)
        return out


class _Alias(torch.autograd.Function):
    """The same values, with a grad_fn that holds nothing but a zero-size leaf (no copy). The
    same storage, not a view of it: a model may change the result in place (autograd forbids
    that on a view a custom Function returns)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        out = torch.empty(0, dtype=weight.dtype)
        return out.set_(
            weight.untyped_storage(), weight.storage_offset(), weight.shape, weight.stride()
        )

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


@contextmanager
def materialized_in_forward(deferred: Deferred) -> Iterator[None]:
    """Meanwhile, every torch function that is handed one of the model's meta tensors gets
    it materialised instead (and `.device` reads the CPU): a forward of the whole model
    computes on real values while the model keeps its meta tensors, its Parameter objects
    and their identities. A materialised tensor lives as long as what the op made of it
    (an output, a view); the most recent ones are kept up to CACHE_BYTES for reuse. A linear
    layer whose weight is one Gaussian draw gets its output drawn instead, given its input
    (`_Materializing._sampled_linear`): on a short input that is a small fraction of the
    draws and of the arithmetic. Autograd keeps nothing for a backward (which `check` never
    runs): a forward with grad enabled would otherwise hold every weight it used, and every
    activation, until it ends."""
    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )

    materializing = _Materializing(deferred)

    def enter(module: nn.Module, args: Any) -> None:
        materializing.depth += 1

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        materializing.depth -= 1

    saved = torch.autograd.graph.saved_tensors_hooks(materializing.pack, materializing.unpack)
    handles = [
        register_module_forward_pre_hook(enter),
        register_module_forward_hook(leave, always_call=True),
    ]
    try:
        with materializing, saved:
            yield
    finally:
        for h in handles:
            h.remove()
