"""Builds the IR for a loaded model: torch.fx first, the hook fallback when tracing fails.

Also settles the input shape (given, or inferred with a note) and catches a failing forward,
so the meta rules ND001/ND002 can report what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netdoctor.findings import Location
from netdoctor.graph.ir import Graph
from netdoctor.loading.forward import ForwardFailure, example_input, model_device, run_forward
from netdoctor.loading.shapes import InputSpec, infer
from netdoctor.loading.target import LoadedModel


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
    from netdoctor.graph import fx_frontend, hook_frontend
    from netdoctor.graph.torch_common import record_unregistered

    model, prov = loaded.model, loaded.provenance
    outcome = BuildOutcome(graph=None)
    extra = record_unregistered(Graph(), model, prov)  # so list-held modules get hooks too

    # 1. An input: the given one must run; otherwise infer one.
    if spec is not None:
        try:
            run_forward(model, example_input(spec.shape, spec.dtype, vocab=spec.vocab), extra)
            outcome.input = spec
        except ForwardFailure as f:
            outcome.forward_failure, outcome.failed_input = f, spec
    else:
        found, failure, failed_spec = infer(model, extra)
        if found is not None:
            outcome.input = found
            outcome.notes.append(f"input shape {found.describe()} inferred from "
                                 f"{found.inferred_from}; pass --input-shape to set it")
        elif failure is not None:
            outcome.forward_failure, outcome.failed_input = failure, failed_spec
        else:
            outcome.notes.append("no input shape given and none could be inferred: rules that "
                                 "need a forward pass were skipped (pass --input-shape C,H,W)")

    _locate_failure(outcome, loaded, extra)

    # 2. The graph: fx, else one recorded forward.
    try:
        gm = fx_frontend.trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, NameError, TypeError, ...)
        outcome.fallback_reason = _reason(e)
        if outcome.input is None:
            outcome.notes.append("torch.fx could not trace the model and no working input is "
                                 "available for the fallback: graph rules were skipped")
            return outcome
        x = example_input(outcome.input.shape, outcome.input.dtype,
                          vocab=outcome.input.vocab).to(model_device(model))
        try:
            outcome.graph = hook_frontend.build(model, prov, x)
        except ForwardFailure as f:
            outcome.forward_failure, outcome.failed_input = f, outcome.input
        if outcome.graph is not None:
            outcome.graph.root_location = loaded.class_location
            _measure_signal(outcome, loaded, extra)
        _locate_failure(outcome, loaded, extra)
        return outcome

    if outcome.input is not None:
        x = example_input(outcome.input.shape, outcome.input.dtype,
                          vocab=outcome.input.vocab).to(model_device(model))
        try:
            fx_frontend.propagate_shapes(gm, x)
        except Exception as e:  # traced graph differs from eager: keep the graph, drop shapes
            outcome.notes.append(f"shape propagation failed ({_reason(e)}); shapes unknown")
    outcome.graph = fx_frontend.build(model, prov, gm)
    outcome.graph.root_location = loaded.class_location
    if outcome.input is not None:
        outcome.graph.input_shape = outcome.input.shape
        _measure_signal(outcome, loaded, extra)
    return outcome


def _measure_signal(outcome: BuildOutcome, loaded: LoadedModel, extra: dict) -> None:
    """Per-layer output RMS at initialization (node.attrs["init_rms"], for ND204)."""
    from netdoctor.graph.signal import record_init_rms

    spec = outcome.input
    if spec is None or outcome.graph is None or outcome.forward_failure is not None:
        return
    note = record_init_rms(outcome.graph, loaded.model, extra, spec.shape, spec.dtype,
                           vocab=spec.vocab)
    if note:
        outcome.notes.append(note)


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
