"""Fitting the probe into a time budget (`--time-budget`, default 60 s).

Unless `--steps` is given, the whole probe command -- static checks, data rules, the training
run, the overfit-one-batch and train/eval checks and the verified fix -- has to end within the
budget. When the training starts, `plan` times a forward pass of a few samples. When the probe
as asked (its steps, the extra checks and ~`VERIFY_RUNS` re-runs for the verified fix) fits
the time that is left, nothing changes. Otherwise the time left is split: `MAIN_SHARE` for the
probe's own run (which picks its step count from its own measured step time,
`engine.run_probe(budget_s=...)`), up to `EXTRA_SHARE` for the overfit and train/eval checks,
the rest for the verified fix's re-runs (each is started only when it fits); the overfit check
runs when, measured against the probe's own step time, it leaves room for one such re-run
(`overfit_fits`). A model so big that
`MIN_STEPS` steps at the requested batch size would not fit trains on smaller batches (the
first samples of each batch, down to `MIN_BATCH`), unless `--batch-size` was given. Every
reduction is said in a note.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from netdoctor.loading.forward import preserved_modes
from netdoctor.measure.record import TrainingRun
from netdoctor.probe.config import ProbeConfig, probe_config
from netdoctor.probe.engine import resolve_device

if TYPE_CHECKING:
    from netdoctor.data.base import DataSource

DEFAULT_BUDGET_S = 60.0
MIN_STEPS = 10  # the loss-trend rules (ND407, ND409) need this many
MIN_BATCH = 2  # BatchNorm needs two samples
MIN_TRAIN_EVAL_BATCH = 16  # smaller batches make the train/eval check (ND411) noise
MAIN_SHARE = 0.35  # of the time left when training starts: the probe's own run
EXTRA_SHARE = 0.15  # the overfit-one-batch run and the train/eval check
VERIFY_RUNS = 1.5  # re-runs of the probe's length kept for the verified fix (when it fits)
STEP_PER_FORWARD = 3.5  # a measured training step (forward, backward, update, instruments)
# costs about this many no-grad forwards of the same batch
TIMED_SAMPLES = 4
CHEAP_FORWARD_S = 0.05  # forwards cheaper than this are timed five times (medians)
THREAD_TEST_MAX_S = 3.0  # a forward of 2 this slow is not timed again on one thread
ONE_THREAD_GAIN = 0.6  # one thread is used when it takes at most this share of the time


@dataclass
class Plan:
    deadline: float  # time.monotonic() by which the probe should be done
    budget_s: float
    config: ProbeConfig  # batch limit, overfit steps and settle batches that fit
    main_s: float  # seconds the probe's own run may take
    step_estimate_s: float  # a training step at the planned batch size, estimated
    notes: list[str] = field(default_factory=list)
    one_thread: bool = False  # run torch on one intra-op thread (it was clearly faster)

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class ForwardCost:
    fixed: float  # seconds of a no-grad forward that do not grow with the batch
    per_sample: float  # seconds per sample
    one_thread: bool  # one intra-op thread ran it clearly faster (see `measure_forward`)


def measure_forward(model: nn.Module, x: torch.Tensor, device: torch.device) -> ForwardCost:
    """Time no-grad forwards of 2 and `TIMED_SAMPLES` samples on a copy of `model` in train
    mode (as in the probe; the copy's BatchNorm statistics absorb the passes; the model has run
    before, in the static checks and data rules, so the process is warm): the part of a
    forward that does not grow with the batch, and the part per sample.

    When the fixed part dominates (many small ops: a small model, or small inputs) and a forward
    takes less than `THREAD_TEST_MAX_S`, it is timed once more with one intra-op thread: on a CPU
    shared with other work, or limited by a container quota torch does not see, every parallel op
    waits for the thread that is not scheduled, and such models can run many times slower with
    several threads than with one. Medians of a few runs where a forward is cheap."""
    net = copy.deepcopy(model).to(device)
    x = x.to(device)
    k = min(TIMED_SAMPLES, x.shape[0])
    small = min(2, k)  # BatchNorm in train mode needs two samples

    def timed(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        net(x[:n])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    def fit() -> tuple[float, float]:
        first = timed(small)
        repeat = 1 if first >= CHEAP_FORWARD_S else 5
        t_small = sorted([first] + [timed(small) for _ in range(repeat - 1)])[repeat // 2]
        if k == small:
            return 0.0, t_small / small
        t_k = sorted(timed(k) for _ in range(max(1, repeat // 2)))[max(1, repeat // 2) // 2]
        per = max(0.0, (t_k - t_small) / (k - small))
        return max(0.0, t_small - per * small), per

    threads = torch.get_num_threads()
    with preserved_modes(net), torch.no_grad():
        net.train()
        multi = fit()
        multi_s = multi[0] + multi[1] * small
        fixed_bound = multi[0] >= 2 * multi[1] * small
        if device.type != "cpu" or threads <= 1 or not fixed_bound or multi_s >= THREAD_TEST_MAX_S:
            return ForwardCost(*multi, False)
        try:
            torch.set_num_threads(1)
            n = 1 if multi_s >= CHEAP_FORWARD_S else 5
            one_s = sorted(timed(small) for _ in range(n))[n // 2]
            if one_s >= ONE_THREAD_GAIN * multi_s:
                return ForwardCost(*multi, False)
            one = fit()  # faster: measure it properly, as the probe will run it
        finally:
            torch.set_num_threads(threads)
    return ForwardCost(*one, True)


def plan(
    model: nn.Module,
    source: DataSource,
    config: ProbeConfig,
    deadline: float,
    budget_s: float,
    batch_given: bool,
) -> Plan:
    """Split the time left until `deadline` between the probe's phases (module docstring)."""
    left = max(0.0, deadline - time.monotonic())
    device = resolve_device(config.device)
    x, _ = next(source.batches(1))
    try:
        cost = measure_forward(model, x, device)
    except Exception:  # the probe's own run will report a forward that fails
        cost = ForwardCost(0.0, 0.0, False)
    fixed, per = cost.fixed, cost.per_sample

    def step_s(b: int) -> float:
        return STEP_PER_FORWARD * (fixed + per * b)

    batch = config.batch_size
    overfit_s = config.overfit_steps * step_s(min(config.overfit_samples, batch))
    settle_s = config.settle_batches * step_s(batch) / STEP_PER_FORWARD
    main_full = config.steps * step_s(batch)
    notes: list[str] = []
    if (1 + VERIFY_RUNS) * main_full + overfit_s + settle_s <= left:
        # everything fits as asked: the main run only guards against a wrong estimate
        return Plan(
            deadline=deadline,
            budget_s=budget_s,
            config=config,
            main_s=left / (1 + VERIFY_RUNS),
            step_estimate_s=step_s(batch),
            one_thread=cost.one_thread,
        )
    main_s = MAIN_SHARE * left
    limit = None
    if not batch_given and per > 0:
        while batch > MIN_BATCH and MIN_STEPS * step_s(batch) > main_s:
            batch = max(MIN_BATCH, batch // 2)
        if batch < config.batch_size:
            limit = batch
            notes.append(
                f"time budget: a training step of batch {config.batch_size} would "
                f"take about {step_s(config.batch_size):.1f} s, so the probe "
                f"trains on the first {batch} samples of each batch (pass "
                "--batch-size or a larger --time-budget to change it)"
            )
    extra = EXTRA_SHARE * left
    settle = config.settle_batches
    settle_s = settle * step_s(batch) / STEP_PER_FORWARD
    if settle and batch < MIN_TRAIN_EVAL_BATCH:
        settle = 0
        notes.append(
            f"time budget: the BatchNorm train/eval check (ND411) was skipped: batches "
            f"of {batch} are too small for BatchNorm statistics to mean much"
        )
    elif settle and settle_s > 0.25 * extra:
        settle = max(1, int(0.25 * extra / max(step_s(batch) / STEP_PER_FORWARD, 1e-9)))
        if settle < config.settle_batches:
            notes.append(
                f"time budget: the train/eval check re-estimates BatchNorm statistics "
                f"on {settle} batch(es) instead of {config.settle_batches}"
            )
    cfg = replace(config, batch_limit=limit, settle_batches=settle)
    return Plan(
        deadline=deadline,
        budget_s=budget_s,
        config=cfg,
        main_s=main_s,
        step_estimate_s=step_s(batch),
        notes=notes,
        one_thread=cost.one_thread,
    )


def steps_note(requested: int, run: TrainingRun, budget_s: float) -> str | None:
    """A note when the budget cut the probe's steps."""
    done = run.config.steps
    if done >= requested:
        return None
    step_s = run.timings.get("train_s", 0.0) / max(1, run.steps_run)
    note = (
        f"time budget: {done} steps instead of {requested} (a step took {step_s:.2f} s; the "
        f"whole probe has {budget_s:g} s): pass --steps N or --time-budget SECONDS to "
        "change it"
    )
    if done < MIN_STEPS:
        note += f"; the loss-trend rules (ND407, ND409) need {MIN_STEPS} steps and were not judged"
    return note


def overfit_fits(plan: Plan, batch: int, notes: list[str]) -> Callable[[TrainingRun], bool]:
    """The time budget's check before the overfit-one-batch run: it runs when, after it, one
    re-run of the probe's length is still left for the verified fix."""

    def decide(run: TrainingRun) -> bool:
        cfg = probe_config(run)
        if not cfg.overfit_steps:
            return False
        per_step = run.timings.get("train_s", 0.0) / max(1, run.steps_run)
        share = min(1.0, max(0.3, min(cfg.overfit_samples, batch) / max(1, batch)))
        cost = cfg.overfit_steps * per_step * share
        reserve = 1.15 * run.timings.get("train_s", 0.0)
        if plan.left() - cost >= reserve:
            return True
        notes.append(
            f"time budget: the overfit-one-batch check (ND412) was skipped: "
            f"{cfg.overfit_steps} steps would take about {cost:.0f} s of the "
            f"{max(0.0, plan.left()):.0f} s left"
        )
        return False

    return decide
