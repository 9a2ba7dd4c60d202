"""Builds the IR for a loaded model: torch.fx first, the hook fallback when tracing fails.

Also settles the input shape (given, or inferred with a note) and catches a failing forward,
so the meta rules ND001/ND002 can report what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netdoctor.findings import Location
from netdoctor.graph.ir import Graph
from netdoctor.loading.forward import ForwardFailure, example_input, run_forward
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

    # 1. The graph: torch.fx when it can trace the model.
    try:
        gm = fx_frontend.trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, NameError, TypeError, ...)
        gm, outcome.fallback_reason = None, _reason(e)
    if gm is not None:
        outcome.graph = fx_frontend.build(model, prov, gm)
        outcome.graph.root_location = loaded.class_location

    # 2. The given input, in one forward pass: the signal measurement run through the traced
    # graph also records its shapes and shows that the input runs. Anything short of that (no
    # weight layer to measure, a failure) leaves the decision to step 3.
    measured = False
    if gm is not None and spec is not None:
        outcome.input = spec
        with fx_frontend.recording_shapes(gm) as recorder:
            note = _measure_signal(outcome, gm, extra)
        measured = recorder.completed and note is None
        if not measured:
            outcome.input = None
            _forget_signal(outcome.graph)

    # 3. Otherwise: the given input must run; without one, infer one. With a traced graph, the
    # run that tries an input also records the shapes; when the traced graph does not run, the
    # eager model decides (and names the failing submodule, ND002).
    shape_failure: list[str] = []

    def run(candidate: InputSpec) -> None:
        x = example_input(candidate.shape, candidate.dtype, vocab=candidate.vocab)
        shape_failure.clear()
        if gm is not None:
            try:
                fx_frontend.propagate_shapes(gm, x)
                return
            except Exception as e:  # traced graph differs from eager: keep it, drop shapes
                shape_failure.append(_reason(e))
        run_forward(model, x, extra)

    if measured:
        pass
    elif spec is not None:
        try:
            run(spec)
            outcome.input = spec
        except ForwardFailure as f:
            outcome.forward_failure, outcome.failed_input = f, spec
    else:
        found, failure, failed_spec = infer(model, extra, run)
        if found is not None:
            outcome.input = found
            outcome.notes.append(f"input shape {found.describe()} inferred from "
                                 f"{found.inferred_from}; pass --input-shape to set it")
        elif failure is not None:
            outcome.forward_failure, outcome.failed_input = failure, failed_spec
        else:
            outcome.notes.append("no input shape given and none could be inferred: rules that "
                                 "need a forward pass were skipped (pass --input-shape C,H,W)")
    if gm is not None and outcome.input is not None and shape_failure:
        outcome.notes.append(f"shape propagation failed ({shape_failure[0]}); shapes unknown")

    _locate_failure(outcome, loaded, extra)

    if gm is not None:
        fx_frontend.apply_shapes(outcome.graph, gm)
        if outcome.input is not None:
            outcome.graph.input_shape = outcome.input.shape
            if not measured:
                _add_note(outcome, _measure_signal(outcome, model, extra))
        return outcome

    # 4. Without a traced graph: one recorded forward.
    if outcome.input is None:
        outcome.notes.append("torch.fx could not trace the model and no working input is "
                             "available for the fallback: graph rules were skipped")
        return outcome
    x = example_input(outcome.input.shape, outcome.input.dtype, vocab=outcome.input.vocab)
    try:
        outcome.graph = hook_frontend.build(model, prov, x)
    except ForwardFailure as f:
        outcome.forward_failure, outcome.failed_input = f, outcome.input
    if outcome.graph is not None:
        outcome.graph.root_location = loaded.class_location
        _add_note(outcome, _measure_signal(outcome, model, extra))
    _locate_failure(outcome, loaded, extra)
    return outcome


def _measure_signal(outcome: BuildOutcome, model, extra: dict) -> str | None:
    """Per-layer output RMS at initialization (node.attrs["init_rms"], for ND204), measured by
    calling `model` (the user's model, or the traced graph that records shapes on the way).
    Returns the measurement's note (None when it worked or had nothing to measure)."""
    from netdoctor.graph.signal import record_init_rms

    spec = outcome.input
    if spec is None or outcome.graph is None or outcome.forward_failure is not None:
        return None
    return record_init_rms(outcome.graph, model, extra, spec.shape, spec.dtype,
                           vocab=spec.vocab)


def _forget_signal(graph: Graph) -> None:
    for node in graph:
        node.attrs.pop("init_rms", None)
        node.attrs.pop("init_signal_rms", None)


def _add_note(outcome: BuildOutcome, note: str | None) -> None:
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
