"""Deferred initialisation: build a model on the meta device, remember what its construction did
to every tensor, and materialise any one parameter or buffer later, alone.

A model of billions of parameters does not fit in memory as float32 weights, yet the questions
`check` asks of it (init scale against fan-in, constant layers, the signal at init) are questions
about what its own code does at construction. So the constructor runs with every tensor on the
meta device (shapes, no storage) under a `TorchDispatchMode` that records each aten op: what it
read, what it wrote (its outputs, and the arguments its schema marks as mutated), keyed by
storage, so that views (`weight[padding_idx].zero_()`, `weight.data.normal_()`) belong to the
tensor they view. Later, `materialize(t)` replays on the CPU only the ops that wrote `t`'s storage
and, transitively, the storages they read (a rotary table computed from `arange`), in their
order; random ops draw from a generator seeded per storage, so a tensor materialised twice is the
same tensor. Its distribution is that of the full build; its random draws are not the same ones.

`init_stats(t)` answers without materialising when the replay would only draw one distribution
over the whole tensor (`normal_(mean, std)`, `uniform_(a, b)`, `fill_`, `zero_`, `ones`...): the
statistics are then those of the distribution, exactly. Anything else is materialised.

Four of torch's own init functions return at once on a meta tensor, as their draw depends on
values (`trunc_normal_`'s rejection loop, `orthogonal_`'s QR, `dirac_`, `sparse_`): while
recording they are replaced (in `torch.nn.init` and in Hugging Face's table of torch's init
functions) by a stand-in that records the call itself, replayed as that call.

A construction that needs values (`.item()`, a data-dependent branch) cannot run on meta:
`record` raises `DeferredUnsupported`, and the caller builds the model for real.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CONSTANT_LIMIT = 1 << 20  # elements of a real (non-meta) tensor an op may read and be replayed
META_SKIPPING_INITS = ("trunc_normal_", "orthogonal_", "dirac_", "sparse_")


class DeferredUnsupported(RuntimeError):
    """The model's construction cannot be recorded on the meta device (it needs values)."""


@dataclass(frozen=True)
class _Ref:
    """A meta tensor's place: its storage and its geometry in that storage."""

    key: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> _Ref:
        return _Ref(
            storage_key(t), tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.dtype
        )

    def covers(self, numel: int) -> bool:
        """Whether this view is the whole contiguous storage of `numel` elements."""
        return self.offset == 0 and math.prod(self.size) == numel and _contiguous(self)


def _contiguous(r: _Ref) -> bool:
    expected = 1
    for n, s in reversed(list(zip(r.size, r.stride))):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _storage_numel(t: torch.Tensor) -> int:
    with torch._C.DisableTorchFunction():
        return t.untyped_storage().nbytes() // t.element_size()


def storage_key(t: torch.Tensor) -> int:
    with torch._C.DisableTorchFunction():  # the meta storage itself, never a materialised one
        return t.untyped_storage()._cdata


@dataclass
class _Op:
    func: Any  # an OpOverload
    args: Any  # with _Ref for meta tensors, real tensors as constants
    kwargs: dict[str, Any]
    outs: list[_Ref | None]  # flattened outputs; None for what is no meta tensor
    writes: set[int]  # storages it wrote: new outputs and mutated arguments
    reads: set[int]  # storages of its meta tensor arguments


