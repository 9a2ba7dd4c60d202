"""What the user's loss functions are fed (ND506 loss-pairing, ND507 loss-broadcast, and the
"every target is ignore_index" NaN).

While watching, the loss functions of `torch.nn.functional` are wrapped (the `nn.*Loss` modules
call them through the module attribute, so `nn.CrossEntropyLoss()` is seen too); the wrappers
call the original with the very same arguments and return its result. Per call they note the
shapes (free), and on sampled calls (the first few per line, and deep steps) whether the input
looks like the wrong kind -- probabilities where logits belong, logits where probabilities
belong -- as device flags resolved at the step's one host sync. A loss that raises (BCELoss fed
logits) is examined on the spot before the exception goes on unchanged. `torch.jit.script` is
wrapped too, so TorchScript compiles torch's own functions, not the wrappers. A loss function
bound before watching began (`from torch.nn.functional import cross_entropy`) is not seen.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from netdoctor.loading.provenance import user_location
from netdoctor.measure.facts import LossCallFacts
from netdoctor.watcher.optimizers import PendingScalars

LOSS_FUNCTIONS = (
    "cross_entropy",
    "nll_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
)
CLASS_LOSSES = ("cross_entropy", "nll_loss")
REGRESSION_LOSSES = ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss")
SAMPLED_CALLS = 3  # every line's first calls are examined, then those of deep steps
RECENT_KEPT = 16
DEFAULT_IGNORE_INDEX = -100


@dataclass(eq=False)  # compared by identity (it holds tensors)
class LossCall:
    """One call since the last step, for the NaN localisation: the target and the loss value
    (small) are held; the input (logits can be large) only weakly, so netdoctor never keeps
    it alive past the user's own references."""

    facts: LossCallFacts
    input_ref: Callable[[], torch.Tensor | None]
    target: torch.Tensor | None
    ignore_index: int | None
    output: torch.Tensor | None = None

    @property
    def input(self) -> torch.Tensor | None:
        return self.input_ref()


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _producer(t: torch.Tensor) -> str | None:
    fn = getattr(t, "grad_fn", None)
    return type(fn).__name__ if fn is not None else None


