"""Everything `netdoctor probe` does between parsing and printing: load the model, open the
data, run the static and data rules, the instrumented run, the runtime rules and the verified fix.
Returns the report (the CLI prints it)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from netdoctor.errors import UserError
from netdoctor.findings import Location, Report
from netdoctor.probe.settings import ProbeSettings

if TYPE_CHECKING:
    from rich.progress import Progress

    from netdoctor.check import CheckOptions
    from netdoctor.data.sample import DataSample
    from netdoctor.data.sources import DataSource, DataSpec
    from netdoctor.loading.target import LoadedModel
    from netdoctor.measure.record import TrainingRun
    from netdoctor.probe.budget import Plan
    from netdoctor.probe.config import ProbeConfig


@dataclass
class _Probe:
    """One probe while it runs: what it trains, on what, with which settings and deadline."""

    loaded: LoadedModel
    source: DataSource
    config: ProbeConfig
    opts: CheckOptions
    settings: ProbeSettings
    report: Report
    progress: Progress | None  # a rich Progress on a terminal, else None
    deadline: float | None  # time.monotonic() by which the probe should end
    phase_times: dict[str, float] = field(default_factory=dict)  # seconds, for the report
    plan: Plan | None = None  # how the time budget fits (None: no budget)

    def sites(self) -> dict[str, Location]:
        """Where the user's code builds each module (the root: its class line)."""
        loaded = self.loaded
        sites = {}
        for name, module in loaded.model.named_modules():
            loc = loaded.provenance.site(module)
            if loc is not None:
                sites[name] = loc
            elif name == "" and loaded.class_location is not None:
                sites[name] = loaded.class_location
        return sites


def probe_target(
    target: str, opts: CheckOptions, settings: ProbeSettings
) -> tuple[Report, TrainingRun | None]:
    """Everything `probe` does, minus parsing and printing: (the report, the probe's run or None
    when it did not train). `settings.time_budget` (seconds, None for no budget) bounds the
    whole probe, counted from `settings.started`."""
    import torch

    from netdoctor.check import check_loaded
    from netdoctor.data import DataSpec, open_source
    from netdoctor.probe.config import ProbeConfig
    from netdoctor.probe.engine import progress_bar

    started = settings.started or time.monotonic()
    budget_s = settings.time_budget
    config = ProbeConfig(
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        optimizer=settings.optimizer,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        loss=settings.loss,
        seed=opts.seed,
        device=settings.device,
        precision=settings.precision,
    )
    config.validate()
    loaded, notes = _load(target, opts, config)
    spec = DataSpec(
        settings.data,
        data_dir=Path(settings.data_dir).expanduser() if settings.data_dir else None,
        batch_size=config.batch_size,
        resize=settings.resize,
        raw=settings.raw,
        normalize=settings.normalize,
        seed=config.seed,
        download=settings.download,
        mirror=settings.data_mirror,
        input_shape=opts.input_shape,
        input_dtype=opts.input_dtype,
    )
    if spec.source.strip().lower() == "synthetic":
        from netdoctor.data.fitting import fit_synthetic

        fit_synthetic(spec, loaded.model, notes)
    source = open_source(spec)
    sample = _sample(source, spec, config)
    if opts.input_shape is None and sample.x.dim() >= 2:
        opts.input_shape = tuple(sample.x.shape[1:])
        if not sample.x.is_floating_point() and sample.x.dtype != torch.uint8:
            opts.input_dtype = "long"  # token ids

    progress = progress_bar(sys.stderr.isatty())
    times: dict[str, float] = {}
    with progress or nullcontext():
        with _phase(progress, "static checks", times, "check_s"):
            report = check_loaded(loaded, opts)
        report.command = "probe"
        report.notes[:0] = notes
        with _phase(progress, "data rules", times, "data_rules_s"):
            from netdoctor.check import check_data

            check_data(report, loaded, sample, opts)  # ND3xx on the first batches
        if any(f.rule == "ND002" for f in report.findings):
            report.notes.append(f"probe: {config.describe()}")
            report.notes.append(
                "the probe did not train: the model's forward fails on the data's shape (ND002)"
            )
            return report, None
        probe = _Probe(
            loaded,
            source,
            config,
            opts,
            settings,
            report,
            progress,
            started + budget_s if budget_s else None,
            times,
        )
        return report, _train_and_diagnose(probe)