@dataclass(frozen=True)
class InitStats:
    """What `check` reads of a parameter at init (as `graph.ops.param_info` measures it)."""

    numel: int
    mean: float
    std: float
    all_equal: bool
    exact: bool  # from the distribution itself (True) or from a materialised tensor (False)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.alive: list[torch.Tensor] = []  # keeps meta storages alive, so keys stay unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        reads: set[int] = set()
        writes: set[int] = set()
        schema_args = func._schema.arguments
        for i, value in enumerate(args):
            if isinstance(value, torch.Tensor) and value.is_meta:
                info = schema_args[i].alias_info if i < len(schema_args) else None
                if info is not None and info.is_write:
                    writes.add(storage_key(value))
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                info = next((a.alias_info for a in schema_args if a.name == name), None)
                if info is not None and info.is_write:
                    writes.add(storage_key(value))

        def ref(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            if value.is_meta:
                self.alive.append(value)
                reads.add(storage_key(value))
                return _Ref.of(value)
            if value.numel() > CONSTANT_LIMIT:
                return _Unreplayable(f"{func} read a real tensor of {value.numel()} elements")
            return value.detach().clone()

        rargs = tree_map(ref, args)
        rkwargs = tree_map(ref, kwargs)
        flat_out, _ = tree_flatten(out)
        outs: list[_Ref | None] = []
        for value in flat_out:
            if isinstance(value, torch.Tensor) and value.is_meta:
                self.alive.append(value)
                key = storage_key(value)
                if key not in reads:  # a new storage (a view shares its input's)
                    writes.add(key)
                outs.append(_Ref.of(value))
            else:
                outs.append(None)
        self.ops.append(_Op(func, rargs, rkwargs, outs, writes, reads))
        return out

    def init_call(self, fn: Callable[..., Any], tensor: torch.Tensor, *args: Any, **kwargs: Any):
        """Record `fn(tensor, ...)`, an init function that would do nothing on a meta tensor."""
        if not tensor.is_meta:
            return fn(tensor, *args, **kwargs)
        self.alive.append(tensor)
        key = storage_key(tensor)
        self.ops.append(_Op(fn, (_Ref.of(tensor), *args), dict(kwargs), [None], {key}, {key}))
        return tensor


class _FromData(TorchFunctionMode):
    """Records `torch.tensor(data)` and its kin: on the meta device their values reach no aten
    op, so the call itself, with its data, is what a replay runs."""

    FUNCTIONS = (torch.tensor, torch.as_tensor, torch.asarray)

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self.FUNCTIONS and isinstance(out, torch.Tensor) and out.is_meta:
            if any(isinstance(a, torch.Tensor) for a in tree_flatten((args, kwargs))[0]):
                return out  # from another tensor: aten ops carry it
            self.recorder.alive.append(out)
            key = storage_key(out)
            kw = {k: v for k, v in kwargs.items() if k != "device"}
            self.recorder.ops.append(_Op(func, args, kw, [_Ref.of(out)], {key}, set()))
        return out


@contextmanager
def _init_calls_recorded(recorder: _Recorder) -> Iterator[None]:
    """torch.nn.init's meta-skipping functions replaced by recording stand-ins, meanwhile."""
    import sys

    tables: list[dict[str, Any]] = [vars(torch.nn.init)]
    hf = sys.modules.get("transformers.initialization")
    if hf is not None and isinstance(getattr(hf, "TORCH_INIT_FUNCTIONS", None), dict):
        tables.append(hf.TORCH_INIT_FUNCTIONS)
    saved = [(table, name, table[name]) for table in tables for name in META_SKIPPING_INITS
             if name in table]  # fmt: skip
    for table, name, original in saved:
        table[name] = functools.partial(recorder.init_call, original)
    try:
        yield
    finally:
        for table, name, original in saved:
            table[name] = original


@dataclass(frozen=True)
class _Unreplayable:
    why: str


@dataclass
class Deferred:
    """A model built on the meta device, and what its construction did."""

    model: nn.Module
    ops: list[_Op]
    seed: int = 0
    _alive: list[torch.Tensor] = field(default_factory=list, repr=False)
    _created: dict[int, int] = field(default_factory=dict, repr=False)  # storage -> first op

    def __post_init__(self) -> None:
        for i, op in enumerate(self.ops):
            for key in op.writes:
                self._created.setdefault(key, i)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter and buffer of the model, by qualified name (shared ones once)."""
        seen: set[int] = set()
        for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                yield name, t

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def writers(self, key: int) -> list[_Op]:
        return [op for op in self.ops if key in op.writes]

    def materialize(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (a meta parameter or buffer of the model) as a real CPU tensor, computed by
        replaying what wrote it. Raises DeferredUnsupported when that read a large real tensor."""
        if not tensor.is_meta:
            return tensor.detach()
        key, numel = storage_key(tensor), _storage_numel(tensor)
        real: dict[int, torch.Tensor] = {}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.seed_of(key))
            for op in self._live(key, numel):
                self._replay(op, real)
        if key not in real:  # never written: torch.empty's value is undefined; say zeros
            return torch.zeros(tensor.shape, dtype=tensor.dtype)
        return _view(real, _Ref.of(tensor))

    def seed_of(self, key: int) -> int:
        """The seed of storage `key`'s random draws: the same in every replay."""
        return self.seed * 1_000_003 + self._created.get(key, 0)

    def gaussian(self, tensor: torch.Tensor) -> tuple[float, float] | None:
        """(mean, std) when `tensor`, the whole of its storage, holds one `normal_` draw and
        nothing else reaches its value; else None."""
        key, numel = storage_key(tensor), _storage_numel(tensor)
        if not _Ref.of(tensor).covers(numel):
            return None
        live = self._live(key, numel)
        if (
            len(live) != 1
            or _op_name(live[0].func) != "normal_"
            or not _overwrites(live[0], key, numel)
        ):
            return None
        mean, std = _params(live[0], ("mean", 0.0), ("std", 1.0))
        return mean, abs(std)

    def init_stats(self, tensor: torch.Tensor) -> InitStats:
        """The parameter's init statistics: from the distribution its construction drew when
        that is all it did, else from the materialised tensor."""
        numel = tensor.numel()
        if tensor.is_meta:
            exact = _distribution(self.writers(storage_key(tensor)), numel)
            if exact is not None:
                mean, std, all_equal = exact
                return InitStats(numel, mean, std, all_equal and numel > 1, exact=True)
        return _measured(self.materialize(tensor))

    def _live(self, key: int, numel: int) -> list[_Op]:
        """The ops whose effect reaches the final value of storage `key` (of `numel` elements),
        in order: those that wrote it, or what they read, transitively; walking back from the
        end, a draw or fill over the whole of `key` ends what came before it there (a Linear's
        default init that the library's own init overwrites is not drawn)."""
        needed = {key}
        live: list[_Op] = []
        for op in reversed(self.ops):
            if not op.writes & needed:
                continue
            live.append(op)
            if key in needed and _overwrites(op, key, numel):
                needed.discard(key)
                needed |= op.reads - {key}
            else:
                needed |= op.reads
        live.reverse()
        return live

    def _replay(self, op: _Op, real: dict[int, torch.Tensor]) -> None:
        def value(a: Any) -> Any:
            if isinstance(a, _Ref):
                return _view(real, a)
            if isinstance(a, _Unreplayable):
                raise DeferredUnsupported(a.why)
            if isinstance(a, torch.device) and a.type == "meta":
                return torch.device("cpu")
            return a

        args = tree_map(value, op.args)
        kwargs = tree_map(value, op.kwargs)
        if kwargs.get("device") == "meta":
            kwargs["device"] = torch.device("cpu")
        out = args[0] if _drawn_in_parallel(op.func, args, kwargs) else op.func(*args, **kwargs)
        flat, _ = tree_flatten(out)
        for ref, t in zip(op.outs, flat):
            if ref is not None and isinstance(t, torch.Tensor) and ref.key not in real:
                real[ref.key] = t  # holds the new storage
        for a, ra in zip(tree_flatten(op.args)[0], tree_flatten(args)[0]):
            if isinstance(a, _Ref) and a.key not in real and isinstance(ra, torch.Tensor):
                real[a.key] = ra


