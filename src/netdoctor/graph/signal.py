"""Signal scale at initialization: the RMS of each weight layer's output on a unit-variance batch.

One forward pass, without gradients, with every module in eval mode except the BatchNorm layers,
which normalize with the batch's own statistics as they do in training (at initialization their
running statistics are mean 0 / variance 1, so eval-mode BatchNorm would be an identity and hide
exactly the normalization that keeps deep networks' signal in range). Dropout stays off. The
BatchNorm running statistics are snapshotted and restored, hooks are always removed and every
module's train/eval flag is restored: the user's model is left exactly as it was.

The measurements land on the IR as node.attrs["init_rms"] (the output's RMS) and
node.attrs["init_signal_rms"] (the RMS of its deviation from the batch mean: the input-dependent
part, which a bias cannot fake) on conv/linear module nodes, matched by node.module (a module
called twice gets one value per call, in call order), on the one functional conv/linear call made
inside a conv/linear subclass's own forward (a weight-standardized conv: the module's output is
that call's), and on the input node. ND204 reads them.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from netdoctor.graph.ir import WEIGHT_OPS, Graph
from netdoctor.graph.ops import module_op
from netdoctor.loading.forward import example_input, model_device, preserved_modes

_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


def _rms(value) -> tuple[float | None, float | None]:
    """Root mean square of a tensor, and of its deviation from the batch mean (the part of the
    output that depends on the input, not the bias). In float64: exploding signals overflow
    float32's squares."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
        return None, None
    v = value.detach().double()
    rms = float(v.pow(2).mean().sqrt())
    centered = None
    if v.dim() > 0 and v.shape[0] >= 2:
        centered = float((v - v.mean(dim=0, keepdim=True)).pow_(2).mean().sqrt())
    return (None if math.isnan(rms) else rms,
            None if centered is None or math.isnan(centered) else centered)


def batch_size(shape: tuple[int, ...]) -> int:
    """Enough samples for batch statistics, few enough to stay fast on big inputs."""
    return 8 if math.prod(shape) <= 3 * 64 * 64 else 4


def record_init_rms(graph: Graph, model: nn.Module, extra: dict[str, nn.Module],
                    shape: tuple[int, ...], dtype: str = "float32",
                    vocab: int | None = None) -> str | None:
    """Annotate the graph's weight-layer nodes with init_rms. Returns a note when it could not."""
    nodes = defaultdict(list)
    functional = defaultdict(list)
    for node in graph.topological():
        if node.op in WEIGHT_OPS and node.module:
            nodes[node.module].append(node)
        elif node.op in WEIGHT_OPS and node.attrs.get("scope"):
            functional[node.attrs["scope"]].append(node)
    modules: dict[str, nn.Module] = {}
    for path in list(nodes) + list(functional):
        module = extra.get(path)
        if module is None:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
        if path in functional:
            # A conv/linear subclass whose forward makes its one functional call itself (a
            # weight-standardized conv): the module's output is that call's output.
            if path in nodes or len(functional[path]) != 1 or module_op(module) not in WEIGHT_OPS:
                continue
            nodes[path] = functional[path]
        modules[path] = module
    if not modules:
        return None
    calls: dict[str, list[tuple[float | None, float | None]]] = defaultdict(list)
    handles = []
    norms = [m for m in model.modules() if isinstance(m, _BATCHNORM)]
    saved = [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None}
             for m in norms]
    x = example_input(shape, dtype, batch=batch_size(shape), vocab=vocab).to(
        model_device(model))
    try:
        for path, module in modules.items():
            handles.append(module.register_forward_hook(
                lambda mod, args, out, p=path: calls[p].append(_rms(out))))
        with preserved_modes(model), torch.no_grad():
            model.eval()
            for m in norms:
                m.train()
            model(x)
    except Exception as e:  # the build already reported a failing forward (ND002)
        return f"signal scale at init not measured ({type(e).__name__})"
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)
    for path, values in calls.items():
        for node, (rms, signal) in zip(nodes[path], values):
            if rms is not None:
                node.attrs["init_rms"] = rms
            if signal is not None:
                node.attrs["init_signal_rms"] = signal
    if x.is_floating_point():
        for node in graph.of_op("input"):
            node.attrs["init_rms"], node.attrs["init_signal_rms"] = _rms(x)
    return None
