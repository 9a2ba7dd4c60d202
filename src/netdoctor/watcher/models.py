"""One model of the user's training, as the watcher follows it.

Two hooks on the root module, nothing on its children between measured steps:

* a forward pre-hook (with kwargs, prepended so it runs first) that keeps what a replay of this
  forward needs (references to the arguments, the random state), notes which Dropout/BatchNorm
  modules are in eval mode, and -- on a deep step -- attaches the shared
  `measure.activations.ActivationRecorder` and pushes its activation mode;
* a forward hook registered with `always_call=True` that pops the mode and detaches the
  recorder, so an exception in the user's forward never leaves either behind.

The doctor decides which steps are deep; this module only carries them out.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netdoctor.loading.forward import tensors_in
from netdoctor.measure.activations import ActivationRecorder
from netdoctor.measure.facts import ModelFacts
from netdoctor.measure.params import is_sharded
from netdoctor.watcher.optimizers import WatchedOptimizer

_DROPOUT = (nn.modules.dropout._DropoutNd,)
_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)
REPLAYS_KEPT = 8  # forwards kept for a replay between two steps (gradient accumulation)


@dataclass(eq=False)  # compared by identity (it holds tensors)
class ForwardCall:
    """What a replay of one forward needs (references only: nothing is copied but the random
    state)."""

    args: tuple
    kwargs: dict[str, Any]
    rng: tuple
    autocast: tuple | None  # (device type, dtype) when the forward ran under autocast
    index: int  # the model's forward counter


def is_compiled(module: nn.Module) -> bool:
    """torch.compile(module) (an OptimizedModule wrapper) or module.compile() (in place)."""
    wrapped = type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")
    return wrapped or getattr(module, "_compiled_call_impl", None) is not None


class WatchedModel:
    def __init__(self, model: nn.Module, facts: ModelFacts, sites: dict, on_pre, on_post):
        self.ref = weakref.ref(model)
        self.facts = facts
        self.sites = sites
        self.compiled = is_compiled(model)
        facts.compiled = self.compiled
        self.recorder: ActivationRecorder | None = (
            None if self.compiled else ActivationRecorder(model, sites)
        )
        if self.recorder is not None:
            self.recorder.in_window = True
        # Hooks on an OptimizedModule wrapper run outside the compiled code; a module compiled
        # in place would trace them into its graph: it gets none.
        in_place = self.compiled and not hasattr(model, "_orig_mod")
        self.handles = (
            []
            if in_place
            else [
                model.register_forward_pre_hook(on_pre, with_kwargs=True, prepend=True),
                model.register_forward_hook(on_post, always_call=True),
            ]
        )
        self.forwards = 0
        self.multi_input = False
        self.calls: list[ForwardCall] = []  # since the last step of its optimizer(s)
        self.measuring = False
        self.measured_step: int | None = None
        self.owner: WatchedOptimizer | None = None  # the one holding most of its parameters
        self.optimizers: list[WatchedOptimizer] = []
        self.mode_modules: list[tuple[str, nn.Module]] = []
        self.last_eval: dict[str, str] = {}  # eval-mode modules of its latest forward
        self.backwarded = 0  # its forward counter at the latest backward
        self.eval_seen: dict[str, str] = {}  # eval-mode modules in forwards that backward used
        self.trained_forwards = 0  # such forwards since the last step
        self.params_by_id: dict[int, tuple[str, nn.Parameter]] = {}
        # the autograd nodes of its latest output, held over the first steps only (until its
        # optimizer steps), to see whether another watched model's input comes from it
        self.output_nodes: list[Any] = []
        self.refresh_params()

    @property
    def model(self) -> nn.Module | None:
        return self.ref()

    @property
    def communicates(self) -> bool:
        """Its forward talks to the other ranks (FSDP2/DTensor parameters are all-gathered,
        SyncBatchNorm all-reduces its statistics): netdoctor never runs it on one rank alone
        (no replay, no static trace), which would wait for ranks that never join."""
        model = self.model
        if model is None:
            return False
        return any(is_sharded(p) for p in model.parameters()) or any(
            isinstance(m, nn.SyncBatchNorm) for m in model.modules()
        )

    def refresh_params(self) -> None:
        model = self.model
        if model is None:
            return
        self.params_by_id = {id(p): (n, p) for n, p in model.named_parameters()}

    def set_optimized(self, optimized_ids: set[int]) -> None:
        """Which Dropout/BatchNorm modules belong to a part that trains (their own or their
        parent's parameters are optimized): those are the ones ND504 watches. A frozen
        backbone kept in eval mode on purpose is left alone."""
        model = self.model
        if model is None:
            return
        modules = dict(model.named_modules())
        out: list[tuple[str, nn.Module]] = []
        for name, m in modules.items():
            if isinstance(m, _DROPOUT) and getattr(m, "p", 0) == 0:
                continue
            if not isinstance(m, _DROPOUT + _BATCHNORM):
                continue
            parent = modules.get(name.rpartition(".")[0], model)
            owners = list(m.parameters(recurse=False)) + list(parent.parameters(recurse=False))
            if not owners:  # e.g. a Dropout directly in a Sequential: look at its siblings
                owners = list(parent.parameters())
            if any(id(p) in optimized_ids and p.requires_grad for p in owners):
                out.append((name, m))
        self.mode_modules = out
        self.facts.optimized = sum(
            1 for p in model.parameters() if p.requires_grad and id(p) in optimized_ids
        )

    def record_call(
        self, args: tuple, kwargs: dict, rng: tuple, autocast: tuple | None = None
    ) -> None:
        self.forwards += 1
        self.calls.append(ForwardCall(args, dict(kwargs), rng, autocast, self.forwards))
        if len(self.calls) > REPLAYS_KEPT:
            del self.calls[0]
        if self.facts.input_shape is None:
            found = tensors_in(args) or tensors_in(kwargs)
            if found:
                t = found[0]
                self.facts.input_shape = tuple(t.shape[1:])
                self.facts.input_dtype = (
                    "long" if not t.is_floating_point() else str(t.dtype).replace("torch.", "")
                )
                self.multi_input = len(tensors_in((args, kwargs))) > 1

    def keep_outputs(self, out: Any) -> None:
        if torch.is_grad_enabled():
            self.output_nodes = [t.grad_fn for t in tensors_in(out) if t.grad_fn is not None][:8]

    def note_modes(self) -> None:
        """The eval-mode Dropout/BatchNorm modules of this forward (counted only if a
        backward follows: a validation forward that forgot no_grad() is no training step)."""
        self.last_eval = {name: type(m).__name__ for name, m in self.mode_modules if not m.training}

    def note_backward(self) -> None:
        if self.forwards > self.backwarded:
            self.backwarded = self.forwards
            self.trained_forwards += 1
            self.eval_seen.update(self.last_eval)

    def take_step_facts(self) -> tuple[dict[str, str], int]:
        """(eval-mode modules seen in training forwards, number of such forwards) since the
        last step; resets both."""
        seen, n = self.eval_seen, self.trained_forwards
        self.eval_seen, self.trained_forwards = {}, 0
        return seen, n

    # -- deep measurement -----------------------------------------------------------------
    def begin_measure(self, step: int) -> None:
        rec = self.recorder
        if rec is None or self.measuring:
            return
        self.detach_recorder()
        if self.measured_step != step:
            rec.discard_pending()  # left over from a forward whose step never came
            rec.refresh()
            self.measured_step = step
        rec.attach()
        rec.enter("")
        rec.begin_forward()
        self.measuring = True

    def end_measure(self) -> None:
        """Pop the activation mode. The recorder's hooks stay until `detach_recorder()`:
        this runs inside the root's forward hook, and when the forward raised, torch is still
        iterating the module's hook table (removing a hook there would replace the user's
        exception with a RuntimeError)."""
        rec = self.recorder
        if rec is None or not self.measuring:
            return
        self.measuring = False
        rec.end_forward()

    def detach_recorder(self) -> None:
        """Remove the recorder's per-module hooks (outside any forward)."""
        if self.recorder is not None and not self.measuring:
            self.recorder.detach()

    def close(self) -> None:
        self.end_measure()
        self.detach_recorder()
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.calls.clear()
        self.output_nodes = []