def _op_name(func: Any) -> str:
    schema = getattr(func, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(getattr(func, "func", func), "__name__", "")  # a recorded init call


# In-place ops whose result does not depend on what the tensor held.
_OVERWRITING = {"normal_", "uniform_", "fill_", "zero_", "random_", "exponential_", "cauchy_",
                "log_normal_", "geometric_", *META_SKIPPING_INITS}  # fmt: skip


def _overwrites(op: _Op, key: int, numel: int) -> bool:
    """Whether `op` writes the whole of storage `key` (`numel` elements) without reading it."""
    target = op.args[0] if op.args else None
    return (
        isinstance(target, _Ref)
        and target.key == key
        and target.covers(numel)
        and op.writes == {key}
        and _op_name(op.func) in _OVERWRITING
    )


DRAW_CHUNK = 1 << 22  # elements per generator of a large replayed draw


def _drawn_in_parallel(func: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Replays a large `normal_`/`uniform_` (a 7B model's forward draws billions of values, and
    the CPU generator is serial) in chunks of DRAW_CHUNK elements on torch's threads, each
    chunk from its own generator seeded from the global one: the same values on any number of
    threads. False (nothing done) for anything else."""
    target = args[0] if args else None
    if (
        _op_name(func) not in ("normal_", "uniform_")
        or kwargs.get("generator") is not None
        or not isinstance(target, torch.Tensor)
        or target.numel() < 2 * DRAW_CHUNK
        or not target.is_contiguous()
    ):
        return False
    flat = target.view(-1)
    base = int(torch.randint(0, 2**62, ()).item())

    def draw(i: int) -> None:
        chunk = flat[i * DRAW_CHUNK : (i + 1) * DRAW_CHUNK]
        func(chunk, *args[1:], **{**kwargs, "generator": torch.Generator().manual_seed(base + i)})

    chunks = range(-(-flat.numel() // DRAW_CHUNK))
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(draw, chunks))
    return True


def _view(real: dict[int, torch.Tensor], ref: _Ref) -> torch.Tensor:
    """The real tensor at `ref`'s place in its (replayed) storage."""
    base = real.get(ref.key)
    if base is None:  # read before any replayed op wrote it: an uninitialised empty
        n = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride)) + 1
        base = torch.zeros(max(n, 0), dtype=ref.dtype)
        real[ref.key] = base
    out = torch.empty(0, dtype=ref.dtype)
    out.set_(base.untyped_storage(), ref.offset, ref.size, ref.stride)
    return out