def _load(target: str, opts: CheckOptions, config: ProbeConfig) -> tuple[LoadedModel, list[str]]:
    """The one model the target names, built under the probe's seed (its own initialisation is
    part of the experiment), and the loader's notes."""
    from netdoctor.loading.target import load

    result = load(target, opts.kwargs, seed=config.seed, defer=False)  # it trains the weights
    if result.onnx_files and not result.models:
        raise UserError(
            f"{target}: the probe trains a PyTorch model; an ONNX graph cannot be "
            "trained (use file.py:ClassName)"
        )
    if not result.models:
        raise UserError(
            f"{target}: no buildable nn.Module found"
            + (f" ({'; '.join(result.notes)})" if result.notes else "")
        )
    if len(result.models) > 1:
        names = ", ".join(m.target for m in result.models)
        raise UserError(
            f"{target} holds {len(result.models)} models ({names}): the probe trains "
            "one, name it with file.py:ClassName"
        )
    return result.models[0], list(result.notes)


def _train_and_diagnose(probe: _Probe) -> TrainingRun:
    """The probe's run, the runtime rules, the root causes and the verified fix (torch's
    thread count is restored afterwards if the time budget changed it)."""
    import torch

    threads = torch.get_num_threads()
    budget_s = probe.settings.time_budget  # set when there is a deadline
    try:
        if probe.deadline is not None and budget_s is not None:
            from netdoctor.probe.budget import plan

            with _phase(probe.progress, "timing a step", probe.phase_times, "plan_s"):
                probe.plan = plan(
                    probe.loaded.model,
                    probe.source,
                    probe.config,
                    probe.deadline,
                    budget_s,
                    batch_given=probe.settings.batch_given,
                )
            if probe.plan.one_thread:
                torch.set_num_threads(1)
                probe.report.notes.append(
                    f"the probe ran torch on 1 thread instead of {threads}: "
                    "on this machine (busy, or limited to fewer cores than "
                    "torch sees) one thread was faster"
                )
            probe.config = probe.plan.config
            probe.report.notes.extend(probe.plan.notes)
        return _run_and_diagnose(probe)
    finally:
        torch.set_num_threads(threads)


