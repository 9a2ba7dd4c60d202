"""The probe's training loop and its instrumentation.

`run_probe(model, source, config)` trains its own deep copy of `model` for `config.steps` steps on
batches from a `netdoctor.data.DataSource` (fed exactly as the source serves them) and returns a
`ProbeRun` with everything the runtime rules (ND4xx) read:

* per step: loss, accuracy, per-parameter gradient norms, weight norms and update/weight ratios;
* per activation site (ReLU/Sigmoid/Tanh modules *and* functional torch.relu/F.relu/x.sigmoid()
  calls, seen through a TorchFunctionMode): zero fraction and saturation per step, and which
  units (channels/features) were ever active over the last part of the probe (`window`);
* the first non-finite value: the step, the module that produced it (the first module in
  execution order whose inputs were all finite but whose output was not, found by replaying that
  step's forward with the same weights and RNG state), or the first parameter whose gradient went
  non-finite;
* train- vs eval-mode outputs at the end (BatchNorm running statistics), and a separate
  overfit-one-batch run on a fresh copy.

Instrumentation is hooks on the probe's own copy plus a TorchFunctionMode around each forward;
both are always removed (finally). The user's model object is never modified.
"""

from __future__ import annotations

import copy
import math
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from netdoctor.errors import UserError
from netdoctor.findings import Location
from netdoctor.loading.forward import main_output, preserved_modes
from netdoctor.loading.provenance import _is_internal

OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = ("cross_entropy", "mse", "bce")
DEVICES = ("auto", "cpu", "cuda")
IGNORE_INDEX = -100

# Defaults (see the probe command's help and docs/probe defaults): measured so that the default
# probe of a LeNet-size model finishes in a few seconds on a laptop CPU.
DEFAULT_STEPS = 100
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_MOMENTUM = 0.9


@dataclass
class ProbeConfig:
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    optimizer: str = "sgd"
    momentum: float = DEFAULT_MOMENTUM  # SGD only
    weight_decay: float = 0.0
    loss: str = "cross_entropy"
    seed: int = 0
    device: str = "auto"
    window: float = 0.5  # share of the last steps over which units must be active to be alive
    overfit_steps: int = 50  # 0: no overfit-one-batch run
    overfit_samples: int = 16
    overfit_lr: float = 1e-3  # Adam, independent of the probe's optimizer (Karpathy's recipe)

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.optimizer]

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r} (use {', '.join(OPTIMIZERS)})")
        if self.loss not in LOSSES:
            raise UserError(f"unknown loss {self.loss!r} (use {', '.join(LOSSES)})")
        if self.device not in DEVICES:
            raise UserError(f"unknown device {self.device!r} (use {', '.join(DEVICES)})")
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise UserError(f"--lr must be a positive number, got {self.lr}")

    def describe(self) -> str:
        opt = self.optimizer
        extra = f", momentum {self.momentum:g}" if opt == "sgd" else ""
        if self.weight_decay:
            extra += f", weight decay {self.weight_decay:g}"
        return (f"{self.steps} steps of {opt} (lr {self.learning_rate:g}{extra}), batch size "
                f"{self.batch_size}, {self.loss} loss, seed {self.seed}")


# ------------------------------------------------------------------------------ measurements

@dataclass
class ActivationTrace:
    """One activation site: a ReLU/Sigmoid/Tanh module call or a functional call in forward."""

    name: str  # "net.2" (module), "net.2#2" (its 2nd call per forward), "relu(fc1)" (functional)
    kind: str  # "relu", "sigmoid", "tanh"
    module: str | None  # the activation module, or for functional calls the producer module
    producer: str | None  # the module whose output it received, when known
    functional: bool
    location: Location | None  # construction site (module) or the calling line (functional)
    units: int = 0  # channels (conv) or features (linear)
    zero_fraction: list[float] = field(default_factory=list)  # per step, ReLU
    saturation: list[float] = field(default_factory=list)  # per step, sigmoid/tanh
    dead_units: int | None = None  # never active over the window (ReLU)
    window_steps: int = 0

    @property
    def dead_fraction(self) -> float | None:
        if self.dead_units is None or not self.units:
            return None
        return self.dead_units / self.units


