"""Everything `netdoctor probe` does between parsing and printing: load the model, open the
data, run the static and data rules, the instrumented run, the runtime rules and the verified fix.
Returns the report (the CLI prints it)."""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from netdoctor.errors import UserError


def probe_target(
    target: str, data_source: str, opts, settings: dict[str, Any], plot: str | None = None
):
    """Everything `probe` does, minus parsing and printing: returns (Report, ProbeRun|None).

    `settings["time_budget"]` (seconds, None for no budget) bounds the whole probe, counted
    from `settings["started"]` (time.monotonic() when the command began; default: now)."""
    started = settings.get("started") or time.monotonic()
    settings = {**settings, "phase_times": {}}  # seconds per phase, for the JSON report
    budget_s = settings.get("time_budget")
    deadline = started + budget_s if budget_s else None
    import torch

    from netdoctor.check import check_loaded
    from netdoctor.data import DataSpec, open_source
    from netdoctor.loading.target import load
    from netdoctor.probe.engine import ProbeConfig, progress_bar

    config = ProbeConfig(
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        optimizer=settings["optimizer"],
        momentum=settings["momentum"],
        weight_decay=settings["weight_decay"],
        loss=settings["loss"],
        seed=settings["seed"],
        device=settings["device"],
    )
    config.validate()
    # The model's own initialisation is part of the experiment: built under the probe's seed.
    result = load(target, opts.kwargs, seed=config.seed)
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
    loaded = result.models[0]

    spec = DataSpec(
        data_source,
        data_dir=Path(settings["data_dir"]).expanduser() if settings["data_dir"] else None,
        batch_size=config.batch_size,
        resize=settings["resize"],
        raw=settings["raw"],
        normalize=settings["normalize"],
        seed=config.seed,
        download=settings.get("download", True),
        mirror=settings.get("data_mirror"),
        input_shape=opts.input_shape,
        input_dtype=opts.input_dtype,
    )
    notes: list[str] = list(result.notes)
    if spec.source.strip().lower() == "synthetic":
        _synthetic_spec(spec, loaded.model, notes)
    source = open_source(spec)
    sample = _sample(source, spec, config)
    if opts.input_shape is None and sample is not None and sample.x.dim() >= 2:
        opts.input_shape = tuple(sample.x.shape[1:])
        if not sample.x.is_floating_point() and sample.x.dtype != torch.uint8:
            opts.input_dtype = "long"  # token ids

    progress = progress_bar(sys.stderr.isatty())
    times = settings["phase_times"]
    with progress or nullcontext():
        with _phase(progress, "static checks", times, "check_s"):
            report = check_loaded(loaded, opts)
        report.command = "probe"
        report.notes[:0] = notes
        with _phase(progress, "data rules", times, "data_rules_s"):
            _data_rules(report, loaded, sample, opts)
        if any(f.rule == "ND002" for f in report.findings):
            report.notes.append(f"probe: {config.describe()}")
            report.notes.append(
                "the probe did not train: the model's forward fails on the data's shape (ND002)"
            )
            return report, None
        return _train_and_diagnose(
            report, loaded, source, config, opts, settings, progress, deadline, budget_s, plot
        )


def _train_and_diagnose(
    report, loaded, source, config, opts, settings, progress, deadline, budget_s, plot
):
    """The probe's run, the runtime rules, the root causes and the verified fix (torch's
    thread count is restored afterwards if the time budget changed it)."""
    import torch

    sites = {}
    for name, module in loaded.model.named_modules():
        loc = loaded.provenance.site(module)
        if loc is not None:
            sites[name] = loc
        elif name == "" and loaded.class_location is not None:
            sites[name] = loaded.class_location
    pl = None
    threads = torch.get_num_threads()
    try:
        if deadline is not None:
            from netdoctor.probe.budget import plan

            with _phase(progress, "timing a step", settings["phase_times"], "plan_s"):
                pl = plan(
                    loaded.model,
                    source,
                    config,
                    deadline,
                    budget_s,
                    batch_given=bool(settings.get("batch_given")),
                )
            if pl.one_thread:
                torch.set_num_threads(1)
                report.notes.append(
                    f"the probe ran torch on 1 thread instead of {threads}: "
                    "on this machine (busy, or limited to fewer cores than "
                    "torch sees) one thread was faster"
                )
            config = pl.config
            report.notes.extend(pl.notes)
        return _run_and_diagnose(
            report,
            loaded,
            source,
            config,
            opts,
            settings,
            progress,
            deadline,
            budget_s,
            plot,
            sites,
            pl,
        )
    finally:
        torch.set_num_threads(threads)


