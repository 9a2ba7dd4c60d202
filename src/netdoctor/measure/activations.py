"""Activation measurement: which units fire, which saturate, and who produced what.

`ActivationRecorder` puts a pre/post hook on every module of a model (a module stack, the order
in which layers with parameters run, which module produced which output tensor) and, around each
measured forward, a TorchFunctionMode that sees every ReLU/sigmoid/tanh -- module *and*
functional calls (`torch.relu`, `F.relu`, `x.sigmoid()`) -- and measures its output on the
device, without a host sync until `flush_step()`.

Use as `with recorder.attached(): ... with recorder.forward(): out = model(x)`; the hooks are
removed on exit whatever happens. Outside `forward()` the hooks only keep the module stack, so a
forward that is not measured costs a few Python calls per module.

The watcher (`netdoctor.watcher`), which cannot wrap the user's forward in a `with`, uses the
same steps one by one from its root-module hooks: `attach()` + `begin_forward()` in the root's
forward pre-hook, `end_forward()` + `detach()` in its forward hook (registered with
`always_call=True`, so an exception in forward never leaves the mode on the stack), and
`new_window()` to restart the "never active" window as a long run goes on.

Under `torch.autocast` with float16 or bfloat16 (the probe's `--precision`, or the user's own
autocast seen by the watcher), the post-hooks also take each module's max |output| -- one fused
reduction on the device per module call, crossing to the host on `flush_step()`'s one sync -- for
the float16 headroom of every module (`headroom()`).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from netdoctor.findings import Location
from netdoctor.loading.provenance import _is_internal
from netdoctor.measure.record import ActivationTrace, ModuleHeadroom

_ACT_FUNCS: dict[Any, str] = {}


def _act_table() -> dict[Any, str]:
    if not _ACT_FUNCS:
        for fn in (
            torch.relu,
            torch.relu_,
            F.relu,
            F.relu_,
            F.relu6,
            torch.Tensor.relu,
            torch.Tensor.relu_,
        ):
            _ACT_FUNCS[fn] = "relu"
        for fn in (
            torch.sigmoid,
            torch.sigmoid_,
            F.sigmoid,
            torch.Tensor.sigmoid,
            torch.Tensor.sigmoid_,
        ):
            _ACT_FUNCS[fn] = "sigmoid"
        for fn in (torch.tanh, torch.tanh_, F.tanh, torch.Tensor.tanh, torch.Tensor.tanh_):
            _ACT_FUNCS[fn] = "tanh"
    return _ACT_FUNCS


def autocast_dtype() -> torch.dtype | None:
    """The low-precision dtype of the autocast in force (CPU or CUDA), or None."""
    for device in ("cuda", "cpu"):
        try:
            on = torch.is_autocast_enabled(device)
        except TypeError:  # torch < 2.4: no device argument
            on = (
                torch.is_autocast_enabled() if device == "cuda" else torch.is_autocast_cpu_enabled()
            )
        if on:
            try:
                return torch.get_autocast_dtype(device)
            except AttributeError:  # torch < 2.4
                return (
                    torch.get_autocast_gpu_dtype()
                    if device == "cuda"
                    else torch.get_autocast_cpu_dtype()
                )
    return None


_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh)
_CONV = (nn.modules.conv._ConvNd,)


class _Site:
    __slots__ = ("active", "pending", "previous", "storage", "trace", "unit_axis")

    def __init__(self, trace: ActivationTrace, unit_axis: int | None) -> None:
        self.trace = trace
        self.storage = 0  # where its latest output lives (to recognise it as the model's output)
        self.active: torch.Tensor | None = None
        self.previous: tuple[torch.Tensor, int] | None = None  # the last full window (watcher)
        self.pending: list[tuple[torch.Tensor, int]] = []
        self.unit_axis = unit_axis


def _call_as_without_mode(func: Any, args: tuple, kwargs: dict) -> Any:
    """`func(*args, **kwargs)` as the mode must call it, with a warning it raises shown where it
    would be without the mode: a torch function warns with a `stacklevel` that points at its
    caller, which inside the mode is this file (the user's deprecation warning would name
    netdoctor's line). `warnings.showwarning` is swapped for the call, not the filters, so the
    registries that show a warning once per place are left alone."""
    shown = warnings.showwarning
    warnings.showwarning = _ShowAsCaller(shown, func)
    try:
        return func(*args, **kwargs)
    finally:
        warnings.showwarning = shown


_SHOWN: set[tuple] = set()  # warnings moved to their caller and shown (once per place)


def _action(text: str, category: type[Warning], module: str, lineno: int) -> str:
    """The action the warning filters give this warning (as `warnings` decides it)."""
    for action, message, cat, mod, line in warnings.filters:
        if (
            (message is None or message.match(text))
            and issubclass(category, cat)
            and (mod is None or mod.match(module))
            and (line == 0 or lineno == line)
        ):
            return str(action)
    return str(getattr(warnings, "defaultaction", "default"))


class _ShowAsCaller:
    """A `showwarning` that moves a warning placed on this file to the caller of the call the
    mode intercepted (past torch's dispatch and the function itself), and marks it shown in that
    place's registry too, so the same warning from an unmeasured forward is not shown again."""

    def __init__(self, shown: Any, func: Any) -> None:
        self.shown = shown
        self.own = getattr(func, "__code__", None)

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        if filename == __file__:
            frame: FrameType | None = sys._getframe(1)
            while frame is not None and (
                frame.f_code.co_filename in (__file__, warnings.__file__)
                or frame.f_code is self.own
                or frame.f_code.co_filename.endswith(("torch/overrides.py", "torch\\overrides.py"))
            ):
                frame = frame.f_back
            if frame is not None:
                filename, lineno = frame.f_code.co_filename, frame.f_lineno
                key = (str(message), category, filename, lineno)
                if _action(str(message), category, frame.f_globals.get("__name__", ""), lineno) != (
                    "always"
                ):
                    if key in _SHOWN:  # shown once here (a filter change reset the registry)
                        return
                    _SHOWN.add(key)
                ours = globals().get("__warningregistry__", {})
                registry = frame.f_globals.setdefault("__warningregistry__", {})
                if "version" in ours:
                    if registry.get("version") != ours["version"]:
                        registry.clear()
                        registry["version"] = ours["version"]
                    registry[(str(message), category, lineno)] = True
        self.shown(message, category, filename, lineno, file, line)


class _Mode(TorchFunctionMode):
    def __init__(self, recorder: ActivationRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = _call_as_without_mode(func, args, kwargs or {})
        kind = _ACT_FUNCS.get(func)
        if kind is not None and isinstance(out, torch.Tensor) and out.is_floating_point():
            t0 = time.perf_counter()
            try:
                self.recorder._observe(kind, args[0] if args else None, out)
            except Exception:  # instrumentation must never break the user's forward
                pass
            self.recorder.seconds += time.perf_counter() - t0
        return out


class ActivationRecorder:
    """Hooks on every module of the probe's copy (a module stack, execution order, which module
    produced which tensor) and a TorchFunctionMode that measures every activation call.

    Use as `with recorder.attached(): ... with recorder.forward(): out = model(x)`; hooks are
    removed on exit whatever happens."""

    def __init__(self, model: nn.Module, sites: dict[str, Location] | None = None) -> None:
        self.model = model
        self.names: dict[nn.Module, str] = {}
        self.types: dict[str, str] = {}
        self.refresh()
        self.module_sites = sites or {}
        self.handles: list[Any] = []
        self._mode: _Mode | None = None
        self.stack: list[str] = []
        self.calls: dict[str, int] = {}
        self.line_calls: dict[tuple, int] = {}
        self.producers: dict[int, tuple[str, Any]] = {}
        self.order: list[str] = []  # modules with direct parameters, first-forward order
        self._order_seen: set[str] = set()
        self.sites: dict[tuple, _Site] = {}
        self.site_list: list[_Site] = []
        self.in_window = False
        self.min_window = 0
        self.seconds = 0.0  # time spent measuring activations inside the measured forwards
        self._amax_on = False  # this forward runs under float16/bfloat16 autocast
        self.precision = "fp32"  # "fp16"/"bf16" once a measured forward ran under autocast
        self._amax_pending: list[tuple[str, str, torch.Tensor]] = []  # (module, dtype, amax)
        self._headroom: dict[str, ModuleHeadroom] = {}
        self._flushes = 0
        _act_table()

    def refresh(self) -> None:
        """Re-read the model's module tree (a watched model may gain or replace layers)."""
        self.names = {m: n for n, m in self.model.named_modules()}
        self.types = {n: type(m).__name__ for m, n in self.names.items()}

    # -- hooks ------------------------------------------------------------------------
    @contextmanager
    def attached(self) -> Iterator[ActivationRecorder]:
        try:
            self.attach()
            yield self
        finally:
            self.detach()

    def attach(self) -> None:
        """Hooks on every module (pair with `detach()`, in a `finally` or an always-called
        hook)."""
        if self.handles:
            return
        for m, name in self.names.items():
            self.handles.append(m.register_forward_pre_hook(self._pre(name)))
            self.handles.append(m.register_forward_hook(self._post(name, m)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def enter(self, name: str) -> None:
        """What a module's pre-hook records; for a root whose forward began before `attach()`
        (hooks registered during a forward run from the next call on)."""
        self.stack.append(name)
        self.calls[name] = self.calls.get(name, 0) + 1

    def _pre(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            self.enter(name)

        return hook

    def _post(
        self, name: str, module: nn.Module
    ) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        has_params = any(True for _ in module.parameters(recurse=False))

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if self.stack:
                self.stack.pop()
            if isinstance(out, torch.Tensor) and self.producer_of(out) is None:
                # innermost module first: a container returning its child's output keeps the
                # child's name; the weak reference tells a freed tensor's reused id apart
                self.producers[id(out)] = (name, weakref.ref(out))
                if self._amax_on and out.is_floating_point() and out.numel():
                    self._amax(name, out)
            if has_params and name not in self._order_seen:
                self._order_seen.add(name)
                self.order.append(name)
            if name == "":
                self._mark_output(out)

        return hook

    def _mark_output(self, out: Any) -> None:
        """The activation whose output the model returns (a view of it too: DCGAN's
        discriminator returns its sigmoid's output reshaped) is its output, not a hidden unit:
        a saturated output sigmoid is a confident prediction (ND405 leaves it alone)."""
        values = out.values() if isinstance(out, dict) else out
        tensors = [out] if isinstance(out, torch.Tensor) else list(values)
        stores = {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}
        for site in self.site_list:
            if site.storage and site.storage in stores:
                site.trace.is_output = True

    @contextmanager
    def forward(self) -> Iterator[None]:
        self.begin_forward()
        try:
            yield
        finally:
            self.end_forward()

    def begin_forward(self) -> None:
        """Start measuring one forward: push the activation mode (pair with `end_forward()`)."""
        self.stack.clear()
        self.calls.clear()
        self.line_calls.clear()
        self.producers.clear()
        dtype = autocast_dtype()
        self._amax_on = dtype in (torch.float16, torch.bfloat16)
        if self._amax_on:  # float16 once seen stays: its range is the one at risk
            self.precision = "fp16" if dtype == torch.float16 else self.precision
            self.precision = "bf16" if self.precision == "fp32" else self.precision
        self._mode = _Mode(self)
        self._mode.__enter__()

    def end_forward(self) -> None:
        """Pop the activation mode pushed by `begin_forward()` (a no-op when none is on)."""
        mode, self._mode = self._mode, None
        self.producers.clear()
        self._amax_on = False  # forwards outside a measured one (a replay) are not measured
        if mode is not None:
            mode.__exit__(None, None, None)

    @property
    def measuring(self) -> bool:
        return self._mode is not None

    def producer_of(self, t: Any) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self.producers.get(id(t))
        if entry is None or entry[1]() is not t:
            return None
        return entry[0]

    # -- float16 headroom -----------------------------------------------------------------
    def _amax(self, name: str, out: torch.Tensor) -> None:
        try:
            amax = torch.linalg.vector_norm(out.detach(), float("inf"))
        except Exception:  # instrumentation must never break the user's forward
            return
        self._amax_pending.append((name, str(out.dtype).replace("torch.", ""), amax))

    def headroom(self) -> list[ModuleHeadroom]:
        """Each module's max |output| over the measured autocast forwards, in forward order
        (empty when none ran under float16/bfloat16 autocast)."""
        return list(self._headroom.values())

    def _record_amax(self, values: list[float]) -> None:
        self._flushes += 1
        seen: set[str] = set()
        for (name, dtype, _), v in zip(self._amax_pending, values):
            h = self._headroom.get(name)
            if h is None:
                h = self._headroom[name] = ModuleHeadroom(name, dtype, 0.0)
            if name not in seen:
                seen.add(name)
                h.steps += 1
            if not math.isfinite(v):
                h.amax = math.inf
                if h.first_overflow is None:
                    h.first_overflow = self._flushes
            elif v > h.amax:
                h.amax = v
        self._amax_pending.clear()

    # -- activation measurement ---------------------------------------------------------
    def _observe(self, kind: str, inp: Any, out: torch.Tensor) -> None:
        top = self.stack[-1] if self.stack else ""
        top_mod = self._module(top)
        key: tuple[Any, ...]  # ("module", name, call) or ("func", module, file, line, call)
        if isinstance(top_mod, _ACT_MODULES):
            count = self.calls.get(top, 1)
            key = ("module", top, count)
            site = self.sites.get(key)
            if site is None:
                name = top if count == 1 else f"{top}#{count}"
                producer = self.producer_of(inp)
                trace = ActivationTrace(
                    name=name,
                    kind=kind,
                    module=top,
                    producer=producer,
                    functional=False,
                    location=self.module_sites.get(top),
                )
                site = self._new_site(key, trace, producer)
        else:
            frame: FrameType | None = sys._getframe(2)
            while frame is not None and _is_internal(frame.f_code.co_filename):
                frame = frame.f_back
            where = (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("?", 0)
            line_key = (top, *where)
            n = self.line_calls.get(line_key, 0) + 1
            self.line_calls[line_key] = n
            key = ("func", top, *where, n)
            site = self.sites.get(key)
            if site is None:
                producer = self.producer_of(inp)
                base = producer if producer is not None else (top or "forward")
                name = f"{kind}({base})"
                taken = {s.trace.name for s in self.site_list}
                k = 2
                while name in taken:
                    name = f"{kind}({base})#{k}"
                    k += 1
                loc = Location(where[0], where[1]) if frame is not None else None
                trace = ActivationTrace(
                    name=name,
                    kind=kind,
                    module=producer,
                    producer=producer,
                    functional=True,
                    location=loc,
                )
                site = self._new_site(key, trace, producer)
        site.storage = out.untyped_storage().data_ptr()
        self._measure(site, kind, out.detach())

    def _module(self, name: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(name) if name else self.model
        except AttributeError:
            return None

    def _new_site(self, key: tuple, trace: ActivationTrace, producer: str | None) -> _Site:
        pm = self._module(producer) if producer else None
        axis = 1 if isinstance(pm, _CONV) else (-1 if isinstance(pm, nn.Linear) else None)
        site = _Site(trace, axis)
        self.sites[key] = site
        self.site_list.append(site)
        return site

    def _measure(self, site: _Site, kind: str, t: torch.Tensor) -> None:
        n = t.numel()
        if n == 0:
            return
        if kind == "relu":
            site.pending.append((torch.count_nonzero(t), n))
            if self.in_window:
                axis = site.unit_axis
                if axis is None:
                    axis = 1 if t.dim() == 2 or t.dim() >= 4 else (-1 if t.dim() == 3 else None)
                if axis is None or t.dim() < 2:
                    active = t.reshape(-1) > 0
                else:
                    axis = axis % t.dim()
                    dims = [d for d in range(t.dim()) if d != axis]
                    active = t.amax(dim=dims) > 0
                if site.active is None or site.active.shape != active.shape:
                    site.active = active
                else:
                    site.active |= active
        elif kind == "sigmoid":
            site.pending.append((((t - 0.5).abs() > 0.49).sum(), n))
        else:
            site.pending.append(((t.abs() > 0.99).sum(), n))

    def flush_step(self) -> None:
        """Move this step's pending activation counts (and max |output|s) to the traces (one
        device sync)."""
        pend = [(s, v, n) for s in self.site_list for v, n in s.pending]
        amax = [a for _, _, a in self._amax_pending]
        if not pend and not amax:
            return
        values = torch.stack(
            [v.to(torch.float64) for _, v, _ in pend] + [a.to(torch.float64) for a in amax]
        ).tolist()
        if amax:
            self._record_amax(values[len(pend) :])
            values = values[: len(pend)]
        if not pend:
            return
        seen: set[int] = set()
        for (site, _, n), v in zip(pend, values):
            if id(site) in seen:
                continue
            seen.add(id(site))
            if site.trace.kind == "relu":
                site.trace.zero_fraction.append(1.0 - v / n)
            else:
                site.trace.saturation.append(v / n)
        for s in self.site_list:
            s.pending.clear()
            if self.in_window and s.trace.kind == "relu":
                s.trace.window_steps += 1

    def discard_pending(self) -> None:
        """Drop measurements not yet flushed (a forward whose step never came)."""
        for s in self.site_list:
            s.pending.clear()
        self._amax_pending.clear()

    def new_window(self, min_steps: int = 3) -> None:
        """Start a new "never active" window (a long watched run: units must be dead over the
        recent measured steps, not over all of them). The previous window is kept for
        `finish()` while the new one holds fewer than `min_steps` steps."""
        for s in self.site_list:
            if s.trace.kind != "relu":
                continue
            if s.active is not None and s.trace.window_steps >= min_steps:
                s.previous = (s.active, s.trace.window_steps)
            s.active = None
            s.trace.window_steps = 0
        self.min_window = min_steps

    def finish(self) -> list[ActivationTrace]:
        out = []
        for s in self.site_list:
            active, steps = s.active, s.trace.window_steps
            if s.previous is not None and (active is None or steps < self.min_window):
                active, steps = s.previous
                s.trace.window_steps = steps
            if s.trace.kind == "relu" and active is not None:
                s.trace.units = int(active.numel())
                s.trace.dead_units = int((~active).sum())
            out.append(s.trace)
        return out