@dataclass
class ParamTrace:
    name: str  # "net.1.weight"
    module: str  # "net.1"
    module_type: str
    shape: tuple[int, ...]
    grad_norm: list[float] = field(default_factory=list)  # per step; nan = no gradient (None)
    weight_norm: list[float] = field(default_factory=list)  # before the step's update
    update_ratio: list[float] = field(default_factory=list)  # ||w_after - w_before|| / ||w_before||
    # (relative to max(||w_before||, reference_norm) for weights; see reference_norm)
    steps_with_grad: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def reference_norm(self) -> float:
        """The norm PyTorch's default init gives a weight of this shape (std 1/sqrt(3 fan_in)).
        Update ratios are taken relative to max(weight norm, this), so a layer that starts at
        zero (a zero-initialised last layer) does not look like it moves infinitely fast."""
        if len(self.shape) < 2:
            return 0.0
        fan_in = self.numel // self.shape[0]
        return math.sqrt(self.numel / (3.0 * max(1, fan_in)))

    @property
    def is_weight(self) -> bool:
        """A layer's weight matrix/kernel (Linear, ConvNd, Embedding, RNN weight_ih_l0, ...);
        not biases, norms' scales, or tensors like cls tokens held by the model itself."""
        return len(self.shape) >= 2 and self.module != "" and \
            self.name.rpartition(".")[2].startswith("weight")


@dataclass
class NonFinite:
    step: int  # 1-based
    kind: str  # "input", "forward", "loss", "gradient", "parameter"
    module: str | None = None  # the producer ("" = the model's own forward code)
    module_type: str | None = None
    parameter: str | None = None
    input_stats: dict[str, Any] | None = None
    output_stats: dict[str, Any] | None = None
    bad_parameters: list[str] = field(default_factory=list)
    nonfinite_modules: list[str] = field(default_factory=list)  # every module whose output was
    # non-finite in the replayed forward, in the order their forwards completed
    reproduced: bool = True
    detail: str = ""