_CREATE = {"empty", "empty_strided", "zeros", "ones", "full", "zeros_like", "ones_like",
           "empty_like", "full_like", "new_empty", "new_zeros", "new_ones", "new_full"}  # fmt: skip


def _distribution(writers: list[_Op], numel: int) -> tuple[float, float, bool] | None:
    """(mean, std, all values equal) when the storage was created and then overwritten whole by
    one draw or fill (the last whole overwrite decides), with nothing else written after it."""
    state: tuple[float, float, bool] | None = None
    for op in writers:
        schema = getattr(op.func, "_schema", None)
        if schema is None:
            return None  # a recorded init call (trunc_normal_, orthogonal_...): measure
        name = schema.name.split("::")[-1]
        target = op.args[0] if op.args else None
        whole = isinstance(target, _Ref) and target.covers(numel)
        if name in _CREATE:
            fill = {"zeros": 0.0, "zeros_like": 0.0, "new_zeros": 0.0, "ones": 1.0,
                    "ones_like": 1.0, "new_ones": 1.0}.get(name)  # fmt: skip
            if name in ("full", "full_like", "new_full"):
                fill = float(op.args[1] if len(op.args) > 1 else op.kwargs["fill_value"])
            state = (fill, 0.0, True) if fill is not None else None
        elif not whole:
            return None  # a part of it written (a padding row): measure
        elif name == "normal_":
            mean, std = _params(op, ("mean", 0.0), ("std", 1.0))
            state = (mean, abs(std), std == 0)
        elif name == "uniform_":
            low, high = _params(op, ("from", 0.0), ("to", 1.0))
            state = ((low + high) / 2, abs(high - low) / math.sqrt(12), low == high)
        elif name == "fill_":
            v = op.args[1]
            if isinstance(v, (_Ref, torch.Tensor)):
                return None
            state = (float(v), 0.0, True)
        elif name == "zero_":
            state = (0.0, 0.0, True)
        else:
            return None
    return state


def _params(op: _Op, *spec: tuple[str, float]) -> list[float]:
    out = []
    for i, (name, default) in enumerate(spec, start=1):
        v = op.args[i] if len(op.args) > i else op.kwargs.get(name, default)
        out.append(float(v))
    return out


def _measured(t: torch.Tensor) -> InitStats:
    flat = t.detach().float().reshape(-1)
    n = flat.numel()
    if n == 0:
        return InitStats(0, 0.0, 0.0, False, exact=False)
    mean = float(flat.mean())
    std = float(flat.std()) if n > 1 else 0.0
    low, high = torch.aminmax(flat) if n > 1 else (flat[0], flat[0] + 1)
    return InitStats(n, mean, std, bool(low == high), exact=False)


def _library_init(model: nn.Module) -> None:
    """What a library's own construction leaves out on the meta device, run on the meta model.
    Hugging Face's `post_init` skips `initialize_weights` under a meta device context (it
    expects weights to be loaded); the full build runs it, so the record must."""
    import sys

    hf = sys.modules.get("transformers")
    pretrained = getattr(hf, "PreTrainedModel", None) if hf is not None else None
    if pretrained is not None and isinstance(model, pretrained):
        model.initialize_weights()
        model.tie_weights()


def record(build: Callable[[], nn.Module], seed: int = 0) -> Deferred:
    """Run `build()` with every new tensor on the meta device, recording what it does."""
    recorder = _Recorder()
    try:
        with torch.device("meta"), _FromData(recorder), recorder, _init_calls_recorded(recorder):
            model = build()
        with recorder, _init_calls_recorded(recorder):
            _library_init(model)
    except (NotImplementedError, RuntimeError) as e:
        if isinstance(e, DeferredUnsupported):
            raise
        raise DeferredUnsupported(f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    return Deferred(model, recorder.ops, seed, recorder.alive)


_ACTIVE: ContextVar[Deferred | None] = ContextVar("netdoctor_deferred", default=None)


@contextmanager
def active(deferred: Deferred | None) -> Iterator[None]:
    """While checking a deferred model, `stats_of` answers for its meta tensors."""
    token = _ACTIVE.set(deferred)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def stats_of(tensor: torch.Tensor) -> InitStats | None:
    """The init statistics of a meta tensor of the deferred model being checked, else None."""
    deferred = _ACTIVE.get()
    if deferred is None or not tensor.is_meta:
        return None
    return deferred.init_stats(tensor)