class LossWatch:
    """Installs the wrappers and keeps the per-line facts (`facts`, keyed by function and
    line) and the calls since the last step (`recent`)."""

    def __init__(
        self,
        pending: PendingScalars,
        sampling: Callable[[], bool],
        guard: Callable[[Callable[[], Any]], Any],
        busy: Callable[[], bool],
        facts: dict[tuple, LossCallFacts],
    ):
        self.pending = pending
        self.sampling = sampling  # whether the coming step is deep
        self.guard = guard  # runs a body, turning an internal error into a note
        self.busy = busy  # netdoctor's own forward (static check, replay): do not record
        self.facts = facts  # the LoopFacts' per-line records, filled here
        self.recent: list[LossCall] = []
        self.outputs: dict[int, str] = {}  # id(loss tensor) -> function, since the last step
        self.label_counts: dict[int, torch.Tensor] = {}  # classes -> bincount over deep calls
        self.accuracy: list[tuple[float, float]] = []  # (correct, counted) per deep step
        self._step_correct: list[torch.Tensor] = []
        self._originals: dict[str, Callable] = {}
        self._script: Callable | None = None  # torch.jit.script, while wrapped
        self.classes: int | None = None

    # -- install ---------------------------------------------------------------------------
    def install(self) -> None:
        for name in LOSS_FUNCTIONS:
            original = getattr(F, name, None)
            if original is None or name in self._originals:
                continue
            self._originals[name] = original
            setattr(F, name, self._wrap(name, original))
        if self._script is None:
            self._script = torch.jit.script
            torch.jit.script = self._script_wrapper(self._script)

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(F, name, original)
        self._originals.clear()
        if self._script is not None:
            torch.jit.script = self._script
            self._script = None

    def _script_wrapper(self, script: Callable) -> Callable:
        """TorchScript compiles the functions a scripted module calls from their source: it
        must see torch's own loss functions, not the wrappers (it scripts recursively: only
        the outermost call swaps them)."""
        watch = self
        depth = [0]

        @functools.wraps(script)
        def scripted(*args, **kwargs):
            kwargs = {**kwargs, "_frames_up": kwargs.get("_frames_up", 0) + 1}  # one frame more
            if depth[0]:
                return script(*args, **kwargs)
            wrappers = {name: getattr(F, name) for name in watch._originals}
            for name, original in watch._originals.items():
                setattr(F, name, original)
            depth[0] += 1
            try:
                return script(*args, **kwargs)
            finally:
                depth[0] -= 1
                for name, wrapper in wrappers.items():
                    if getattr(F, name) is watch._originals.get(name):
                        setattr(F, name, wrapper)

        return scripted

    def _wrap(self, name: str, original: Callable) -> Callable:
        watch = self

        def loss_function(*args, **kwargs):
            if watch.busy():
                return original(*args, **kwargs)
            call = watch.guard(lambda: watch.before(name, args, kwargs))
            try:
                out = original(*args, **kwargs)
            except Exception as error:
                if call is not None:
                    watch.guard(functools.partial(watch.raised, call, error))
                raise
            if call is not None:
                call.output = out if isinstance(out, torch.Tensor) else None
                if call.output is not None:
                    watch.outputs[id(out)] = name
            return out

        loss_function.__wrapped__ = original  # type: ignore[attr-defined]
        loss_function.__name__ = name
        loss_function.__doc__ = original.__doc__
        return loss_function

    # -- per call --------------------------------------------------------------------------
    def before(self, name: str, args: tuple, kwargs: dict) -> LossCall | None:
        x = _arg(args, kwargs, 0, "input")
        y = _arg(args, kwargs, 1, "target")
        if not isinstance(x, torch.Tensor):
            return None
        site = user_location()
        key = (name, site.path if site else None, site.line if site else None)
        facts = self.facts.get(key)
        if facts is None:
            facts = self.facts[key] = LossCallFacts(fn=name, site=site)
        facts.calls += 1
        if facts.input_shape is None:
            facts.input_shape = tuple(x.shape)
            facts.target_shape = tuple(y.shape) if isinstance(y, torch.Tensor) else None
            facts.input_producer = _producer(x)
        ignore = None
        if name in CLASS_LOSSES:
            ignore = int(_arg(args, kwargs, 4, "ignore_index", DEFAULT_IGNORE_INDEX))
            facts.ignore_index = ignore
        call = LossCall(facts, weakref.ref(x), y if isinstance(y, torch.Tensor) else None, ignore)
        self.recent.append(call)
        if len(self.recent) > RECENT_KEPT:
            del self.recent[0]
        if isinstance(y, torch.Tensor) and name in REGRESSION_LOSSES:
            self._broadcast(facts, x, y)
        if facts.checked < SAMPLED_CALLS or self.sampling():
            facts.checked += 1
            self._examine(name, facts, x, call.target, ignore)
        return call

    def _broadcast(self, facts: LossCallFacts, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape == y.shape:
            return
        try:
            shape = torch.broadcast_shapes(x.shape, y.shape)
        except RuntimeError:
            return  # torch raises for these itself
        if math.prod(shape) > max(x.numel(), y.numel()):
            facts.broadcast_calls += 1
            if facts.broadcast_shape is None:
                facts.broadcast_shape = tuple(shape)
                facts.input_shape, facts.target_shape = tuple(x.shape), tuple(y.shape)

    def _examine(
        self,
        name: str,
        facts: LossCallFacts,
        x: torch.Tensor,
        y: torch.Tensor | None,
        ignore: int | None,
    ) -> None:
        """Device flags for the input's kind; no host sync here, and no copy of the input
        (reductions accumulate in float32 themselves)."""
        if not x.is_floating_point() or x.numel() == 0:
            return
        xd = x.detach()
        producer = _producer(x)
        lo, hi = xd.amin(), xd.amax()
        self.pending.add(lo, lambda v: setattr(facts, "input_min", v))
        self.pending.add(hi, lambda v: setattr(facts, "input_max", v))
        true = torch.ones((), dtype=torch.bool, device=xd.device)

        def count(attr: str) -> Callable[[float], None]:
            return lambda v: setattr(facts, attr, getattr(facts, attr) + int(v > 0.5))

        if name in CLASS_LOSSES:
            dim = 1 if xd.dim() >= 2 else 0
            if xd.shape[dim] < 2:
                return
            sums = xd.sum(dim, dtype=torch.float32)
            probs = (
                true
                if producer == "SoftmaxBackward0"
                else (lo >= 0) & (hi <= 1) & ((sums - 1).abs().amax() < 1e-2)
            )
            self.pending.add(probs, count("probabilities"))
            if name == "nll_loss":
                lse = (
                    torch.logsumexp(
                        xd.float() if xd.dtype in (torch.float16, torch.bfloat16) else xd, dim
                    )
                    .abs()
                    .amax()
                )
                self.pending.add((lse > 1e-2) & ~probs, count("not_log_probs"))
            if y is not None and not y.is_floating_point():
                self._classification(xd, y, dim, ignore)
        elif name == "binary_cross_entropy_with_logits":
            inside = (
                true
                if producer == "SigmoidBackward0"
                else ((lo > 0) & (hi < 1) if xd.numel() >= 8 else ~true)
            )
            self.pending.add(inside, count("probabilities"))
        elif name == "binary_cross_entropy":
            self.pending.add((lo < 0) | (hi > 1), count("out_of_range"))

    def _classification(
        self, logits: torch.Tensor, y: torch.Tensor, dim: int, ignore: int | None
    ) -> None:
        """Accuracy and label counts of a class-index loss on sampled calls (the ND407
        "accuracy at chance" test reads them)."""
        c = logits.shape[dim]
        if tuple(y.shape) != tuple(logits.shape[:dim]) + tuple(logits.shape[dim + 1 :]):
            return
        keep = y != ignore if ignore is not None else torch.ones_like(y, dtype=torch.bool)
        pred = logits.argmax(dim)
        self._step_correct.append(((pred == y) & keep).sum())
        self._step_correct.append(keep.sum())
        labels = y[keep & (y >= 0) & (y < c)].reshape(-1).long()
        counts = torch.bincount(labels, minlength=c)
        prev = self.label_counts.get(c)
        self.label_counts[c] = counts if prev is None else prev + counts.to(prev.device)
        self.classes = c

    def raised(self, call: LossCall, error: BaseException) -> None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        call.facts.raised = f"{type(error).__name__}: {first}"
        x = call.input
        if call.facts.fn == "binary_cross_entropy" and x is not None and x.is_floating_point():
            xf = x.detach().float()
            call.facts.input_min, call.facts.input_max = float(xf.min()), float(xf.max())
            if call.facts.input_min < 0 or call.facts.input_max > 1:
                call.facts.out_of_range += 1
                call.facts.checked += 1

    # -- per step ------------------------------------------------------------------------
    def step_accuracy(self) -> list[torch.Tensor]:
        """The (correct, counted) device scalars of this step's sampled class losses."""
        out, self._step_correct = self._step_correct, []
        return out

    def end_step(self) -> None:
        self.recent.clear()
        self.outputs.clear()

    def all_ignored(self, call: LossCall) -> bool:
        if call.target is None or call.ignore_index is None or call.target.is_floating_point():
            return False
        return bool((call.target == call.ignore_index).all())
