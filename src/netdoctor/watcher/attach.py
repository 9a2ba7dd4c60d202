"""Attaching to the user's training from outside: torch's global hooks and a few reversible
wrappers, each installed by `Attachment.install()` and removed by `remove()` (in reverse order,
every one in its own `finally`, so a failure to remove one never leaves the others behind).

* optimizer steps: `torch.optim.optimizer.register_optimizer_step_pre_hook` / `_post_hook`
  (every `Optimizer` subclass, the user's own included, runs them); a step given a closure
  (LBFGS, Lightning's automatic optimization) is measured when the closure's first call returns,
  since forward and backward run inside it;
* model discovery (`netdoctor run`, `watch()` without a model): global module forward
  pre/post hooks that notice a module called at the top level with gradients enabled. They
  cost a Python call per module call, so they are switched off once every optimizer's
  parameters belong to a watched model (`discovery(False)`), and on again for a new optimizer;
* the loss: `torch.autograd.backward` (which `Tensor.backward` calls) is wrapped, so the tensor
  backward ran on is seen, and whether the gradients were cleared since the last step;
* `nn.Module.train` (where a model was put in eval mode, for ND504's fix) and the lr
  schedulers' `step` (where the scheduler is stepped, for ND505's fix): wrapped, recording the
  user's line only; `GradScaler.scale`: wrapped, so the loss is recorded unscaled, and
  `GradScaler.step` / `unscale_` / `update` with `clip_grad_norm_` / `clip_grad_value_`: wrapped,
  so a step the scaler skipped, the user's `unscale_` calls, the scale after each update and a
  clip of still-scaled gradients are seen (`watcher.amp`);
  `nn.Module.__getstate__` (and the overrides that skip it: `nn.RNNBase`'s, DDP's): wrapped,
  so a copy of a watched model (`copy.deepcopy` for an EMA model, `torch.save(model)`)
  carries none of netdoctor's hooks (nor the doctor behind them);
  `DistributedDataParallel.__init__`: wrapped, recording each DDP wrapper and its line (ND508
  compares the parameters it replicates across ranks and notices a forward that bypasses it);
* the loss functions: `netdoctor.watcher.losses.LossWatch`.

Every wrapper calls the original with the same arguments and returns its result; what netdoctor
does around it runs in the doctor's guard (an internal error becomes a note, never an exception
in the user's loop).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.optim.lr_scheduler as lr_scheduler
from torch import nn
from torch.amp.grad_scaler import GradScaler
from torch.nn.modules import module as module_hooks
from torch.optim import optimizer as optimizer_hooks

from netdoctor.watcher.replicas import ddp_class


class Hooked(Protocol):
    """What the attachment calls: the raw torch-level events, as torch's hooks and the
    wrappers see them (`doctor.Doctor` turns them into the typed events of `events`)."""

    def on_step_pre(
        self, opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None: ...

    def on_step_post(self, opt: torch.optim.Optimizer) -> None: ...

    def on_global_forward_pre(self, module: nn.Module, args: tuple[Any, ...]) -> None: ...

    def on_global_forward_post(self, module: nn.Module) -> None: ...

    def on_backward(self, tensors: Any) -> None: ...

    def after_backward(self) -> None: ...

    def on_train_mode(self, module: nn.Module, mode: bool) -> None: ...

    def on_scheduler_step(self, scheduler: Any) -> None: ...

    def on_loss_scaled(self, scaler: GradScaler, outputs: Any, scaled: Any) -> None: ...

    def before_scaler_step(self, scaler: GradScaler, optimizer: Any) -> int: ...

    def after_scaler_step(self, scaler: GradScaler, optimizer: Any, before: int) -> None: ...

    def on_unscale(self, scaler: GradScaler, optimizer: Any) -> None: ...

    def on_scaler_update(self, scaler: GradScaler) -> None: ...

    def on_clip(self, kind: str, parameters: list[Any], limit: Any, result: Any) -> None: ...

    def without_our_hooks(self, state: dict[str, Any]) -> dict[str, Any]: ...

    def on_ddp_wrapped(self, ddp: nn.Module) -> None: ...


class Attachment:
    """The global hooks and wrappers of one doctor, which receives their events (`Hooked`)."""

    def __init__(self, doctor: Hooked):
        self.doctor = doctor
        self._undo: list[Callable[[], None]] = []
        self._discovery: list[Any] = []
        self._in_scaler_step: list[bool] = []  # GradScaler.step runs (its own unscale_ call)

    # -- install / remove ----------------------------------------------------------------
    def install(self, discover_models: bool) -> None:
        d = self.doctor
        pre = optimizer_hooks.register_optimizer_step_pre_hook(d.on_step_pre)
        self._undo.append(pre.remove)
        post = optimizer_hooks.register_optimizer_step_post_hook(
            lambda opt, args, kwargs: d.on_step_post(opt)
        )
        self._undo.append(post.remove)
        self._wrap(torch.autograd, "backward", self._backward_wrapper)
        self._wrap(nn.Module, "train", self._train_wrapper)
        for cls in _getstate_classes():
            self._wrap(cls, "__getstate__", self._getstate_wrapper)
        for cls in _scheduler_classes():
            self._wrap(cls, "step", self._scheduler_wrapper)
        self._wrap(GradScaler, "scale", self._scale_wrapper)
        self._wrap(GradScaler, "step", self._scaler_step_wrapper)
        self._wrap(GradScaler, "unscale_", self._unscale_wrapper)
        self._wrap(GradScaler, "update", self._scaler_update_wrapper)
        for module in _clip_modules():
            self._wrap(module, "clip_grad_norm_", self._clip_wrapper("norm"))
            self._wrap(module, "clip_grad_value_", self._clip_wrapper("value"))
        ddp = ddp_class()
        if ddp is not None:
            self._wrap(ddp, "__init__", self._ddp_init_wrapper)
        if discover_models:
            self.discovery(True)

    def remove(self) -> None:
        self.discovery(False)
        undo, self._undo = self._undo, []
        errors = []
        for fn in reversed(undo):
            try:
                fn()
            except Exception as e:  # keep removing the rest
                errors.append(e)
        if errors:
            raise errors[0]

    def discovery(self, on: bool) -> None:
        """Switch the global module hooks that find models called at the top level."""
        if on and not self._discovery:
            d = self.doctor
            self._discovery = [
                module_hooks.register_module_forward_pre_hook(
                    lambda m, args: d.on_global_forward_pre(m, args)
                ),
                module_hooks.register_module_forward_hook(
                    lambda m, args, out: d.on_global_forward_post(m), always_call=True
                ),
            ]
        elif not on and self._discovery:
            for h in self._discovery:
                h.remove()
            self._discovery = []

    @property
    def discovering(self) -> bool:
        return bool(self._discovery)

    def _wrap(self, owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        wrapper = make(original)
        setattr(owner, name, wrapper)
        self._undo.append(lambda: setattr(owner, name, original))

    # -- wrappers ------------------------------------------------------------------------
    def _backward_wrapper(self, original: Callable) -> Callable:
        d = self.doctor

        @functools.wraps(original)
        def backward(tensors, *args, **kwargs):
            d.on_backward(tensors)
            result = original(tensors, *args, **kwargs)
            d.after_backward()
            return result

        return backward

    def _train_wrapper(self, original: Callable) -> Callable:
        d = self.doctor
        depth = [0]  # Module.train recurses into the children: only the outer call is the user's

        @functools.wraps(original)
        def train(self_module, mode: bool = True):
            if depth[0] == 0:
                d.on_train_mode(self_module, mode)
            depth[0] += 1
            try:
                return original(self_module, mode)
            finally:
                depth[0] -= 1

        return train

    def _getstate_wrapper(self, original: Callable) -> Callable:
        d = self.doctor

        @functools.wraps(original)
        def __getstate__(self_module):  # noqa: N807 - mirrors nn.Module
            return d.without_our_hooks(original(self_module))

        return __getstate__

    def _scale_wrapper(self, original: Callable) -> Callable:
        d = self.doctor

        @functools.wraps(original)
        def scale(self_scaler, outputs):
            scaled = original(self_scaler, outputs)
            d.on_loss_scaled(self_scaler, outputs, scaled)
            return scaled

        return scale

    def _scaler_step_wrapper(self, original: Callable) -> Callable:
        d = self.doctor
        inside = self._in_scaler_step

        @functools.wraps(original)
        def step(self_scaler, optimizer, *args, **kwargs):
            before = d.before_scaler_step(self_scaler, optimizer)
            inside.append(True)
            try:
                result = original(self_scaler, optimizer, *args, **kwargs)
            finally:
                inside.pop()
            d.after_scaler_step(self_scaler, optimizer, before)
            return result

        return step

    def _unscale_wrapper(self, original: Callable) -> Callable:
        d = self.doctor
        inside = self._in_scaler_step

        @functools.wraps(original)
        def unscale_(self_scaler, optimizer):
            result = original(self_scaler, optimizer)
            if not inside:  # the user's own call, not the one step() makes
                d.on_unscale(self_scaler, optimizer)
            return result

        return unscale_

    def _scaler_update_wrapper(self, original: Callable) -> Callable:
        d = self.doctor

        @functools.wraps(original)
        def update(self_scaler, *args, **kwargs):
            result = original(self_scaler, *args, **kwargs)
            d.on_scaler_update(self_scaler)
            return result

        return update

    def _clip_wrapper(self, kind: str) -> Callable[[Callable], Callable]:
        """clip_grad_norm_(parameters, max_norm, ...) / clip_grad_value_(parameters, clip_value):
        the parameters (an iterable, perhaps a generator: listed once, then passed on), the
        limit, and what the call returned (the total norm before clipping)."""
        d = self.doctor

        def make(original: Callable) -> Callable:
            @functools.wraps(original)
            def clip(parameters, *args, **kwargs):
                params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
                result = original(params, *args, **kwargs)
                limit = args[0] if args else kwargs.get("max_norm", kwargs.get("clip_value"))
                d.on_clip(kind, params, limit, result)
                return result

            return clip

        return make

    def _ddp_init_wrapper(self, original: Callable) -> Callable:
        d = self.doctor

        @functools.wraps(original)
        def __init__(self_ddp, *args, **kwargs):  # noqa: N807 - mirrors DDP
            original(self_ddp, *args, **kwargs)
            d.on_ddp_wrapped(self_ddp)

        return __init__

    def _scheduler_wrapper(self, original: Callable) -> Callable:
        d = self.doctor

        @functools.wraps(original)
        def step(self_scheduler, *args, **kwargs):
            d.on_scheduler_step(self_scheduler)
            return original(self_scheduler, *args, **kwargs)

        return step


def _getstate_classes() -> list[type]:
    """nn.Module and every loaded subclass that defines its own `__getstate__` without calling
    Module's (`nn.RNNBase` copies its `__dict__`): each must drop netdoctor's hooks when pickled
    or deep-copied (an LSTM saved with `torch.save(model)` mid-training)."""
    found: list[type] = [nn.Module]
    todo = list(nn.Module.__subclasses__())
    seen: set[type] = set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo.extend(cls.__subclasses__())
        if "__getstate__" in cls.__dict__:
            found.append(cls)
    return found


def _clip_modules() -> list[Any]:
    """Where the clipping functions are looked up: `torch.nn.utils` (what scripts call) and
    the module that defines them (what `from torch.nn.utils.clip_grad import ...` reads)."""
    import torch.nn.utils
    import torch.nn.utils.clip_grad

    return [torch.nn.utils, torch.nn.utils.clip_grad]


def _scheduler_classes() -> list[type]:
    """The lr scheduler classes that define their own `step` (LRScheduler and the few that
    override it: ReduceLROnPlateau, SequentialLR, ChainedScheduler, ...)."""
    out = []
    for value in vars(lr_scheduler).values():
        if (
            isinstance(value, type)
            and "step" in value.__dict__
            and (
                issubclass(value, lr_scheduler.LRScheduler) or value.__name__ == "ReduceLROnPlateau"
            )
        ):
            out.append(value)
    return out
