"""Builds the IR for a loaded model: torch.fx first, the hook fallback when tracing fails.

Also settles the input shape (given, or inferred with a note) and catches a failing forward,
so the meta rules ND001/ND002 can report what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from netdoctor.findings import Location
from netdoctor.graph.ir import Graph
from netdoctor.loading.forward import (
    ForwardFailure,
    example_input,
    model_device,
    preserved_attributes,
    run_forward,
)
from netdoctor.loading.shapes import InputSpec, infer
from netdoctor.loading.target import LoadedModel

if TYPE_CHECKING:
    import torch
    from torch import fx


@dataclass
class BuildOutcome:
    graph: Graph | None
    input: InputSpec | None = None
    fallback_reason: str | None = None  # why fx failed (ND001)
    forward_failure: ForwardFailure | None = None  # ND002
    failed_input: InputSpec | None = None
    failure_location: Location | None = None  # construction site of the failing submodule
    notes: list[str] = field(default_factory=list)


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")


def build_graph(loaded: LoadedModel, spec: InputSpec | None) -> BuildOutcome:
    """The IR of the loaded model; the model's plain attributes (a forward's call counter, a
    cache) are as they were afterwards, whatever the trace and the forward passes assigned."""
    with preserved_attributes(loaded.model):
        return _build_graph(loaded, spec)


def _build_graph(loaded: LoadedModel, spec: InputSpec | None) -> BuildOutcome:
    from netdoctor.graph import fx_frontend, hook_frontend
    from netdoctor.graph.signal import (
        SignalHooks,
        batch_size,
        measurable_in_eval,
        measure_init_rms,
        not_measured,
        weight_layers,
        weight_modules,
    )
    from netdoctor.graph.torch_common import record_unregistered

    model, prov = loaded.model, loaded.provenance
    deferred = loaded.deferred is not None
    outcome = BuildOutcome(graph=None)
    holders = Graph()
    extra = record_unregistered(holders, model, prov)  # so list-held modules get hooks too

    # 1. The graph: torch.fx when it can trace the model.
    try:
        gm = fx_frontend.trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, NameError, TypeError, ...)
        gm, outcome.fallback_reason = None, _reason(e)
    fx_graph: Graph | None = None  # the IR of the traced graph
    if gm is not None:
        fx_graph = outcome.graph = fx_frontend.build(model, prov, gm, holders.unregistered)
        fx_graph.root_location = loaded.class_location

    # 2. An input: the given one must run; otherwise infer one. With a traced graph, the one
    # eager forward of the signal measurement (ND204) shows that the input runs, and a replay of
    # the traced graph on what its leaf modules returned there gives every node its shape. When
    # that forward fails, the plain eager forward decides (and names the failing submodule,
    # ND002); the traced graph then runs on its own for the shapes. Without a traced graph, the
    # hook frontend's recorded forward shows it (and is the graph), and it also measures the
    # signal when it computes what the signal measurement would (`one_pass`).
    shape_failure: list[str] = []
    signal_note: list[str] = []
    recorded: list[tuple[Graph, SignalHooks | None, torch.Tensor]] = []

    def run(candidate: InputSpec) -> None:
        shape_failure.clear()
        signal_note.clear()
        recorded.clear()
        if gm is not None and fx_graph is not None:
            leaves = fx_frontend.LeafOutputs(gm)
            try:
                measure_init_rms(
                    fx_graph,
                    model,
                    extra,
                    candidate.shape,
                    candidate.dtype,
                    candidate.vocab,
                    observers=leaves.hooks(),
                    deferred=deferred,
                )
            except Exception as e:
                if weight_modules(fx_graph, model, extra)[0]:
                    signal_note.append(not_measured(e))
            else:
                x = example_input(
                    candidate.shape,
                    candidate.dtype,
                    batch=batch_size(candidate.shape, deferred),
                    vocab=candidate.vocab,
                )
                try:
                    fx_frontend.replay_shapes(gm, x.to(model_device(model)), leaves)
                except Exception:  # e.g. a functional op that rejects the zeros: run for real
                    shapes_by_running(gm, candidate)
                return
        x = example_input(candidate.shape, candidate.dtype, vocab=candidate.vocab)
        if gm is not None:
            run_forward(model, x, extra)
            shapes_by_running(gm, candidate)
            return
        x = x.to(model_device(model))
        one_pass = batch_size(candidate.shape, deferred) == len(x) and measurable_in_eval(model)
        signal = SignalHooks(weight_layers(model, extra)) if one_pass else None
        graph = hook_frontend.build(model, prov, x, signal.hooks() if signal else ())
        recorded.append((graph, signal, x))

    def shapes_by_running(gm: fx.GraphModule, candidate: InputSpec) -> None:
        for batch in (1, 2):  # a model may squeeze a batch of one away
            x = example_input(
                candidate.shape, candidate.dtype, batch=batch, vocab=candidate.vocab
            ).to(model_device(model))
            try:
                fx_frontend.propagate_shapes(gm, x)
                shape_failure.clear()
                return
            except Exception as e:  # traced graph may differ from eager: eager decides
                shape_failure.append(_reason(e))

    if spec is not None:
        try:
            run(spec)
            outcome.input = spec
        except ForwardFailure as f:
            outcome.forward_failure, outcome.failed_input = f, spec
    else:
        found, failure, failed_spec = infer(model, extra, run)
        if found is not None:
            outcome.input = found
            outcome.notes.append(
                f"input shape {found.describe()} inferred from "
                f"{found.inferred_from}; pass --input-shape to set it"
            )
        elif failure is not None:
            outcome.forward_failure, outcome.failed_input = failure, failed_spec
        else:
            outcome.notes.append(
                "no input shape given and none could be inferred: rules that "
                "need a forward pass were skipped (pass --input-shape C,H,W)"
            )
    if gm is not None and outcome.input is not None:
        if shape_failure:
            outcome.notes.append(f"shape propagation failed ({shape_failure[-1]}); shapes unknown")
        outcome.notes.extend(signal_note)

    _locate_failure(outcome, loaded, extra)

    if gm is not None and fx_graph is not None:
        fx_frontend.copy_shapes(gm, fx_graph)
        if outcome.input is not None:
            fx_graph.input_shape = outcome.input.shape
        return outcome

    # 3. The graph without fx: the recorded forward of step 2.
    if outcome.input is None or not recorded:
        outcome.notes.append(
            "torch.fx could not trace the model and no working input is "
            "available for the fallback: graph rules were skipped"
        )
        return outcome
    outcome.graph, signal, x = recorded[0]
    outcome.graph.root_location = loaded.class_location
    if signal is not None:
        signal.annotate(outcome.graph, weight_modules(outcome.graph, model, extra)[1], x)
    else:
        _measure_signal(outcome, loaded, extra)
    _locate_failure(outcome, loaded, extra)
    return outcome


def _measure_signal(outcome: BuildOutcome, loaded: LoadedModel, extra: dict) -> bool:
    """Per-layer output RMS at initialization (node.attrs["init_rms"], for ND204) on the
    graph the hook frontend recorded: one more forward pass of the user's model as it is.
    False when it failed (a note says so)."""
    from netdoctor.graph.signal import record_init_rms

    spec = outcome.input
    if spec is None or outcome.graph is None or outcome.forward_failure is not None:
        return True
    note = record_init_rms(
        outcome.graph,
        loaded.model,
        extra,
        spec.shape,
        spec.dtype,
        vocab=spec.vocab,
        deferred=loaded.deferred is not None,
    )
    if note:
        outcome.notes.append(note)
    return note is None


def _locate_failure(outcome: BuildOutcome, loaded: LoadedModel, extra: dict) -> None:
    f = outcome.forward_failure
    if f is None or f.module is None:
        return
    module = extra.get(f.module)
    if module is None:
        try:
            module = loaded.model.get_submodule(f.module)
        except AttributeError:
            return
    outcome.failure_location = loaded.provenance.site(module)
