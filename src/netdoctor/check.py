"""`netdoctor check`: load -> graph -> rules -> findings (one Report per model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from netdoctor.catalogue import matches
from netdoctor.findings import Finding, Report
from netdoctor.loading.seeding import DEFAULT_SEED
from netdoctor.suppress import is_suppressed


@dataclass
class CheckOptions:
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "float32"
    select: list[str] = field(default_factory=lambda: ["ALL"])
    ignore: list[str] = field(default_factory=list)
    rule_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = DEFAULT_SEED  # model construction and every forward pass run under it


def selected(rule_id: str, opts: CheckOptions) -> bool:
    return matches(rule_id, opts.select) and not matches(rule_id, opts.ignore)


def run_rules(ctx, stages: set[str], opts: CheckOptions) -> list[Finding]:
    """Run every registered, selected rule whose inputs the context has."""
    from netdoctor.rules import REGISTRY

    available = {
        "outcome": ctx.outcome is not None,
        "graph": ctx.graph is not None,
        "data": ctx.data is not None,
        "runtime": ctx.run is not None,
        "loop": getattr(ctx, "loop", None) is not None,
    }
    findings: list[Finding] = []
    for rule_id in sorted(REGISTRY):
        impl = REGISTRY[rule_id]
        if impl.needs not in stages or not available.get(impl.needs) or not selected(rule_id, opts):
            continue
        findings.extend(impl.fn(ctx))
    return findings


def check_loaded(loaded, opts: CheckOptions) -> Report:
    """Build the graph of one loaded model and run the static rules on it (under opts.seed: a
    forward that draws random numbers sees the same ones in every run)."""
    from netdoctor.graph.build import build_graph
    from netdoctor.loading.seeding import seeded
    from netdoctor.loading.shapes import InputSpec
    from netdoctor.rules import Context

    spec = None
    if opts.input_shape is not None:
        spec = InputSpec(tuple(opts.input_shape), opts.input_dtype, _vocab(loaded.model))
    with seeded(opts.seed):
        outcome = build_graph(loaded, spec)
        ctx = Context(
            target=loaded.target, graph=outcome.graph, outcome=outcome, options=opts.rule_options
        )
        findings = run_rules(ctx, {"outcome", "graph"}, opts)
    report = Report(target=loaded.target, notes=list(outcome.notes))
    class_lines = [loaded.class_location] if loaded.class_location else []
    for f in findings:
        if is_suppressed(f, class_lines):
            report.notes.append(
                f"{f.rule} at {f.location} suppressed by a netdoctor: ignore comment"
            )
        else:
            report.findings.append(f)
    return report


def _vocab(model) -> int | None:
    from netdoctor.loading.shapes import first_layer

    found = first_layer(model)
    return getattr(found[1], "num_embeddings", None) if found else None


def check_data(
    report: Report, loaded, source, opts: CheckOptions, spec=None, n_batches: int = 4
) -> None:
    """Run the data rules (ND3xx) on a sample of an opened DataSource against one loaded model
    and add their findings (suppression, select and ignore as for the static rules) and the
    data's description to `report`. `source` may also be an already drawn DataSample."""
    from netdoctor.loading.seeding import seeded
    from netdoctor.rules import Context
    from netdoctor.rules.data import DataSample, sample_data

    with seeded(opts.seed):
        if isinstance(source, DataSample):
            sample = source.for_model(loaded.model)
        else:
            sample = sample_data(source, loaded.model, n_batches, spec)
        ctx = Context(target=loaded.target, data=sample, options=opts.rule_options)
        findings = run_rules(ctx, {"data"}, opts)
    report.notes.append(f"data: {sample.description}")
    report.notes.extend(sample.notes)
    class_lines = [loaded.class_location] if loaded.class_location else []
    for f in findings:
        if is_suppressed(f, class_lines):
            report.notes.append(f"{f.rule} suppressed by a netdoctor: ignore comment")
        else:
            report.findings.append(f)


def check(target: str, opts: CheckOptions, data=None) -> tuple[list[Report], list[str]]:
    """Check every model a target names. Returns the reports and loader notes.

    `data`: an opened DataSource or a DataSample (`check --data`); the data rules then run on
    it against each model."""
    from netdoctor.loading.target import load

    result = load(target, opts.kwargs, seed=opts.seed)
    reports = [check_loaded(m, opts) for m in result.models]
    if data is not None:
        for report, loaded in zip(reports, result.models):
            check_data(report, loaded, data, opts)
    reports.extend(check_onnx(path, opts) for path in result.onnx_files)
    return reports, result.notes


def check_onnx(path: str, opts: CheckOptions) -> Report:
    """The graph rules on an ONNX file (no source code, so fixes are snippets)."""
    from netdoctor.graph.build import BuildOutcome
    from netdoctor.graph.onnx_frontend import build
    from netdoctor.loading.target import display_path
    from netdoctor.rules import Context

    graph = build(path)
    target = display_path(path)
    ctx = Context(
        target=target, graph=graph, outcome=BuildOutcome(graph=graph), options=opts.rule_options
    )
    return Report(
        target=target, findings=run_rules(ctx, {"outcome", "graph"}, opts), notes=list(graph.notes)
    )
