"""Which models and optimizers the doctor watches: found, named, associated, and followed from
step to step.

* Models: given (`add_model`), or discovered -- a module called at the top level with gradients
  enabled while the global discovery hooks are on (`attach.Attachment.discovery`), limited to a
  trainer's module and named by their path in it with `scope`. A DDP wrapper is watched through
  the module inside it (its wrapper is tracked for ND508, `replicas`); a part of a watched model
  is not a model of its own, and a part watched before the whole was seen gives way to it. Each
  model's two root hooks (`models.WatchedModel`) keep what a replay needs and tell the parts
  (`events.ForwardStart` / `ForwardEnd`).
* Optimizers: given (`add_optimizer`), or discovered at their first step; which optimizer trains
  which model (the one holding most of its parameters is its owner).
* Which watched model feeds which (an encoder feeding a head, a generator its discriminator),
  learnt over the first steps from a few autograd nodes of each model's output.
* The discovery hooks cost a Python call per module call: switched off once every optimizer's
  parameters belong to a watched model (after `DISCOVERY_STEPS`, at most `DISCOVERY_GIVE_UP`).
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from netdoctor.findings import Location
from netdoctor.loading.forward import tensors_in
from netdoctor.loading.provenance import Provenance, assignment_site, class_location
from netdoctor.measure.facts import LoopFacts, ModelFacts, OptimizerFacts
from netdoctor.measure.nonfinite import rng_state
from netdoctor.watcher.attach import Attachment
from netdoctor.watcher.events import Dispatcher, ForwardEnd, ForwardStart, Part, StepEnd
from netdoctor.watcher.models import WatchedModel
from netdoctor.watcher.optimizers import WatchedOptimizer
from netdoctor.watcher.replicas import Replicas, is_ddp
from netdoctor.watcher.services import Guard

DISCOVERY_STEPS = 2  # top-level forwards are watched for new models at least this long
DISCOVERY_GIVE_UP = 8  # ... and at most this long when some parameters stay unaccounted for
FEED_STEPS = 8  # which watched model feeds which is learnt over the first steps
FEED_SEARCH = 64  # autograd nodes walked back from a forward's inputs to find another model
_HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


class Registry(Part):
    """The watched models and optimizers (see the module docstring). `parts` hears of every
    watched forward."""

    def __init__(
        self,
        facts: LoopFacts,
        provenance: Provenance,
        attachment: Attachment,
        parts: Dispatcher,
        guard: Guard,
        *,
        discover_models: bool,
        discover_optimizers: bool,
        scope: nn.Module | None,
    ):
        self.facts = facts
        self.provenance = provenance
        self.discover_models = discover_models
        self.discover_optimizers = discover_optimizers
        self.models: list[WatchedModel] = []
        self.optimizers: list[WatchedOptimizer] = []
        self.primary: WatchedOptimizer | None = None  # the first that stepped: the training step
        self.replicas = Replicas()  # DDP wrappers: what ND508 compares across ranks
        self._attachment = attachment
        self._parts = parts
        self._guard = guard
        self._scope = weakref.ref(scope) if scope is not None else None
        self._model_by_id: dict[int, WatchedModel] = {}
        self._opt_by_id: dict[int, WatchedOptimizer] = {}
        self._allowed_optimizers: set[int] = set()
        self._ignored_roots: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._depth = 0  # top-level forward nesting seen by the discovery hooks
        # called as a watched model's forward begins, before anything of it is recorded (the
        # end of a manual update's step: `manual.ManualSteps.before_next`)
        self.before_forward: Callable[[], None] = lambda: None

    # -- public ----------------------------------------------------------------------------
    def add_model(
        self, model: nn.Module, name: str | None = None, site: Location | None = None
    ) -> WatchedModel | None:
        """Watch `model` (a DDP wrapper: the module inside); None when it is a part of a
        watched model."""
        if id(model) in self._model_by_id:
            return self._model_by_id[id(model)]
        if is_ddp(model):  # watch the module inside: replays and static checks must not run
            # DDP's collectives on one rank only, and the report names the user's model
            self.replicas.track(model, self.provenance.site(model))
            self._ignored_roots.add(model)
            return self.add_model(cast(nn.Module, model.module), name, site)
        ids = {id(p) for p in model.parameters()}
        for other in list(self.models):
            other_ids = set(other.params_by_id)
            if ids and ids <= other_ids:
                self._ignored_roots.add(model)  # a part of a watched model
                return None
            if other_ids and other_ids < ids:  # a part watched before the whole was seen
                other.close()
                self.models.remove(other)
                self._model_by_id.pop(id(other.model), None)
                self.facts.models.remove(other.facts)
        inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: name the model
        label = _label(name or type(inner).__name__, [m.facts.label for m in self.models])
        site = self.provenance.site(inner) or site or class_location(type(inner))
        facts = ModelFacts(label=label, class_name=type(inner).__name__, site=site)
        sites = {}
        for qual, mod in model.named_modules():
            # built while recording (netdoctor run), else the user's `self.<name> = ...` line
            loc = self.provenance.site(mod) or (assignment_site(model, qual) if qual else None)
            if loc is not None:
                sites[qual] = loc
        if "" not in sites and site is not None:
            sites[""] = site
        wm = WatchedModel(model, facts, sites, self._model_pre, self._model_post)
        if wm.compiled:
            self._guard.notes.append(
                f"{label} is compiled with torch.compile: not instrumented (its "
                "loop facts are watched; per-layer measurements and static rules "
                "are skipped)"
            )
        self.models.append(wm)
        self._model_by_id[id(model)] = wm
        self.facts.models.append(facts)
        self._associate()
        return wm

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch `optimizer` (with `discover_optimizers` off: it is one of the only ones)."""
        if not self.discover_optimizers:
            self._allowed_optimizers.add(id(optimizer))
        self._optimizer(optimizer, create=True)

    def add_manual(
        self, optimizer: torch.optim.Optimizer, name: str, model_name: str | None
    ) -> WatchedOptimizer | None:
        """Watch the stand-in optimizer of a loop that updates the weights by hand
        (`manual.ManualUpdate`), named `name` in reports."""
        if not self.discover_optimizers:
            self._allowed_optimizers.add(id(optimizer))
        wo = self._optimizer(optimizer, create=True, name=name)
        if wo is not None:
            wo.facts.manual = True
            wo.facts.model_name = model_name
        return wo

    def label_of(self, module: nn.Module) -> str:
        wm = self._model_by_id.get(id(module))
        return wm.facts.label if wm is not None else type(module).__name__

    def track_ddp(self, ddp: nn.Module, site: Location | None) -> None:
        """A DistributedDataParallel was built (its line is where ND508 points when no bypass
        is found)."""
        self.replicas.track(ddp, site)

    def without_our_hooks(self, state: dict[str, Any]) -> dict[str, Any]:
        """A module's pickling/copying state without the hooks netdoctor registered on it."""
        try:
            ours = {h.id for wm in self.models for h in wm.handles}
            ours |= {
                h.id for wm in self.models if wm.recorder is not None for h in wm.recorder.handles
            }
            ours |= self.replicas.hook_ids()
            keys = [
                k for k in _HOOK_TABLES if isinstance(state.get(k), dict) and ours & set(state[k])
            ]
            if not keys:
                return state
            state = dict(state)
            for k in keys:
                state[k] = type(state[k])(
                    (hid, v) for hid, v in state[k].items() if hid not in ours
                )
            return state
        except Exception:
            return state

    def next_step(self) -> int:
        """The training step coming next (the first optimizer's)."""
        return (self.primary.facts.steps if self.primary is not None else 0) + 1

    def close(self) -> None:
        """Every root hook and DDP wrapper hook removed."""
        try:
            for m in self.models:
                m.close()
        finally:
            self.replicas.close()

    # -- optimizer steps -------------------------------------------------------------------
    def begin_step(self, opt: torch.optim.Optimizer) -> WatchedOptimizer | None:
        """A step of `opt` begins: its watched optimizer (found, or created when it is one to
        watch), with the step counted. None when it is not watched."""
        wo = self._optimizer(opt)
        if wo is None:
            return None
        if wo.refresh():
            self._associate()
        f = wo.facts
        step = f.steps = f.steps + 1
        wo.in_step = True
        self._depth = 0  # no forward runs across an optimizer step (resynchronise)
        if self.primary is None:
            self.primary = wo
        if wo is self.primary:
            self.facts.iterations = step
        return wo

    def watched(self, opt: torch.optim.Optimizer) -> WatchedOptimizer | None:
        """`opt`'s watched optimizer (found, or created when it is one to watch), without
        counting a step: a GradScaler's skipped step, which runs no optimizer step."""
        wo = self._optimizer(opt)
        if wo is not None:
            if wo.refresh():
                self._associate()
            wo.lrs()  # remembered for the report: a skipped step records no lr
        return wo

    def forget_calls(self, wo: WatchedOptimizer | None) -> None:
        """A skipped step is over: the forwards recorded for its replay are dropped, as after a
        step."""
        for wm in self.models:
            if wo is None or wo in wm.optimizers:
                wm.calls.clear()
                wm.output_nodes = []

    def end_step(self, opt: torch.optim.Optimizer) -> WatchedOptimizer | None:
        """The step of `opt` returned: its watched optimizer, when the step was one `begin_step`
        counted."""
        wo = self._opt_by_id.get(id(opt))
        if wo is None or not wo.in_step:
            return None
        wo.in_step = False
        return wo

    def on_step_end(self, event: StepEnd) -> None:
        wo = event.optimizer
        for wm in self.models:
            if wo in wm.optimizers:
                wm.calls.clear()
                wm.output_nodes = []
            elif self.facts.iterations >= FEED_STEPS:
                wm.output_nodes = []
        primary = self.primary
        if (
            self._attachment.discovering
            and primary is not None
            and (
                primary.facts.steps >= DISCOVERY_GIVE_UP
                or (primary.facts.steps >= DISCOVERY_STEPS and self._covered())
            )
        ):
            self._attachment.discovery(False)

    def _optimizer(
        self, opt: torch.optim.Optimizer, create: bool = False, name: str | None = None
    ) -> WatchedOptimizer | None:
        wo = self._opt_by_id.get(id(opt))
        if wo is not None and wo.optimizer is opt:
            return wo
        if not create:
            if self._allowed_optimizers and id(opt) not in self._allowed_optimizers:
                return None
            if not self._allowed_optimizers and not self.discover_optimizers:
                return None
            if not self.discover_models and not self._allowed_optimizers:
                # watch(model) without an optimizer: the ones that train the model
                params = {id(p) for g in opt.param_groups for p in g["params"]}
                if not any(params & set(m.params_by_id) for m in self.models):
                    return None
        name = name or type(opt).__name__
        label = _label(name, [o.facts.label for o in self.optimizers])
        facts = OptimizerFacts(
            index=len(self.optimizers), name=name, label=label, site=self.provenance.site(opt)
        )
        wo = WatchedOptimizer(opt, facts)
        wo.refresh()
        self.optimizers.append(wo)
        self._opt_by_id[id(opt)] = wo
        self.facts.optimizers.append(facts)
        self._associate()
        if self.discover_models and not self._covered():
            self._attachment.discovery(True)
        return wo

    def _associate(self) -> None:
        """Which optimizer trains which model (after a new model, optimizer or param group)."""
        optimized: set[int] = set()
        for wo in self.optimizers:
            optimized |= {id(p) for p in wo.trainable}
        for wm in self.models:
            wm.set_optimized(optimized)
            counts = []
            for wo in self.optimizers:
                n = sum(1 for p in wo.trainable if id(p) in wm.params_by_id)
                if n:
                    counts.append((n, wo))
            wm.optimizers = [wo for _, wo in counts]
            wm.owner = max(counts, key=lambda c: c[0])[1] if counts else None
        for wo in self.optimizers:
            wo.facts.models = [wm.facts.label for wm in self.models if wo in wm.optimizers]
            wo.meter_signature = ()  # rebuilt on the next deep step

    def _covered(self) -> bool:
        """Every trainable parameter of every optimizer belongs to a watched model."""
        known: set[int] = set()
        for wm in self.models:
            known |= set(wm.params_by_id)
        return all(id(p) in known for wo in self.optimizers for p in wo.trainable)

    # -- discovery: the global forward hooks ------------------------------------------------
    def on_global_forward_pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._depth += 1
        if self._depth != 1 or self._guard.busy or not torch.is_grad_enabled():
            return
        if id(module) in self._model_by_id or module in self._ignored_roots:
            return
        if not any(p.requires_grad for p in module.parameters()):
            self._ignored_roots.add(module)
            return
        name: str | None = None
        site: Location | None = None
        if self._scope is not None:
            scoped = self._scoped(module)
            if scoped is None:  # outside the trainer's module
                self._ignored_roots.add(module)
                return
            name, site = scoped
        wm = self.add_model(module, name, site)
        if wm is not None and wm.model is module:  # its own hooks start with the next call:
            self._model_pre(module, args, {})  # run this one by hand (a DDP wrapper's inner
            # module is called later in this forward: its hooks see it)

    def on_global_forward_post(self, module: nn.Module) -> None:
        self._depth = max(0, self._depth - 1)

    def _scoped(self, module: nn.Module) -> tuple[str, Location | None] | None:
        """(`Scope` or `Scope.path.to.part`, where the scope's code assigns it) for a part of
        the scope module; None outside it."""
        scope = self._scope() if self._scope is not None else None
        if scope is None:
            return None
        for path, m in scope.named_modules():
            if m is module:
                return (
                    type(scope).__name__ + (f".{path}" if path else ""),
                    assignment_site(scope, path) if path else None,
                )
        return None

    # -- the root hooks of each watched model -----------------------------------------------
    def _model_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        def body() -> None:
            if self._guard.busy or not torch.is_grad_enabled():
                return
            wm = self._model_by_id.get(id(module))
            if wm is None:
                return
            self.before_forward()
            device = _device_of(module)
            wm.record_call(args, kwargs, rng_state(device), _autocast_state(device))
            self._parts.on_forward_start(ForwardStart(wm, module, args, kwargs))

        self._guard.run(body)

    def _model_post(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        wm = self._model_by_id.get(id(module))
        if wm is not None:
            self._parts.on_forward_end(ForwardEnd(wm, out))

    def on_forward_start(self, event: ForwardStart) -> None:
        if self.facts.iterations < FEED_STEPS and len(self.models) > 1:
            self._note_feeds(event.model, event.args, event.kwargs)

    def on_forward_end(self, event: ForwardEnd) -> None:
        if self.facts.iterations < FEED_STEPS and not self._guard.busy:
            wm, out = event.model, event.output
            self._guard.run(lambda: wm.keep_outputs(out))

    def _note_feeds(self, wm: WatchedModel, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Which other watched models this forward's inputs come from (a few autograd nodes
        back): those are parts of a larger network -- an encoder feeding a head, a generator
        feeding its discriminator -- whose output is not the prediction (`ModelFacts.feeds`)."""
        targets = {
            id(node): other
            for other in self.models
            if other is not wm
            for node in other.output_nodes
        }
        if not targets:
            return
        frontier = deque(t.grad_fn for t in tensors_in((args, kwargs)) if t.grad_fn is not None)
        seen: set[int] = set()
        while frontier and len(seen) < FEED_SEARCH:
            node = frontier.popleft()
            if id(node) in seen:
                continue
            seen.add(id(node))
            other = targets.get(id(node))
            if other is not None:
                if wm.facts.label not in other.facts.feeds:
                    other.facts.feeds.append(wm.facts.label)
                continue
            frontier.extend(n for n, _ in node.next_functions if n is not None)


def _label(base: str, taken: list[str]) -> str:
    if base not in taken:
        return base
    k = 2
    while f"{base}#{k}" in taken:
        k += 1
    return f"{base}#{k}"


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _autocast_state(device: torch.device) -> tuple[str, torch.dtype] | None:
    kind = device.type
    try:
        if torch.is_autocast_enabled(kind):
            return kind, torch.get_autocast_dtype(kind)
    except (TypeError, RuntimeError):
        return None
    return None