def _run_and_diagnose(probe: _Probe) -> TrainingRun:
    from netdoctor.probe.engine import run_probe
    from netdoctor.probe.measurements import measurements, probe_curves
    from netdoctor.rules.contexts import RuntimeContext
    from netdoctor.rules.engine import judge, revise_after_training, run_rules

    report, loaded, config, plan = probe.report, probe.loaded, probe.config, probe.plan
    requested = config.steps
    overfit = None
    if plan is not None:
        from netdoctor.probe.budget import overfit_fits

        overfit = overfit_fits(plan, config.batch_limit or config.batch_size, report.notes)
    try:
        run = run_probe(
            loaded.model,
            probe.source,
            config,
            sites=probe.sites(),
            progress=probe.progress,
            budget_s=plan.main_s if plan else None,
            overfit=overfit,
        )
    except UserError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"the model raised during the probe's training step: {type(e).__name__}: {first}"
        ) from e
    report.notes.append(f"probe: {run.config.describe()}")
    budget_s = probe.settings.time_budget  # set when there is a deadline
    if probe.deadline is not None and budget_s is not None:
        from netdoctor.probe.budget import steps_note

        note = steps_note(requested, run, budget_s)
        if note:
            report.notes.append(note)
    if run.skipped_steps:
        n, taken = len(run.skipped_steps), run.steps_run - len(run.skipped_steps)
        report.notes.append(
            f"the GradScaler skipped {n} of {run.steps_run} steps (steps "
            f"{_steps_text(run.skipped_steps)}): their float16 gradients overflowed, so no "
            f"weight moved and its scale came down; the rules read the {taken} steps taken"
        )
    run.target = loaded.target
    run.prior_rules = {f.rule for f in report.findings}
    if run.stopped in ("labels", "non-finite-input") and run.bad_batch is not None:
        _bad_batch_rules(probe, run)
    if run.stopped == "labels":
        report.notes.append(
            "the probe did not train: the labels do not fit the model's "
            "outputs (ND303); fix them first"
        )
    rules = probe.opts.rules
    found = run_rules(RuntimeContext(loaded.target, run), rules)
    judge(report, found, [loaded.class_location], loaded.user_site())
    revise_after_training(report.findings, run, rules)
    report.measurements = measurements(run)
    report.curves = probe_curves(run)
    timings = report.measurements["probe"]["timings_s"]
    timings.update({k: round(v, 3) for k, v in probe.phase_times.items()})
    if probe.settings.verify:
        from netdoctor.probe.verify import verify

        t = time.perf_counter()
        vf, notes, fix_curve = verify(
            loaded.model, probe.source, run, report, rules, probe.progress, probe.deadline
        )
        timings["verify_s"] = round(time.perf_counter() - t, 3)
        if vf is not None:
            report.measurements["verified_fix"] = vf
            report.curves.fix = fix_curve
        report.notes.extend(notes)
    if run.stopped == "non-finite":
        report.notes.append(f"the probe stopped at step {run.steps_run}: non-finite values (ND401)")
    if probe.settings.plot:
        from netdoctor.report.plot import write_plot

        write_plot(run, probe.settings.plot, loaded.target)
        report.notes.append(f"gradient-flow plot written to {probe.settings.plot}")
    return run


def _steps_text(steps: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    parts: list[str] = []
    start = prev = steps[0]
    for s in [*steps[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ", ".join(parts)


@contextmanager
def _phase(
    progress: Progress | None, label: str, times: dict[str, float] | None = None, key: str = ""
) -> Iterator[None]:
    """A phase without steps: a spinner line (only on a terminal), and its wall time."""
    task = progress.add_task(label, total=None) if progress is not None else None
    t = time.perf_counter()
    try:
        yield
    finally:
        if times is not None and key:
            times[key] = time.perf_counter() - t
        if progress is not None and task is not None:
            progress.remove_task(task)


def _sample(source: DataSource, spec: DataSpec, config: ProbeConfig) -> DataSample:
    """The first batches, as the data rules see them (with the loss the probe trains with):
    four, or one of ImageNet-sized inputs (a batch of them is plenty for the statistics)."""
    from netdoctor.data.sample import DataSample

    big = math.prod(source.sample_shape or ()) > 100_000
    return replace(
        DataSample.from_source(source, n_batches=1 if big else 4, spec=spec), loss=config.loss
    )


def _bad_batch_rules(probe: _Probe, run: TrainingRun) -> None:
    """The probe stopped on a batch the data rules' sample did not include: check that batch
    for the labels and non-finite values that stopped it."""
    from netdoctor.data.sample import DataSample
    from netdoctor.rules.contexts import DataContext
    from netdoctor.rules.engine import judge, run_rules

    assert run.bad_batch is not None
    have = {f.rule for f in probe.report.findings}
    x, y = run.bad_batch
    sample = DataSample(
        x=x,
        y=y,
        description="the batch the probe stopped on",
        num_outputs=run.num_outputs,
        output_shape=None,
        loss=run.config.loss,
    )
    found = run_rules(DataContext(probe.loaded.target, sample), probe.opts.rules)
    new = [f for f in found if f.rule in ("ND303", "ND304") and f.rule not in have]
    judge(probe.report, new, [probe.loaded.class_location], probe.loaded.user_site())