@dataclass
class ProbeRun:
    """Everything one probe measured (read by the ND4xx rules through ctx.run)."""

    config: ProbeConfig
    device: str
    target: str = ""
    steps_run: int = 0
    stopped: str | None = None  # "non-finite", "labels", "non-finite-input", "no-data"
    loss: list[float] = field(default_factory=list)
    accuracy: list[float | None] = field(default_factory=list)
    classification: bool = False
    num_outputs: int | None = None
    label_counts: list[int] | None = None
    pred_counts: list[int] | None = None  # predictions over the window
    activations: list[ActivationTrace] = field(default_factory=list)
    params: list[ParamTrace] = field(default_factory=list)  # in forward execution order
    layer_order: list[str] = field(default_factory=list)  # modules with parameters, executed order
    module_types: dict[str, str] = field(default_factory=dict)
    sites: dict[str, Location] = field(default_factory=dict)  # module name -> construction site
    frozen: list[str] = field(default_factory=list)  # parameters with requires_grad=False
    nonfinite: NonFinite | None = None
    bad_batch: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    train_eval: dict[str, Any] | None = None
    overfit: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prior_rules: set[str] = field(default_factory=set)  # static/data rule ids already found

    # -- helpers the rules use ---------------------------------------------------------
    def site(self, module: str | None) -> Location | None:
        return self.sites.get(module) if module is not None else None

    @property
    def window(self) -> int:
        """Number of final steps used for "over the probe" statistics."""
        return max(1, int(round(self.steps_run * self.config.window)))

    @property
    def chance(self) -> float | None:
        if not self.classification or not self.label_counts or not sum(self.label_counts):
            return None
        return max(self.label_counts) / sum(self.label_counts)

    def finite_losses(self) -> list[float]:
        return [v for v in self.loss if math.isfinite(v)]

    def summary_side(self) -> dict[str, Any]:
        """{"loss_first", "loss_last", "accuracy"} as the verified-fix line shows them."""
        losses = self.loss
        k = max(1, min(10, len(losses) // 10 or 1))
        tail = [v for v in losses[-k:]]
        last = (sum(tail) / len(tail)) if tail and all(math.isfinite(v) for v in tail) else (
            float("nan") if tail else None)
        accs = [a for a in self.accuracy[-k:] if a is not None]
        return {"loss_first": losses[0] if losses else None, "loss_last": last,
                "accuracy": (sum(accs) / len(accs)) if accs else None,
                "steps": self.steps_run}

    def weight_layers(self) -> list[ParamTrace]:
        """The weight (ndim >= 2) parameters in execution order."""
        return [p for p in self.params if p.is_weight]


# ------------------------------------------------------------------------------ instrumentation

_ACT_FUNCS: dict[Any, str] = {}


def _act_table() -> dict[Any, str]:
    if not _ACT_FUNCS:
        for fn in (torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, torch.Tensor.relu,
                   torch.Tensor.relu_):
            _ACT_FUNCS[fn] = "relu"
        for fn in (torch.sigmoid, torch.sigmoid_, F.sigmoid, torch.Tensor.sigmoid,
                   torch.Tensor.sigmoid_):
            _ACT_FUNCS[fn] = "sigmoid"
        for fn in (torch.tanh, torch.tanh_, F.tanh, torch.Tensor.tanh, torch.Tensor.tanh_):
            _ACT_FUNCS[fn] = "tanh"
    return _ACT_FUNCS


_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh)
_CONV = (nn.modules.conv._ConvNd,)


class _Site:
    __slots__ = ("active", "pending", "trace", "unit_axis")

    def __init__(self, trace: ActivationTrace, unit_axis: int | None):
        self.trace = trace
        self.active: torch.Tensor | None = None
        self.pending: list[tuple[torch.Tensor, int]] = []
        self.unit_axis = unit_axis


class _Mode(TorchFunctionMode):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = _ACT_FUNCS.get(func)
        if kind is not None and isinstance(out, torch.Tensor) and out.is_floating_point():
            try:
                self.recorder._observe(kind, args[0] if args else None, out)
            except Exception:  # instrumentation must never break the user's forward
                pass
        return out


class Recorder:
    """Hooks on every module of the probe's copy (a module stack, execution order, which module
    produced which tensor) and a TorchFunctionMode that measures every activation call.

    Use as `with recorder.attached(): ... with recorder.forward(): out = model(x)`; hooks are
    removed on exit whatever happens."""

    def __init__(self, model: nn.Module, sites: dict[str, Location] | None = None):
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.types = {n: type(m).__name__ for m, n in self.names.items()}
        self.module_sites = sites or {}
        self.handles: list[Any] = []
        self.stack: list[str] = []
        self.calls: dict[str, int] = {}
        self.line_calls: dict[tuple, int] = {}
        self.producers: dict[int, tuple[str, Any]] = {}
        self.order: list[str] = []  # modules with direct parameters, first-forward order
        self._order_seen: set[str] = set()
        self.sites: dict[tuple, _Site] = {}
        self.site_list: list[_Site] = []
        self.in_window = False
        _act_table()

    # -- hooks ------------------------------------------------------------------------
    @contextmanager
    def attached(self) -> Iterator[Recorder]:
        try:
            for m, name in self.names.items():
                self.handles.append(m.register_forward_pre_hook(self._pre(name)))
                self.handles.append(m.register_forward_hook(self._post(name, m)))
            yield self
        finally:
            for h in self.handles:
                h.remove()
            self.handles.clear()

    def _pre(self, name: str):
        def hook(mod, args):
            self.stack.append(name)
            self.calls[name] = self.calls.get(name, 0) + 1
        return hook

    def _post(self, name: str, module: nn.Module):
        has_params = any(True for _ in module.parameters(recurse=False))

        def hook(mod, args, out):
            if self.stack:
                self.stack.pop()
            if isinstance(out, torch.Tensor) and self.producer_of(out) is None:
                # innermost module first: a container returning its child's output keeps the
                # child's name; the weak reference tells a freed tensor's reused id apart
                self.producers[id(out)] = (name, weakref.ref(out))
            if has_params and name not in self._order_seen:
                self._order_seen.add(name)
                self.order.append(name)
        return hook

    @contextmanager
    def forward(self) -> Iterator[None]:
        self.stack.clear()
        self.calls.clear()
        self.line_calls.clear()
        self.producers.clear()
        mode = _Mode(self)
        try:
            with mode:
                yield
        finally:
            self.producers.clear()

    def producer_of(self, t: Any) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self.producers.get(id(t))
        if entry is None or entry[1]() is not t:
            return None
        return entry[0]

    # -- activation measurement ---------------------------------------------------------
    def _observe(self, kind: str, inp: Any, out: torch.Tensor) -> None:
        top = self.stack[-1] if self.stack else ""
        top_mod = self._module(top)
        if isinstance(top_mod, _ACT_MODULES):
            count = self.calls.get(top, 1)
            key = ("module", top, count)
            site = self.sites.get(key)
            if site is None:
                name = top if count == 1 else f"{top}#{count}"
                producer = self.producer_of(inp)
                trace = ActivationTrace(name=name, kind=kind, module=top, producer=producer,
                                        functional=False, location=self.module_sites.get(top))
                site = self._new_site(key, trace, producer)
        else:
            frame = sys._getframe(2)
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
                trace = ActivationTrace(name=name, kind=kind, module=producer, producer=producer,
                                        functional=True, location=loc)
                site = self._new_site(key, trace, producer)
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
                    active = (t.reshape(-1) > 0)
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
        """Move this step's pending activation counts to the traces (one device sync)."""
        pend = [(s, v, n) for s in self.site_list for v, n in s.pending]
        if not pend:
            return
        values = torch.stack([v.to(torch.float64) for _, v, _ in pend]).tolist()
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

    def finish(self) -> list[ActivationTrace]:
        out = []
        for s in self.site_list:
            if s.trace.kind == "relu" and s.active is not None:
                s.trace.units = int(s.active.numel())
                s.trace.dead_units = int((~s.active).sum())
            out.append(s.trace)
        return out


# ------------------------------------------------------------------------------ the loop

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)




