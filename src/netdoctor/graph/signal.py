"""Signal scale at initialization: the RMS of each weight layer's output on a unit-variance batch.

One forward pass, without gradients, with every module in eval mode except the BatchNorm layers,
which normalize with the batch's own statistics as they do in training (at initialization their
running statistics are mean 0 / variance 1, so eval-mode BatchNorm would be an identity and hide
exactly the normalization that keeps deep networks' signal in range). Dropout stays off. The
BatchNorm running statistics are snapshotted and restored, hooks are always removed and every
module's train/eval flag is restored: the user's model is left exactly as it was.

The measurements land on the IR as node.attrs["init_rms"] (the output's RMS) and
node.attrs["init_signal_rms"] (the RMS of its deviation from the batch mean: the input-dependent
part, which a bias cannot fake), with the same two of the layer's input (init_input_rms,
init_input_signal_rms: 0 when every sample feeds it the same value), on conv/linear module nodes,
matched by node.module (a module called twice gets one value per call, in call order), on the one
functional conv/linear call made inside a conv/linear subclass's own forward (a
weight-standardized conv: the module's output is that call's), and on the input node. ND204
reads them.

For a traced model this is the check's only forward pass: it also shows that the input runs, and
the traced graph's shapes are replayed from what its layers returned here (fx_frontend).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from netdoctor.graph.ir import WEIGHT_OPS, Graph, Node
from netdoctor.graph.ops import module_op
from netdoctor.loading.forward import (
    example_input,
    model_device,
    preserved_buffers,
    preserved_modes,
)

_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


def _rms(value) -> tuple[float | None, float | None]:
    """Root mean square of a tensor, and of its deviation from the batch mean (the part of the
    output that depends on the input, not the bias). One float32 pass each, accumulated by
    torch's pairwise sums (float64 only when float32 squares overflow, as exploding signals
    do): this runs on every layer's output."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
        return None, None
    v = value.detach()
    centered = _root_mean_square(v, True) if v.dim() > 0 and v.shape[0] >= 2 else None
    return _root_mean_square(v, False), centered


def _root_mean_square(v: torch.Tensor, centered: bool) -> float | None:
    for dtype in (torch.float32, torch.float64):
        w = v.to(dtype)
        if centered and w.shape[0] == 2:  # each deviates from the pair's mean by half their gap
            ms = float((w[0] - w[1]).square().mean()) / 4
        elif centered:
            ms = float((w - w.mean(dim=0, keepdim=True)).square().mean())
        else:
            ms = float(w.square().mean())
        if math.isfinite(ms):
            return math.sqrt(ms)
    return None if math.isnan(ms) else math.inf


def batch_size(shape: tuple[int, ...], deferred: bool = False) -> int:
    """Enough samples for batch statistics, few enough to stay fast on big inputs: this is the
    one forward pass of a check on more than one sample, and on ImageNet-sized inputs two
    samples times every pixel are plenty of statistics. A model too large to build (`deferred`:
    its weights drawn again at the ops that use them) gets two: there the forward's cost is
    its weights', and two samples are what the batch statistics need."""
    if deferred:
        return 2
    n = math.prod(shape)
    return 8 if n <= 3 * 64 * 64 else 4 if n <= 3 * 128 * 128 else 2


def record_init_rms(
    graph: Graph,
    model: nn.Module,
    extra: dict[str, nn.Module],
    shape: tuple[int, ...],
    dtype: str = "float32",
    vocab: int | None = None,
    deferred: bool = False,
) -> str | None:
    """Annotate the graph's weight-layer nodes with init_rms. Returns a note when it could not."""
    if not weight_modules(graph, model, extra)[0]:
        return None
    try:
        measure_init_rms(graph, model, extra, shape, dtype, vocab, deferred=deferred)
    except Exception as e:  # the build already reported a failing forward (ND002)
        return not_measured(e)
    return None


def not_measured(error: BaseException) -> str:
    return f"signal scale at init not measured ({type(error).__name__})"


def weight_modules(
    graph: Graph, model: nn.Module, extra: dict[str, nn.Module]
) -> tuple[dict[str, nn.Module], dict[str, list[Node]]]:
    """The conv/linear modules to measure, by path, and the graph nodes each one's calls go to
    (in call order)."""
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
    return modules, nodes


def weight_layers(model: nn.Module, extra: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Every conv/linear module of the model by path: what a forward recorded before its graph
    exists can measure (`weight_modules` later picks those its graph calls)."""
    found = {path: m for path, m in extra.items() if module_op(m) in WEIGHT_OPS}
    for path, m in model.named_modules():
        if path and module_op(m) in WEIGHT_OPS:
            found.setdefault(path, m)
    return found


def measurable_in_eval(model: nn.Module) -> bool:
    """Whether a forward in plain eval mode is the signal measurement's forward: without
    BatchNorm layers (which it runs in training mode) the two compute the same."""
    return not any(isinstance(m, _BATCHNORM) for m in model.modules())


class SignalHooks:
    """Forward hooks that take the RMS of each conv/linear call's output and input, and what
    they took, written onto the graph's nodes once the graph is known."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.calls: dict[str, list[tuple[tuple[float | None, float | None], ...]]] = defaultdict(
            list
        )

    def hooks(self) -> list[tuple[nn.Module, Callable]]:
        return [(m, functools.partial(self._taken, path)) for path, m in self.modules.items()]

    def _taken(self, path: str, module: nn.Module, args: Any, out: Any) -> None:
        # netdoctor's own arithmetic: no function mode (a recorder, a materialiser) sees it
        with torch._C.DisableTorchFunction():
            self.calls[path].append((_rms(out), _rms(args)))

    def annotate(self, graph: Graph, nodes: dict[str, list[Node]], x: torch.Tensor) -> None:
        for path, values in self.calls.items():
            for node, ((rms, signal), (in_rms, in_signal)) in zip(nodes.get(path, ()), values):
                if rms is not None:
                    node.attrs["init_rms"] = rms
                if signal is not None:
                    node.attrs["init_signal_rms"] = signal
                if in_rms is not None and in_signal is not None:
                    node.attrs["init_input_rms"] = in_rms
                    node.attrs["init_input_signal_rms"] = in_signal
        if x.is_floating_point():
            for node in graph.of_op("input"):
                node.attrs["init_rms"], node.attrs["init_signal_rms"] = _rms(x)


def measure_init_rms(
    graph: Graph,
    model: nn.Module,
    extra: dict[str, nn.Module],
    shape: tuple[int, ...],
    dtype: str = "float32",
    vocab: int | None = None,
    observers: Iterable[tuple[nn.Module, Callable]] = (),
    deferred: bool = False,
) -> None:
    """One forward pass of the user's model as described above, annotating the graph. Raises
    what the forward raises (and then annotates nothing): it is also the check's proof that
    the model runs at this input. `observers`, (module, forward hook) pairs, see the same pass
    (the outputs the traced graph's shape replay stands in)."""
    modules, nodes = weight_modules(graph, model, extra)
    signal = SignalHooks(modules)
    handles = []
    norms = [m for m in model.modules() if isinstance(m, _BATCHNORM)]
    x = example_input(shape, dtype, batch=batch_size(shape, deferred), vocab=vocab)
    x = x.to(model_device(model))
    try:
        for module, hook in [*signal.hooks(), *observers]:
            handles.append(module.register_forward_hook(hook))
        with preserved_modes(model), preserved_buffers(norms), torch.no_grad():
            model.eval()
            for m in norms:
                m.train()
            model(x)
    finally:
        for h in handles:
            h.remove()
    signal.annotate(graph, nodes, x)
