"""`netdoctor check`: load -> graph -> rules -> findings (one Report per model)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from netdoctor.findings import Report
from netdoctor.loading.seeding import DEFAULT_SEED
from netdoctor.rules.engine import RuleSettings, judge, run_rules

if TYPE_CHECKING:
    from torch import nn

    from netdoctor.data.sample import DataSample
    from netdoctor.data.sources import DataSource
    from netdoctor.loading.shapes import InputSpec
    from netdoctor.loading.target import LoadedModel


@dataclass
class CheckOptions:
    """How to build each model, and which rules judge it."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "float32"
    rules: RuleSettings = field(default_factory=RuleSettings)
    seed: int = DEFAULT_SEED  # model construction and every forward pass run under it


def check_loaded(loaded: LoadedModel, opts: CheckOptions) -> Report:
    """Build the graph of one loaded model and run the static rules on it (under opts.seed: a
    forward that draws random numbers sees the same ones in every run)."""
    from netdoctor.graph.build import build_graph
    from netdoctor.loading.seeding import seeded
    from netdoctor.loading.shapes import InputSpec
    from netdoctor.rules.contexts import GraphContext

    spec = None
    if opts.input_shape is not None:
        spec = InputSpec(tuple(opts.input_shape), opts.input_dtype, _vocab(loaded.model))
    with seeded(opts.seed), _deferred(loaded):
        outcome = build_graph(loaded, spec)
        findings = run_rules(GraphContext(loaded.target, outcome), opts.rules)
    report = Report(target=loaded.target, notes=list(outcome.notes))
    judge(report, findings, [loaded.class_location], loaded.user_site())
    return report


@contextmanager
def _deferred(loaded: LoadedModel) -> Iterator[None]:
    """For a model built on the meta device: its init statistics from its construction, and
    its weights materialised at the ops of its forwards that use them."""
    if loaded.deferred is None:
        yield
        return
    from netdoctor.loading.deferred import active
    from netdoctor.loading.materializing import materialized_in_forward

    with active(loaded.deferred), materialized_in_forward(loaded.deferred):
        yield


def _vocab(model: nn.Module) -> int | None:
    from netdoctor.loading.shapes import first_layer

    found = first_layer(model)
    return getattr(found[1], "num_embeddings", None) if found else None


def check_data(
    report: Report,
    loaded: LoadedModel,
    source: DataSource | DataSample,
    opts: CheckOptions,
    spec: InputSpec | None = None,
    n_batches: int = 4,
) -> None:
    """Run the data rules (ND3xx) on a sample of an opened DataSource against one loaded model
    and add their findings (suppression, select and ignore as for the static rules) and the
    data's description to `report`. `source` may also be an already drawn DataSample."""
    from netdoctor.data.sample import DataSample, sample_data
    from netdoctor.loading.seeding import seeded
    from netdoctor.rules.contexts import DataContext

    with seeded(opts.seed):
        if isinstance(source, DataSample):
            sample = source.for_model(loaded.model)
        else:
            sample = sample_data(source, loaded.model, n_batches, spec)
        findings = run_rules(DataContext(loaded.target, sample), opts.rules)
    report.notes.append(f"data: {sample.description}")
    report.notes.extend(sample.notes)
    judge(report, findings, [loaded.class_location], loaded.user_site())


def check(
    target: str, opts: CheckOptions, data: DataSource | DataSample | None = None
) -> tuple[list[Report], list[str]]:
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
    from netdoctor.rules.contexts import GraphContext

    graph = build(path)
    target = display_path(path)
    report = Report(target=target, notes=list(graph.notes))
    findings = run_rules(GraphContext(target, BuildOutcome(graph=graph)), opts.rules)
    judge(report, findings)
    return report