def make_optimizer(params: list[nn.Parameter], config: ProbeConfig) -> torch.optim.Optimizer:
    lr = config.learning_rate
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay or 0.01)


def num_outputs(logits: torch.Tensor, y: torch.Tensor) -> int | None:
    """C for class-index targets: (N, C) vs (N,), (N, C, *S) vs (N, *S), (N, T, C) vs (N, T)."""
    if logits.dim() == 1:
        return 1
    if logits.dim() == 2:
        return logits.shape[1]
    if tuple(y.shape[1:]) == tuple(logits.shape[2:]):
        return logits.shape[1]
    if tuple(y.shape[1:]) == tuple(logits.shape[1:-1]):
        return logits.shape[-1]
    return logits.shape[1]


def class_targets(logits: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether y holds class indices for `logits` (rather than per-output targets)."""
    if y.is_floating_point() and tuple(y.shape) == tuple(logits.shape):
        return False
    if y.dtype == torch.bool:
        return False
    if tuple(y.shape) == tuple(logits.shape) and logits.dim() >= 2 and logits.shape[1] > 1:
        return False
    return y.dim() == logits.dim() - 1 or (logits.dim() == 2 and y.dim() == 1)


def check_targets(logits: torch.Tensor, y: torch.Tensor, loss: str) -> None:
    """UserError when the model's output and the targets cannot meet in the loss (a building
    block probed as if it were a classifier, a regression head with class labels...)."""
    out, tgt = tuple(logits.shape), tuple(y.shape)
    if class_targets(logits, y):
        lg_dim = logits.dim()
        fits = lg_dim == 1 and y.dim() == 1 or lg_dim == 2 and y.dim() == 1 or \
            lg_dim >= 3 and (tgt[1:] == out[2:] or tgt[1:] == out[1:-1])
        if fits and out[0] == tgt[0]:
            return
    elif out == tgt or (logits.numel() == y.numel() and out[0] == tgt[0]):
        return
    raise UserError(
        f"the model's output of shape {out} does not fit the targets of shape {tgt} for the "
        f"{loss} loss: the probe trains classifiers (outputs (N, C) with class labels (N,), or "
        "(N, C, ...) with (N, ...)) and models whose output has the targets' shape "
        "(--loss mse|bce); probe the whole model, not a building block")


def _class_axis_last(logits: torch.Tensor, y: torch.Tensor) -> bool:
    return logits.dim() == 3 and tuple(y.shape[1:]) == tuple(logits.shape[1:-1]) \
        and tuple(y.shape[1:]) != tuple(logits.shape[2:])


def compute_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor,
                                                                            torch.Tensor | None]:
    """(loss, number of correct predictions or None when accuracy has no meaning)."""
    is_class = class_targets(logits, y)
    if is_class:
        yl = y.long()
        lg = logits.movedim(-1, 1) if _class_axis_last(logits, y) else logits
        if lg.dim() == 1:  # one output per sample with class-index targets: binary
            lg = lg.unsqueeze(1)
        correct = (lg.argmax(1) == yl).sum() if lg.shape[1] > 1 else \
            ((lg[:, 0] > 0).long() == yl).sum()
        if name == "cross_entropy":
            if lg.shape[1] == 1:
                return F.binary_cross_entropy_with_logits(lg[:, 0], yl.float()), correct
            return F.cross_entropy(lg, yl, ignore_index=IGNORE_INDEX), correct
        target = F.one_hot(yl.clamp_min(0), lg.shape[1]).movedim(-1, 1).to(lg.dtype) \
            if lg.shape[1] > 1 else yl.to(lg.dtype).unsqueeze(1)
        if name == "mse":
            return F.mse_loss(lg, target), correct
        return F.binary_cross_entropy_with_logits(lg, target), correct
    target = y.to(logits.dtype)
    if target.shape != logits.shape and target.numel() == logits.numel():
        target = target.reshape(logits.shape)
    if name == "cross_entropy":  # soft labels (N, C)
        return F.cross_entropy(logits, target), None
    if name == "mse":
        return F.mse_loss(logits, target), None
    return F.binary_cross_entropy_with_logits(logits, target), None


def _bad_labels(logits: torch.Tensor, y: torch.Tensor, loss: str) -> bool:
    if not class_targets(logits, y):
        return False
    c = num_outputs(logits, y) or 1
    c = max(c, 2) if c == 1 else c
    v = y.reshape(-1)
    if v.is_floating_point():
        v = v[torch.isfinite(v)]
        if bool((v != v.round()).any()):
            return loss == "cross_entropy"
        v = v.long()
    v = v[v != IGNORE_INDEX] if loss == "cross_entropy" else v
    return bool(((v < 0) | (v >= c)).any()) if v.numel() else False


def _stats(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach()
    if not t.is_floating_point():
        return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    f = t.to(torch.float64).reshape(-1)
    fin = torch.isfinite(f)
    v = f[fin]
    out: dict[str, Any] = {"shape": list(t.shape), "nan": int(torch.isnan(f).sum()),
                           "inf": int(torch.isinf(f).sum())}
    if v.numel():
        out.update(min=float(v.min()), max=float(v.max()), mean=float(v.mean()),
                   std=float(v.std(unbiased=False)) if v.numel() > 1 else 0.0,
                   abs_max=float(v.abs().max()))
    return out


def _all_finite(values: Any) -> bool:
    ok = True

    def visit(v: Any) -> None:
        nonlocal ok
        if not ok:
            return
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() or v.is_complex():
                ok = bool(torch.isfinite(v).all())
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)

    visit(values)
    return ok


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def localize_forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str,
                     step: int, rng: tuple | None, device: torch.device) -> NonFinite:
    """Replay one step's forward with hooks on every module: the producer of the first
    non-finite value is the first module (in the order forwards complete, i.e. innermost first)
    whose tensor inputs were all finite but whose output was not."""
    names = {m: n for n, m in model.named_modules()}
    bad_params = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        return NonFinite(step, "input", input_stats=_stats(x),
                         detail="the input batch itself holds non-finite values")
    found: list[NonFinite] = []
    bad_modules: list[str] = []
    inputs_ok: dict[int, list[tuple[bool, dict | None]]] = {}

    def pre(mod, args):
        t = main_output(args)
        inputs_ok.setdefault(id(mod), []).append(
            (_all_finite(args), _stats(t) if t is not None else None))

    def post(mod, args, out):
        stack = inputs_ok.get(id(mod))
        entry = stack.pop() if stack else (True, None)
        out_ok = _all_finite(out)
        if not out_ok:
            bad_modules.append(names.get(mod, ""))
        if found:
            return
        if entry[0] and not out_ok:
            t = main_output(out)
            name = names.get(mod, "")
            own_bad = [p for p in bad_params if p.rpartition(".")[0] == name]
            found.append(NonFinite(step, "forward", module=name, module_type=type(mod).__name__,
                                   input_stats=entry[1],
                                   output_stats=_stats(t) if t is not None else None,
                                   bad_parameters=own_bad))

    handles = []
    try:
        for m in names:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        if rng is not None:
            _set_rng_state(rng, device)
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    if found:
        ev = found[0]
        ev.bad_parameters = bad_params if not ev.bad_parameters else ev.bad_parameters
        ev.nonfinite_modules = bad_modules
        return ev
    logits = main_output(out)
    if logits is not None and bool(torch.isfinite(logits).all()):
        with torch.no_grad():
            value, _ = compute_loss(loss, logits.float(), y)
        if not bool(torch.isfinite(value).all()):
            return NonFinite(step, "loss", output_stats=_stats(logits),
                             detail=f"the model's outputs are finite but the {loss} loss is not")
    return NonFinite(step, "forward", reproduced=False, bad_parameters=bad_params,
                     detail="replaying the step's forward gave finite values (non-deterministic "
                            "kernels)")


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                    "{task.total}"), TimeRemainingColumn(), console=Console(stderr=True),
                    transient=True)


def _train_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def run_probe(model: nn.Module, source, config: ProbeConfig, *,
              sites: dict[str, Location] | None = None, instrument: bool = True,
              transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
              progress: Any = None, label: str = "probe", overfit: bool | None = None,
              train_eval: bool | None = None) -> ProbeRun:
    """Train a deep copy of `model` on `config.steps` batches of `source` and measure it.

    `source`: a DataSource (its `batches(n)` is deterministic for the seed it was opened with).
    `transform`: applied to each input batch (the verify step's in-memory data fixes).
    `instrument=False` records only loss and accuracy (cheap re-runs).
    """
    config.validate()
    device = resolve_device(config.device)
    # The caller's random state is left as it was (the probe seeds its own).
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        return _run_probe(model, source, config, device, sites=sites, instrument=instrument,
                          transform=transform, progress=progress, label=label, overfit=overfit,
                          train_eval=train_eval)


def _run_probe(model: nn.Module, source, config: ProbeConfig, device: torch.device, *,
               sites: dict[str, Location] | None, instrument: bool,
               transform: Callable[[torch.Tensor], torch.Tensor] | None, progress: Any,
               label: str, overfit: bool | None, train_eval: bool | None) -> ProbeRun:
    torch.manual_seed(config.seed)
    try:
        net = copy.deepcopy(model)
    except Exception as e:
        raise UserError(f"cannot copy the model for the probe ({type(e).__name__}: {e})") from None
    net = net.to(device)
    net.train()
    run = ProbeRun(config=config, device=str(device), sites=dict(sites or {}))
    run.module_types = {n: type(m).__name__ for n, m in net.named_modules()}
    named = _train_params(net)
    run.frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    if not named:
        raise UserError("the model has no trainable parameters: nothing to probe")
    params = [p for _, p in named]
    opt = make_optimizer(params, config)
    traces = [ParamTrace(n, n.rpartition(".")[0], run.module_types.get(n.rpartition(".")[0], "?"),
                         tuple(p.shape)) for n, p in named]
    recorder = Recorder(net, sites) if instrument else None
    window_start = config.steps - max(1, int(round(config.steps * config.window)))
    label_counts: torch.Tensor | None = None
    pred_counts: torch.Tensor | None = None
    first_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    t0 = time.perf_counter()
    task = progress.add_task(label, total=config.steps) if progress is not None else None

    batches = source.batches(config.steps)
    try:
        with (recorder.attached() if recorder else nullcontext()):
            for step in range(config.steps):
                try:
                    x, y = next(batches)
                except StopIteration:
                    run.stopped = run.stopped or "no-data"
                    break
                if transform is not None:
                    x = transform(x)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if first_batch is None:
                    first_batch = (x, y)
                if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                    run.stopped = "non-finite-input"
                    run.nonfinite = NonFinite(step + 1, "input", input_stats=_stats(x),
                                              detail="the input batch holds non-finite values")
                    run.bad_batch = (x.cpu(), y.cpu())
                    break
                if recorder:
                    recorder.in_window = step >= window_start
                rng = _rng_state(device) if instrument else None
                opt.zero_grad(set_to_none=True)
                with (recorder.forward() if recorder else nullcontext()):
                    out = net(x)
                logits = main_output(out)
                if logits is None:
                    raise UserError("the model's forward returned no tensor "
                                    f"({type(out).__name__}); the probe needs logits")
                if step == 0:
                    check_targets(logits, y, config.loss)
                    run.classification = class_targets(logits, y)
                    run.num_outputs = num_outputs(logits, y) if run.classification else None
                if _bad_labels(logits, y, config.loss):
                    run.stopped = "labels"
                    run.bad_batch = (x.cpu(), y.cpu())
                    if recorder:
                        for s in recorder.site_list:
                            s.pending.clear()
                    break
                loss, correct = compute_loss(config.loss, logits.float(), y)
                loss.backward()
                grads = [p.grad for p in params]
                have = [g is not None for g in grads]
                norms: list[torch.Tensor] = []
                if instrument:
                    gl = [g for g in grads if g is not None]
                    gnorm = torch._foreach_norm(gl) if gl else []
                    it = iter(gnorm)
                    nan = torch.tensor(float("nan"), device=device)
                    norms = [next(it) if h else nan for h in have]
                    wnorm = torch._foreach_norm([p.detach() for p in params])
                    before = [p.detach().clone() for p in params]
                scalars = [loss.detach().float().reshape(())]
                if correct is not None:
                    scalars.append(correct.float())
                if instrument:
                    scalars += [n.float() for n in norms] + [w.float() for w in wnorm]
                vals = torch.stack(scalars).tolist()
                loss_v = vals[0]
                k = 1
                acc = None
                if correct is not None:
                    count = y.numel() if y.dim() else 1
                    if config.loss == "cross_entropy":
                        count = int((y != IGNORE_INDEX).sum()) or 1
                    acc = vals[1] / count
                    k = 2
                run.loss.append(loss_v)
                run.accuracy.append(acc)
                if run.classification:
                    c = run.num_outputs or 1
                    yy = y.reshape(-1).long()
                    yy = yy[(yy >= 0) & (yy < max(c, 2))]
                    bc = torch.bincount(yy, minlength=max(c, 2))
                    label_counts = bc if label_counts is None else label_counts + bc
                    if step >= window_start:
                        lg = logits.detach()
                        lg = lg.movedim(-1, 1) if _class_axis_last(lg, y) else lg
                        pred = lg.argmax(1).reshape(-1) if lg.dim() >= 2 and lg.shape[1] > 1 \
                            else (lg.reshape(-1) > 0).long()
                        pc = torch.bincount(pred, minlength=max(c, 2))
                        pred_counts = pc if pred_counts is None else pred_counts + pc
                if instrument:
                    n = len(params)
                    gvals = vals[k:k + n]
                    wvals = vals[k + n:k + 2 * n]
                    for tr, g, w, h in zip(traces, gvals, wvals, have):
                        tr.grad_norm.append(g if h else float("nan"))
                        tr.weight_norm.append(w)
                        tr.steps_with_grad += int(h)
                    recorder.flush_step()
                    bad_grad = any(h and not math.isfinite(g) for g, h in zip(gvals, have))
                else:
                    bad_grad = False
                run.steps_run = step + 1
                if not math.isfinite(loss_v) or bad_grad:
                    run.stopped = "non-finite"
                    if instrument:
                        if not math.isfinite(loss_v):
                            run.nonfinite = localize_forward(net, x, y, config.loss, step + 1,
                                                             rng, device)
                        else:
                            run.nonfinite = _first_bad_grad(traces, step + 1, recorder.order)
                    else:
                        run.nonfinite = NonFinite(step + 1, "loss" if not math.isfinite(loss_v)
                                                  else "gradient")
                    break
                opt.step()
                if instrument:
                    delta = torch._foreach_sub([p.detach() for p in params], before)
                    dnorm = torch._foreach_norm(delta)
                    dv = torch.stack(dnorm).tolist()
                    for tr, d, w in zip(traces, dv, wvals):
                        scale = max(w, tr.reference_norm)
                        tr.update_ratio.append(d / scale if scale > 0 else
                                               (math.inf if d > 0 else 0.0))
                if task is not None:
                    progress.update(task, advance=1)
    finally:
        if task is not None:
            progress.remove_task(task)
    run.timings["train_s"] = time.perf_counter() - t0
    if label_counts is not None:
        run.label_counts = [int(v) for v in label_counts.tolist()]
    if pred_counts is not None:
        run.pred_counts = [int(v) for v in pred_counts.tolist()]
    if recorder is not None:
        run.activations = recorder.finish()
        order = {name: i for i, name in enumerate(recorder.order)}
        traces.sort(key=lambda t: order.get(t.module, len(order)))
        run.layer_order = list(recorder.order)
    run.params = traces

    do_te = instrument if train_eval is None else train_eval
    if do_te and first_batch is not None and run.stopped not in ("non-finite", "labels",
                                                                 "non-finite-input"):
        t1 = time.perf_counter()

        def settle() -> Iterator[torch.Tensor]:
            for xs, _ in source.batches(SETTLE_BATCHES):
                xs = transform(xs) if transform is not None else xs
                yield xs.to(device, non_blocking=True)

        run.train_eval = train_eval_gap(net, first_batch[0], first_batch[1], config.loss,
                                        settle())
        run.timings["train_eval_s"] = time.perf_counter() - t1
    do_of = instrument if overfit is None else overfit
    if do_of and config.overfit_steps > 0 and first_batch is not None and \
            run.stopped not in ("labels", "non-finite-input"):
        t1 = time.perf_counter()
        run.overfit = overfit_one_batch(model, first_batch[0], first_batch[1], config, device,
                                        progress)
        run.timings["overfit_s"] = time.perf_counter() - t1
    return run


def _first_bad_grad(traces: list[ParamTrace], step: int, order: list[str]) -> NonFinite:
    """The parameter nearest the output (backward runs output -> input) whose gradient is
    non-finite."""
    pos = {n: i for i, n in enumerate(order)}
    bad = [t for t in traces if t.grad_norm and not math.isfinite(t.grad_norm[-1])
           and t.steps_with_grad]
    bad.sort(key=lambda t: -pos.get(t.module, -1))
    first = bad[0] if bad else None
    return NonFinite(step, "gradient", module=first.module if first else None,
                     module_type=first.module_type if first else None,
                     parameter=first.name if first else None,
                     bad_parameters=[t.name for t in bad],
                     detail="the loss was finite but a gradient was not")


# ------------------------------------------------------------------------------ end-of-run checks

def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


SETTLE_BATCHES = 8


def train_eval_gap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str,
                   settle: Iterator[torch.Tensor] | None = None) -> dict[str, Any] | None:
    """Outputs on one batch with BatchNorm in train mode (batch statistics) vs eval mode
    (running statistics); dropout stays off in both. Buffers and momenta are restored.

    First the running statistics are re-estimated for the final weights from a few batches
    (`settle`): layers with momentum > 0 average them (as they would after more training),
    layers with momentum 0 cannot update, which is the point. So the gap measures running
    statistics that cannot follow the data (momentum 0, tiny or unrepresentative batches), not
    the lag behind weights that changed during a short probe."""
    bns = _bn_layers(model)
    if not bns:
        return None
    saved = {n: {k: v.clone() for k, v in m.named_buffers(recurse=False)} for n, m in bns}
    moms = {n: m.momentum for n, m in bns}
    per_layer: dict[str, float] = {}

    def stat_hook(name, m):
        def hook(mod, args):
            t = args[0].detach().float() if args and isinstance(args[0], torch.Tensor) else None
            if t is None or t.dim() < 2:
                return
            dims = [d for d in range(t.dim()) if d != 1]
            mean = t.mean(dim=dims)
            var = t.var(dim=dims, unbiased=False)
            rm, rv = mod.running_mean.float(), mod.running_var.float()
            z = ((mean - rm).abs() / (var + mod.eps).sqrt()).mean()
            r = ((var + mod.eps) / (rv + mod.eps)).log().abs().mean()
            per_layer[name] = float(z + r)
        return hook

    handles = []
    settled = 0
    try:
        with preserved_modes(model), torch.no_grad():
            model.eval()
            if settle is not None:
                for _, m in bns:
                    m.train()
                    if m.momentum != 0:
                        m.reset_running_stats()
                        m.momentum = None  # cumulative average over the settle batches
                for xs in settle:
                    model(xs)
                    settled += 1
                for n, m in bns:
                    m.momentum = moms[n]
                    m.eval()
            out_eval = main_output(model(x))
            for name, m in bns:
                m.train()
                handles.append(m.register_forward_pre_hook(stat_hook(name, m)))
            out_train = main_output(model(x))
    finally:
        for h in handles:
            h.remove()
        for n, m in bns:
            m.momentum = moms[n]
            for k, v in saved[n].items():
                getattr(m, k).copy_(v)
    if out_eval is None or out_train is None:
        return None
    a, b = out_train.float(), out_eval.float()
    gap = float((a - b).norm() / (a.norm() + 1e-12)) if bool(torch.isfinite(a).all()) and \
        bool(torch.isfinite(b).all()) else float("inf")
    res: dict[str, Any] = {"relative_gap": gap, "bn_layers": [n for n, _ in bns],
                           "layer_mismatch": per_layer,
                           "momentum": moms, "settle_batches": settled}
    try:
        lt, ct = compute_loss(loss, a, y)
        le, ce = compute_loss(loss, b, y)
        res.update(loss_train_mode=float(lt), loss_eval_mode=float(le))
        if ct is not None:
            n = y.numel()
            res.update(accuracy_train_mode=float(ct) / n, accuracy_eval_mode=float(ce) / n)
    except Exception:  # the gap itself is what matters
        pass
    return res


def overfit_one_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: ProbeConfig,
                      device: torch.device, progress: Any = None) -> dict[str, Any] | None:
    """Karpathy's check: a fresh copy trained on one small fixed batch with Adam must drive the
    loss far down. Independent of the probe's optimizer and lr, so it tests the model and the
    data/loss wiring, not the hyperparameters."""
    n = min(config.overfit_samples, x.shape[0])
    xb, yb = x[:n], y[:n]
    torch.manual_seed(config.seed)
    net = copy.deepcopy(model).to(device)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.overfit_lr)
    losses: list[float] = []
    acc = None
    task = progress.add_task("overfit one batch", total=config.overfit_steps) \
        if progress is not None else None
    try:
        for _ in range(config.overfit_steps):
            opt.zero_grad(set_to_none=True)
            logits = main_output(net(xb))
            if logits is None:
                return None
            loss, correct = compute_loss(config.loss, logits.float(), yb)
            v = float(loss.detach())
            losses.append(v)
            if correct is not None:
                acc = float(correct) / yb.numel()
            if not math.isfinite(v):
                break
            loss.backward()
            opt.step()
            if task is not None:
                progress.update(task, advance=1)
    finally:
        if task is not None:
            progress.remove_task(task)
    if not losses:
        return None
    best = min((v for v in losses if math.isfinite(v)), default=float("nan"))
    return {"samples": n, "steps": len(losses), "lr": config.overfit_lr, "optimizer": "adam",
            "loss_first": losses[0], "loss_last": losses[-1], "loss_min": best,
            "accuracy": acc, "losses": losses}
