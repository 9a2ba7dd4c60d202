"""The probe's own short training run.

`run_probe(model, source, config)` trains a deep copy of `model` for `config.steps` steps on
batches from a `netdoctor.data.DataSource` (fed exactly as the source serves them) and returns the
`TrainingRun` the runtime rules (ND4xx) read, measured with the shared instruments of
`netdoctor.measure`:

* per step: loss, accuracy, per-parameter gradient norms, weight norms and update/weight ratios
  (`ParamMeter`);
* per activation site: zero fraction and saturation per step, and which units were ever active
  over the last part of the probe (`window`) (`ActivationRecorder`);
* the first non-finite value: the step and the module that produced it (`localize_forward`), or
  the first parameter whose gradient went non-finite;
* under `--precision fp16|bf16` (`netdoctor.probe.amp`): each module's max |output|, the float16
  headroom (`ModuleHeadroom`), and the steps a float16 run's GradScaler skipped (and its
  scale after each step);
* train- vs eval-mode outputs at the end (BatchNorm running statistics), and a separate
  overfit-one-batch run on a fresh copy (`netdoctor.probe.end_checks`).

Instrumentation is hooks on the probe's own copy plus a TorchFunctionMode around each forward;
both are always removed (finally). The user's model object is never modified.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from netdoctor.errors import UserError
from netdoctor.findings import Location
from netdoctor.loading.forward import main_output
from netdoctor.measure.activations import ActivationRecorder
from netdoctor.measure.nonfinite import first_bad_grad, localize_forward, rng_state, tensor_stats
from netdoctor.measure.params import ParamMeter
from netdoctor.measure.record import NonFinite, TrainingRun
from netdoctor.measure.targets import (
    IGNORE_INDEX,
    bad_labels,
    check_targets,
    class_axis_last,
    class_targets,
    compute_loss,
    num_outputs,
)
from netdoctor.probe.amp import autocast, grad_scaler
from netdoctor.probe.config import ProbeConfig
from netdoctor.probe.end_checks import overfit_one_batch, train_eval_gap

if TYPE_CHECKING:
    from rich.progress import Progress

    from netdoctor.data.base import DataSource

#: Whether to run the overfit-one-batch check: yes, no, or decided on the finished run.
OverfitChoice = bool | Callable[[TrainingRun], bool] | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def make_optimizer(params: list[nn.Parameter], config: ProbeConfig) -> torch.optim.Optimizer:
    lr = config.learning_rate
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay or 0.01)


def progress_bar(enabled: bool) -> Progress | None:
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _train_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def run_probe(
    model: nn.Module,
    source: DataSource,
    config: ProbeConfig,
    *,
    sites: dict[str, Location] | None = None,
    instrument: bool = True,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Progress | None = None,
    label: str = "probe",
    overfit: OverfitChoice = None,
    train_eval: bool | None = None,
    budget_s: float | None = None,
) -> TrainingRun:
    """Train a deep copy of `model` on `config.steps` batches of `source` and measure it.

    `source`: a DataSource (its `batches(n)` is deterministic for the seed it was opened with).
    `transform`: applied to each input batch (the verify step's in-memory data fixes).
    `instrument=False` records only loss and accuracy (cheap re-runs).
    `budget_s`: seconds the training loop may take; the number of steps (at most
    `config.steps`) is then chosen from the measured time of the first steps, and
    `run.config.steps` says what was chosen.
    `overfit` / `train_eval`: run those checks (None: when instrumented); `overfit` may also be
    a function of the finished run that decides (the time budget's check).
    """
    config.validate()
    device = resolve_device(config.device)
    # The caller's random state is left as it was (the probe seeds its own).
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=cuda):
        return _run_probe(
            model,
            source,
            config,
            device,
            sites=sites,
            instrument=instrument,
            transform=transform,
            progress=progress,
            label=label,
            overfit=overfit,
            train_eval=train_eval,
            budget_s=budget_s,
        )


def _unrecord(meter: ParamMeter) -> None:
    """Forget the step a GradScaler skipped: its gradients overflowed and no weight moved."""
    for trace, had in zip(meter.traces, meter.have):
        trace.grad_norm.pop()
        trace.weight_norm.pop()
        trace.steps_with_grad -= int(had)
    meter.discard()


def _window_start(steps: int, window: float) -> int:
    return steps - max(1, int(round(steps * window)))


def steps_that_fit(done: int, elapsed: float, step_s: float, budget_s: float, most: int) -> int:
    """How many steps in all, `done` of them taken in `elapsed` seconds, fit `budget_s` at
    `step_s` per step (at most `most`, at least the ones done)."""
    more = int((budget_s - elapsed) / step_s) if step_s > 0 else most
    return max(done, min(most, done + max(0, more)))


def _run_probe(
    model: nn.Module,
    source: DataSource,
    config: ProbeConfig,
    device: torch.device,
    *,
    sites: dict[str, Location] | None,
    instrument: bool,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    progress: Progress | None,
    label: str,
    overfit: OverfitChoice,
    train_eval: bool | None,
    budget_s: float | None,
) -> TrainingRun:
    torch.manual_seed(config.seed)
    try:
        net = copy.deepcopy(model)
    except Exception as e:
        raise UserError(f"cannot copy the model for the probe ({type(e).__name__}: {e})") from None
    net = net.to(device)
    net.train()
    run = TrainingRun(config=config, device=str(device), sites=dict(sites or {}))
    run.precision = config.precision
    amp = autocast(config.precision, device)
    scaler = grad_scaler(config.precision, device)
    run.module_types = {n: type(m).__name__ for n, m in net.named_modules()}
    named = _train_params(net)
    run.frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    if not named:
        raise UserError("the model has no trainable parameters: nothing to probe")
    params = [p for _, p in named]
    opt = make_optimizer(params, config)
    meter = ParamMeter(named, run.module_types) if instrument else None
    recorder = ActivationRecorder(net, sites) if instrument else None
    steps = config.steps
    window_start = _window_start(steps, config.window)
    label_counts: torch.Tensor | None = None
    pred_counts: torch.Tensor | None = None
    first_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    t0 = time.perf_counter()
    first_step_s = step_s = 0.0
    task = progress.add_task(label, total=steps) if progress is not None else None

    batches = source.batches(config.steps)
    limit = config.batch_limit
    try:
        with recorder.attached() if recorder else nullcontext():
            for step in range(config.steps):
                if step >= steps:
                    break
                if (
                    budget_s is not None
                    and step >= 2
                    and time.perf_counter() - t0 + step_s > 1.05 * budget_s
                ):
                    steps = step  # the steps were slower than the first ones
                    break
                try:
                    x, y = next(batches)
                except StopIteration:
                    run.stopped = run.stopped or "no-data"
                    break
                if limit is not None and x.shape[0] > limit:
                    x, y = x[:limit], y[:limit]
                if transform is not None:
                    x = transform(x)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if first_batch is None:
                    first_batch = (x, y)
                if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                    run.stopped = "non-finite-input"
                    run.nonfinite = NonFinite(
                        step + 1,
                        "input",
                        input_stats=tensor_stats(x),
                        detail="the input batch holds non-finite values",
                    )
                    run.bad_batch = (x.cpu(), y.cpu())
                    break
                if recorder:
                    recorder.in_window = step >= window_start
                rng = rng_state(device) if instrument else None
                opt.zero_grad(set_to_none=True)
                with amp(), recorder.forward() if recorder else nullcontext():
                    out = net(x)
                logits = main_output(out)
                if logits is None:
                    raise UserError(
                        "the model's forward returned no tensor "
                        f"({type(out).__name__}); the probe needs logits"
                    )
                if step == 0:
                    check_targets(logits, y, config.loss)
                    run.classification = class_targets(logits, y)
                    run.num_outputs = num_outputs(logits, y) if run.classification else None
                if bad_labels(logits, y, config.loss):
                    run.stopped = "labels"
                    run.bad_batch = (x.cpu(), y.cpu())
                    if recorder:
                        recorder.discard_pending()
                    break
                with amp():
                    loss, correct = compute_loss(config.loss, logits.float(), y)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)  # the meter measures the true gradients
                else:
                    loss.backward()
                scalars = [loss] if correct is None else [loss, correct]
                vals = (
                    meter.before_step(scalars)
                    if meter
                    else torch.stack([v.detach().float().reshape(()) for v in scalars]).tolist()
                )
                loss_v = vals[0]
                acc = None
                if correct is not None:
                    count = y.numel() if y.dim() else 1
                    if config.loss == "cross_entropy":
                        count = int((y != IGNORE_INDEX).sum()) or 1
                    acc = vals[1] / count
                run.loss.append(loss_v)
                run.accuracy.append(acc)
                if run.classification:
                    c = run.num_outputs or 1
                    yy = y.reshape(-1).long()
                    yy = yy[(yy >= 0) & (yy < max(c, 2))]
                    bc = torch.bincount(yy, minlength=max(c, 2))
                    label_counts = bc if label_counts is None else label_counts + bc
                    if step >= window_start:
                        lg = logits.detach()
                        lg = lg.movedim(-1, 1) if class_axis_last(lg, y) else lg
                        pred = (
                            lg.argmax(1).reshape(-1)
                            if lg.dim() >= 2 and lg.shape[1] > 1
                            else (lg.reshape(-1) > 0).long()
                        )
                        pc = torch.bincount(pred, minlength=max(c, 2))
                        pred_counts = pc if pred_counts is None else pred_counts + pc
                bad_grad = bool(meter and meter.bad_grad)
                # a finite loss with overflowing float16 gradients: the scaler skips the step
                # and lowers its scale (its calibration), so the run goes on, and the rules
                # read the steps taken (`measured_steps`)
                skip = scaler is not None and bad_grad and math.isfinite(loss_v)
                if recorder:
                    recorder.discard_pending() if skip else recorder.flush_step()
                run.steps_run = step + 1
                if not math.isfinite(loss_v) or (bad_grad and not skip):
                    run.stopped = "non-finite"
                    if meter is not None and recorder is not None:  # instrumented
                        if not math.isfinite(loss_v):
                            with amp():  # the replay overflows where the step did
                                run.nonfinite = localize_forward(
                                    net, x, y, config.loss, step + 1, rng, device
                                )
                        else:
                            run.nonfinite = first_bad_grad(meter.traces, step + 1, recorder.order)
                    else:
                        run.nonfinite = NonFinite(
                            step + 1, "loss" if not math.isfinite(loss_v) else "gradient"
                        )
                    break
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                    run.scale.append(float(scaler.get_scale()))  # the report's scale curve
                else:
                    opt.step()
                if skip and meter is not None:
                    run.skipped_steps.append(step + 1)
                    _unrecord(meter)
                elif meter:
                    meter.after_step()
                if budget_s is not None:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    elapsed = time.perf_counter() - t0
                    if step == 0:
                        first_step_s = step_s = elapsed
                    else:
                        step_s = (elapsed - first_step_s) / step  # the first step warms up
                    if step < 2:
                        steps = steps_that_fit(step + 1, elapsed, step_s, budget_s, config.steps)
                        window_start = _window_start(steps, config.window)
                        if progress is not None and task is not None:
                            progress.update(task, total=steps)
                if progress is not None and task is not None:
                    progress.update(task, advance=1)
    finally:
        if progress is not None and task is not None:
            progress.remove_task(task)
    run.timings["train_s"] = time.perf_counter() - t0
    if steps != config.steps:
        run.config = config = replace(config, steps=steps, requested_steps=config.steps)
    if label_counts is not None:
        run.label_counts = [int(v) for v in label_counts.tolist()]
    if pred_counts is not None:
        run.pred_counts = [int(v) for v in pred_counts.tolist()]
    if run.skipped_steps:
        skipped = set(run.skipped_steps)
        run.measured_steps = [s for s in range(1, run.steps_run + 1) if s not in skipped]
    if recorder is not None and meter is not None:
        run.activations = recorder.finish()
        run.headroom = recorder.headroom()
        order = {name: i for i, name in enumerate(recorder.order)}
        run.params = sorted(meter.traces, key=lambda t: order.get(t.module, len(order)))
        run.layer_order = list(recorder.order)

    do_te = (instrument if train_eval is None else train_eval) and config.settle_batches > 0
    if (
        do_te
        and first_batch is not None
        and run.stopped not in ("non-finite", "labels", "non-finite-input")
    ):
        t1 = time.perf_counter()

        def settle() -> Iterator[torch.Tensor]:
            for xs, _ in source.batches(config.settle_batches):
                xs = xs[:limit] if limit is not None else xs
                xs = transform(xs) if transform is not None else xs
                yield xs.to(device, non_blocking=True)

        run.train_eval = train_eval_gap(net, first_batch[0], first_batch[1], config.loss, settle())
        run.timings["train_eval_s"] = time.perf_counter() - t1
    do_of = instrument if overfit is None else overfit
    if callable(do_of):
        do_of = do_of(run)
    if (
        do_of
        and config.overfit_steps > 0
        and first_batch is not None
        and run.stopped not in ("labels", "non-finite-input")
    ):
        t1 = time.perf_counter()
        run.overfit = overfit_one_batch(
            model, first_batch[0], first_batch[1], config, device, progress
        )
        run.timings["overfit_s"] = time.perf_counter() - t1
    return run