def _run_and_diagnose(
    report, loaded, source, config, opts, settings, progress, deadline, budget_s, plot, sites, plan
):
    from netdoctor.check import run_rules
    from netdoctor.probe.diagnose import link_causes, settle_data_findings
    from netdoctor.probe.engine import run_probe
    from netdoctor.rules import Context
    from netdoctor.suppress import is_suppressed

    requested = config.steps
    overfit = None
    if plan is not None:
        from netdoctor.probe.budget import overfit_fits

        overfit = overfit_fits(plan, config.batch_limit or config.batch_size, report.notes)
    try:
        run = run_probe(
            loaded.model,
            source,
            config,
            sites=sites,
            progress=progress,
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
    if deadline is not None:
        from netdoctor.probe.budget import steps_note

        note = steps_note(requested, run, budget_s)
        if note:
            report.notes.append(note)
    run.target = loaded.target
    run.prior_rules = {f.rule for f in report.findings}
    if run.stopped in ("labels", "non-finite-input") and run.bad_batch is not None:
        _bad_batch_rules(report, loaded, run, opts)
    if run.stopped == "labels":
        report.notes.append(
            "the probe did not train: the labels do not fit the model's "
            "outputs (ND303); fix them first"
        )
    ctx = Context(target=loaded.target, run=run, options=opts.rule_options)
    class_lines = [loaded.class_location] if loaded.class_location else []
    for f in run_rules(ctx, {"runtime"}, opts):
        if is_suppressed(f, class_lines):
            report.notes.append(
                f"{f.rule} at {f.location} suppressed by a netdoctor: ignore comment"
            )
        else:
            report.findings.append(f)
    link_causes(report.findings)
    settle_data_findings(report.findings, run, opts.rule_options)
    report.measurements = measurements(run)
    report.measurements["probe"]["timings_s"].update(
        {k: round(v, 3) for k, v in settings.get("phase_times", {}).items()}
    )
    if settings.get("verify", True):
        from netdoctor.probe.verify import verify

        t = time.perf_counter()
        vf, notes = verify(loaded.model, source, run, report, progress, deadline)
        report.measurements["probe"]["timings_s"]["verify_s"] = round(time.perf_counter() - t, 3)
        if vf is not None:
            report.measurements["verified_fix"] = vf
        report.notes.extend(notes)
    if run.stopped == "non-finite":
        report.notes.append(f"the probe stopped at step {run.steps_run}: non-finite values (ND401)")
    if plot:
        from netdoctor.report.plot import write_plot

        write_plot(run, plot, loaded.target)
        report.notes.append(f"gradient-flow plot written to {plot}")
    return report, run


@contextmanager
def _phase(progress, label: str, times: dict[str, float] | None = None, key: str = ""):
    """A phase without steps: a spinner line (only on a terminal), and its wall time."""
    task = progress.add_task(label, total=None) if progress is not None else None
    t = time.perf_counter()
    try:
        yield
    finally:
        if times is not None and key:
            times[key] = time.perf_counter() - t
        if task is not None:
            progress.remove_task(task)


def _synthetic_spec(spec, model, notes: list[str]) -> None:
    """Synthetic data shaped for the model: the input shape (given or inferred), token ids below
    its embedding's vocabulary, and as many classes as it has outputs."""
    from netdoctor.loading.forward import ForwardFailure, example_input, run_forward
    from netdoctor.loading.shapes import first_layer, infer

    vocab = None
    found = first_layer(model)
    if found is not None and hasattr(found[1], "num_embeddings"):
        vocab = int(found[1].num_embeddings)
    if spec.input_shape is None:
        inferred, _, _ = infer(model)
        if inferred is None:
            raise UserError(
                "synthetic data needs an input shape and none could be inferred "
                "from the model: pass --input-shape C,H,W"
            )
        notes.append(
            f"synthetic input shape {inferred.describe()} inferred from "
            f"{inferred.inferred_from}; pass --input-shape to set it"
        )
        spec.input_shape, spec.input_dtype = tuple(inferred.shape), inferred.dtype
        vocab = inferred.vocab or vocab
    if spec.input_dtype in ("long", "int64") and vocab:
        spec.vocab_size = spec.vocab_size or min(vocab, 100)
    if spec.num_classes is None:
        try:
            out = run_forward(
                model, example_input(tuple(spec.input_shape), spec.input_dtype, vocab=vocab)
            )
        except ForwardFailure:
            return
        from netdoctor.loading.forward import main_output

        logits = main_output(out)
        if logits is None:
            return
        shape = tuple(spec.input_shape)
        if logits.dim() == 2 and logits.shape[1] >= 2:
            spec.num_classes = int(logits.shape[1])
        elif (
            logits.dim() == 3
            and spec.input_dtype in ("long", "int64")
            and tuple(logits.shape[1:2]) == shape[:1]
            and logits.shape[2] >= 2
        ):
            spec.num_classes, spec.target_shape = int(logits.shape[2]), shape[:1]  # a tagger
        elif (
            logits.dim() == 4
            and len(shape) >= 2
            and tuple(logits.shape[2:]) == shape[-2:]
            and logits.shape[1] >= 2
        ):
            spec.num_classes, spec.target_shape = int(logits.shape[1]), shape[-2:]  # per pixel


def _sample(source, spec, config):
    """The first batches, as the data rules see them (with the loss the probe trains with):
    four, or one of ImageNet-sized inputs (a batch of them is plenty for the statistics)."""
    try:
        from netdoctor.rules.data import DataSample
    except ImportError:  # pragma: no cover - data rules not available
        return None
    from dataclasses import replace

    big = math.prod(source.sample_shape or ()) > 100_000
    return replace(
        DataSample.from_source(source, n_batches=1 if big else 4, spec=spec), loss=config.loss
    )


def _data_rules(report, loaded, sample, opts) -> None:
    """ND3xx on the first batches, against the model."""
    if sample is None:
        report.notes.append("data rules (ND3xx) are not available in this version")
        return
    from netdoctor.check import check_data

    check_data(report, loaded, sample, opts)


def _bad_batch_rules(report, loaded, run, opts) -> None:
    """The probe stopped on a batch the data rules' sample did not include: check that batch."""
    from netdoctor.check import run_rules
    from netdoctor.rules import Context
    from netdoctor.rules.data import DataSample

    have = {f.rule for f in report.findings}
    x, y = run.bad_batch
    out_shape = None
    sample = DataSample(
        x=x,
        y=y,
        description="the batch the probe stopped on",
        num_outputs=run.num_outputs,
        output_shape=out_shape,
        loss=run.config.loss,
    )
    ctx = Context(target=loaded.target, data=sample, options=opts.rule_options)
    for f in run_rules(ctx, {"data"}, opts):
        if f.rule in ("ND303", "ND304") and f.rule not in have:
            report.findings.append(f)


def measurements(run) -> dict[str, Any]:
    """What the JSON report carries (and the text report draws)."""
    from netdoctor.rules.runtime import gradient_flow, mean

    acts = []
    for a in run.activations:
        w = a.window_steps or run.window
        acts.append(
            {
                "name": a.name,
                "kind": a.kind,
                "module": a.module,
                "producer": a.producer,
                "functional": a.functional,
                "units": a.units or None,
                "dead_fraction": a.dead_fraction,
                "dead_units": a.dead_units,
                "zero_fraction": mean(a.zero_fraction[-w:]) if a.zero_fraction else None,
                "saturation": mean(a.saturation[-run.window :]) if a.saturation else None,
                "location": a.location.to_dict() if a.location else None,
            }
        )
    c = run.num_outputs
    out: dict[str, Any] = {
        "gradient_flow": gradient_flow(run) if run.steps_run else [],
        "loss_curve": list(run.loss),
        "accuracy_curve": list(run.accuracy),
        "activations": acts,
        "loss_at_init": run.loss[0] if run.loss else None,
        "chance": run.chance,  # accuracy of always predicting the most common class
        "expected_initial_loss": math.log(c)
        if c and c > 1 and run.classification and run.config.loss == "cross_entropy"
        else None,
        "probe": {
            "steps": run.steps_run,
            "steps_requested": run.config.requested_steps or run.config.steps,
            "batch_size": min(
                run.config.batch_size, run.config.batch_limit or run.config.batch_size
            ),
            "optimizer": run.config.optimizer,
            "lr": run.config.learning_rate,
            "momentum": run.config.momentum if run.config.optimizer == "sgd" else None,
            "weight_decay": run.config.weight_decay,
            "loss": run.config.loss,
            "seed": run.config.seed,
            "device": run.device,
            "stopped": run.stopped,
            "timings_s": {k: round(v, 3) for k, v in run.timings.items()},
        },
    }
    if run.train_eval is not None:
        out["train_eval"] = run.train_eval
    if run.overfit is not None:
        out["overfit"] = run.overfit
    if run.nonfinite is not None:
        from dataclasses import asdict

        out["non_finite"] = asdict(run.nonfinite)
    return out
