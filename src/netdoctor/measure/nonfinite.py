"""Where the first non-finite value came from.

The loss of a step went NaN: `localize_forward` replays that step's forward (same weights, same
random state) with a hook on every module and names the first module whose inputs were all finite
but whose output was not -- the producer, not the modules that only propagate it -- and, where
the producer's arguments show why (`explain_producer`: a fully padded attention mask), says so.
A finite loss with a non-finite gradient: `first_bad_grad` names the parameter backward reached
first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from netdoctor.loading.forward import main_output, tensors_in
from netdoctor.measure.record import NonFinite, ParamTrace
from netdoctor.measure.targets import compute_loss


def tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach()
    if not t.is_floating_point():
        return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    f = t.to(torch.float64).reshape(-1)
    fin = torch.isfinite(f)
    v = f[fin]
    out: dict[str, Any] = {
        "shape": list(t.shape),
        "nan": int(torch.isnan(f).sum()),
        "inf": int(torch.isinf(f).sum()),
    }
    if v.numel():
        out.update(
            min=float(v.min()),
            max=float(v.max()),
            mean=float(v.mean()),
            std=float(v.std(unbiased=False)) if v.numel() > 1 else 0.0,
            abs_max=float(v.abs().max()),
        )
    return out


def _all_finite(values: Any) -> bool:
    return all(
        bool(torch.isfinite(t).all())
        for t in tensors_in(values)
        if t.is_floating_point() or t.is_complex()
    )


def rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _fully_masked_rows(mask: Any, rows_dim: int = -1) -> tuple[int, int] | None:
    """(rows whose every entry is masked, rows) for an attention mask: bool masks mark ignored
    positions with True, float masks with -inf."""
    if not isinstance(mask, torch.Tensor) or mask.dim() < 1 or mask.numel() == 0:
        return None
    ignored = mask if mask.dtype == torch.bool else torch.isneginf(mask)
    rows = ignored.all(dim=rows_dim)
    return int(rows.sum()), int(rows.numel())


def explain_producer(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Why a module is known to produce NaN from finite inputs, when its arguments show it."""
    if isinstance(module, nn.MultiheadAttention):
        key_mask = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)
        full = _fully_masked_rows(key_mask)
        if full and full[0]:
            return (
                f"key_padding_mask masks every key of {full[0]} of the {full[1]} sequences "
                "(fully padded): attention's softmax over no keys is 0/0 = NaN"
            )
        attn_mask = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
        full = _fully_masked_rows(attn_mask)
        if full and full[0]:
            return (
                f"attn_mask masks every key for {full[0]} of its {full[1]} query rows: "
                "attention's softmax over no keys is 0/0 = NaN"
            )
    return ""


def localize_forward(
    model: nn.Module,
    x: Any,
    y: torch.Tensor | None,
    loss: str | Callable[[Any], torch.Tensor | None] | None,
    step: int,
    rng: tuple | None,
    device: torch.device,
    *,
    kwargs: dict[str, Any] | None = None,
) -> NonFinite:
    """Replay one step's forward with hooks on every module: the producer of the first
    non-finite value is the first module (in the order forwards complete, i.e. innermost first)
    whose tensor inputs were all finite but whose output was not.

    `x` is the input batch, or a tuple of positional arguments (with `kwargs`: the watcher
    replays the user's own call). `loss` names the probe's loss (computed with `y`), or is a
    function of the model's output that returns the loss the step computed (the watcher), or
    None. The caller keeps buffers and random state as it wants them (the probe replays on its
    own copy; the watcher restores both)."""
    names = {m: n for n, m in model.named_modules()}
    bad_params = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    args = x if isinstance(x, tuple) else (x,)
    kwargs = dict(kwargs or {})
    for t in tensors_in((args, kwargs)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return NonFinite(
                step,
                "input",
                input_stats=tensor_stats(t),
                detail="the input batch itself holds non-finite values",
            )
    found: list[NonFinite] = []
    bad_modules: list[str] = []
    # per module call: (inputs all finite, input statistics, args, kwargs)
    inputs_ok: dict[
        int, list[tuple[bool, dict[str, Any] | None, tuple[Any, ...], dict[str, Any]]]
    ] = {}

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = main_output(args)
        inputs_ok.setdefault(id(mod), []).append(
            (
                _all_finite(args) and _all_finite(kwargs),
                tensor_stats(t) if t is not None else None,
                args,
                kwargs,
            )
        )

    def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        stack = inputs_ok.get(id(mod))
        entry = stack.pop() if stack else (True, None, (), {})
        out_ok = _all_finite(out)
        if not out_ok:
            bad_modules.append(names.get(mod, ""))
        if found:
            return
        if entry[0] and not out_ok:
            t = main_output(out)
            name = names.get(mod, "")
            own_bad = [p for p in bad_params if p.rpartition(".")[0] == name]
            found.append(
                NonFinite(
                    step,
                    "forward",
                    module=name,
                    module_type=type(mod).__name__,
                    input_stats=entry[1],
                    output_stats=tensor_stats(t) if t is not None else None,
                    bad_parameters=own_bad,
                    detail=explain_producer(mod, entry[2], entry[3]),
                )
            )

    handles = []
    try:
        for m in names:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post))
        if rng is not None:
            set_rng_state(rng, device)
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if found:
        ev = found[0]
        ev.bad_parameters = bad_params if not ev.bad_parameters else ev.bad_parameters
        ev.nonfinite_modules = bad_modules
        return ev
    logits = main_output(out)
    if logits is not None and bool(torch.isfinite(logits).all()) and loss is not None:
        with torch.no_grad():
            if callable(loss):
                value = loss(out)
            elif y is not None:  # the probe's loss, by name, on its targets
                value, _ = compute_loss(loss, logits.float(), y)
            else:
                value = None
        if value is not None and not bool(torch.isfinite(value).all()):
            what = f"the {loss} loss" if isinstance(loss, str) else "the loss"
            return NonFinite(
                step,
                "loss",
                output_stats=tensor_stats(logits),
                detail=f"the model's outputs are finite but {what} is not",
            )
    return NonFinite(
        step,
        "forward",
        reproduced=False,
        bad_parameters=bad_params,
        detail="replaying the step's forward gave finite values (non-deterministic kernels)",
    )


def first_bad_grad(traces: list[ParamTrace], step: int, order: list[str]) -> NonFinite:
    """The parameter nearest the output (backward runs output -> input) whose gradient is
    non-finite."""
    pos = {n: i for i, n in enumerate(order)}
    bad = [
        t
        for t in traces
        if t.grad_norm and not math.isfinite(t.grad_norm[-1]) and t.steps_with_grad
    ]
    bad.sort(key=lambda t: -pos.get(t.module, -1))
    first = bad[0] if bad else None
    return NonFinite(
        step,
        "gradient",
        module=first.module if first else None,
        module_type=first.module_type if first else None,
        parameter=first.name if first else None,
        bad_parameters=[t.name for t in bad],
        detail="the loss was finite but a gradient was not",
    )
