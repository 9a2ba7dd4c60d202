"""Where the first NaN/Inf of a watched run came from, found at the optimizer step that would
have consumed it (before the update spreads it into the weights).

In order: the backward whose loss was non-finite; a loss function of that step whose input was
finite but whose output was not (the loss itself: every target `ignore_index`, log of 0); else a
replay of the watched model's forward that fed it (`measure.nonfinite.localize_forward`, with
the call's own arguments, random state and autocast, the model's buffers restored and the
user's random state untouched) to name the producing module; a finite loss with a non-finite
gradient names the first parameter backward reached.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch

from netdoctor.loading.forward import preserved_attributes, preserved_buffers
from netdoctor.measure.nonfinite import first_bad_grad, localize_forward, tensor_stats
from netdoctor.measure.params import ParamMeter
from netdoctor.measure.record import NonFinite
from netdoctor.watcher.models import WatchedModel


def _finite(t: torch.Tensor | None) -> bool:
    if t is None or not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t.detach()).all())


def localize(
    doctor: Any, wo: Any, step: int, backwards: list, loss: float
) -> tuple[int, NonFinite]:
    """(id of the WatchedModel it belongs to, or 0 for the loop itself; the event)."""
    owner = next((wm for wm in doctor.models if wm.owner is wo), None)
    owner_id = id(owner) if owner is not None else 0
    bad = next((r for r in backwards if r.value is not None and not math.isfinite(r.value)), None)
    if bad is None and not math.isfinite(loss) and backwards:
        bad = backwards[-1]
    if bad is None:
        return owner_id, _bad_gradient(wo, owner, step)
    for call in bad.calls:
        out, inp = call.output, call.input  # the input only while the user still holds it
        if out is None or _finite(out):
            continue
        if doctor.losses.all_ignored(call):
            call.facts.all_ignored += 1
            n = call.target.numel()
            detail = (
                f"every one of the {n} targets of this batch equals ignore_index "
                f"({call.ignore_index}), so the mean over the remaining 0 targets is "
                "0/0 = NaN"
            )
        elif inp is not None and _finite(inp):
            detail = ""
        else:
            continue  # the input was already non-finite (or is gone): replay the model
        return owner_id, NonFinite(
            step,
            "loss",
            detail=detail,
            location=call.facts.site,
            output_stats=tensor_stats(inp) if inp is not None else None,
        )
    for wm in sorted(doctor.models, key=lambda m: m is not owner):
        index = bad.forwards.get(id(wm))
        call = next((c for c in reversed(wm.calls) if c.index == index), None) if index else None
        if call is None or wm.model is None or wm.compiled or wm.communicates:
            continue
        event = _replay(doctor, wm, call, step)
        if event.reproduced:
            return id(wm), event
    return owner_id, NonFinite(
        step,
        "loss",
        detail="the model's outputs were finite but the loss computed from them was not",
        location=doctor.facts.backward_site,
    )


def _replay(doctor: Any, wm: WatchedModel, call: Any, step: int) -> NonFinite:
    model = wm.model
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    devices = [device] if device.type == "cuda" else []
    autocast = (
        torch.autocast(call.autocast[0], dtype=call.autocast[1]) if call.autocast else nullcontext()
    )
    with (
        doctor._busy(),
        torch.random.fork_rng(devices=devices),
        autocast,
        preserved_attributes(model),
        preserved_buffers([model]),
    ):
        return localize_forward(
            model, tuple(call.args), None, None, step, call.rng, device, kwargs=call.kwargs
        )


def _bad_gradient(wo: Any, owner: WatchedModel | None, step: int) -> NonFinite:
    """A finite loss, a non-finite gradient: the parameter backward reached first."""
    if owner is None:
        return NonFinite(step, "gradient", detail="the loss was finite but a gradient was not")
    named = [(owner.params_by_id[id(p)][0], p) for p in wo.trainable if id(p) in owner.params_by_id]
    model = owner.model
    types = {n: type(m).__name__ for n, m in model.named_modules()} if model is not None else {}
    meter = ParamMeter(named, types)
    meter.before_step()
    meter.discard()
    order = (
        list(owner.recorder.order)
        if owner.recorder is not None and owner.recorder.order
        else list(dict.fromkeys(n.rpartition(".")[0] for n, _ in named))
    )
    return first_bad_grad(meter.traces, step, order)
