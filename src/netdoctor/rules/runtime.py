"""ND4xx: training dynamics (ctx.run is a netdoctor.measure.record.TrainingRun, filled by the
probe or by the watcher inside the user's training).

Thresholds are options (`[tool.netdoctor.rules.ND404] dead-fraction = 0.5`); their defaults were
calibrated on the fixtures (see each rule's doc in rules/ND4xx.md). Root causes (Finding.cause)
are linked afterwards by netdoctor.probe.diagnose, which sees the static and data findings too.
"""

from __future__ import annotations

import math
from typing import Any

from netdoctor.findings import Fix, Severity
from netdoctor.rules.registry import Context, rule

_BN_TYPES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")


# ------------------------------------------------------------------------------ helpers


def finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean(values) -> float | None:
    v = finite(values)
    return sum(v) / len(v) if v else None


def median(values) -> float | None:
    v = sorted(finite(values))
    if not v:
        return None
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def g(v: Any) -> str:
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return str(f)
    if f == 0:
        return "0"
    if abs(f) >= 1e4 or abs(f) < 1e-3:
        return f"{f:.2e}"
    return f"{f:.3g}"


def pct(v: float) -> str:
    return f"{100 * v:.0f}%" if v < 0.995 or v >= 1 else f"{100 * v:.1f}%"


def layer_grad(p) -> float | None:
    """A weight's typical gradient norm over the probe: the mean over steps that had one."""
    return mean(p.grad_norm)


def gradient_flow(run) -> list[dict[str, Any]]:
    """Rows for the report's gradient-flow table: weight layers in execution order."""
    rows = []
    for p in run.weight_layers():
        rows.append(
            {
                "name": p.module if p.name.endswith(".weight") else p.name,
                "parameter": p.name,
                "grad_norm": layer_grad(p),
                "grad_norm_max": max(finite(p.grad_norm), default=None),
                "weight_norm": p.weight_norm[0] if p.weight_norm else None,
                "update_ratio": median(p.update_ratio),
            }
        )
    return rows


def gradient_ends(run):
    """(first, its gradient norm, last, its gradient norm) over the weight layers, in execution
    order, that received a nonzero gradient; None with fewer than two. Layers whose gradient is
    exactly zero are dead (ND404) or starved (ND410), not vanishing."""
    rows = [(p, layer_grad(p)) for p in run.weight_layers()]
    live = [(p, v) for p, v in rows if v is not None and v > 0]
    if len(live) < 2:
        return None
    (first, g_first), (last, g_last) = live[0], live[-1]
    return first, g_first, last, g_last


def total_grad_norms(run) -> list[float]:
    """The total gradient norm over the weight layers, per step (NaN where none had one)."""
    layers = run.weight_layers()
    totals = []
    for i in range(run.steps_run):
        sq = [
            p.grad_norm[i] ** 2
            for p in layers
            if i < len(p.grad_norm) and not math.isnan(p.grad_norm[i])
        ]
        totals.append(math.sqrt(sum(sq)) if sq else float("nan"))
    return totals


def cut_short(run) -> int | None:
    """The steps a run was meant to take when a time budget cut it short, else None: the
    loss-trend rules then cannot say the model does not learn, only that it had not yet."""
    requested = getattr(run.config, "requested_steps", None)
    return requested if requested and requested > run.steps_run else None


def batch_cut(run) -> tuple[int, int] | None:
    """(samples per step, the batch size asked for) when a time budget made the probe train on
    fewer samples per step; gradients of a few samples are noisier, so update and gradient
    sizes are not the ones the asked-for batch would see."""
    limit = getattr(run.config, "batch_limit", None)
    batch = getattr(run.config, "batch_size", None)
    return (limit, batch) if limit and batch and limit < batch else None


def _batch_cut_text(cut: tuple[int, int]) -> str:
    return (
        f" The time budget cut the batch from {cut[1]} to {cut[0]} samples, whose gradients "
        "are noisier: reported as info (probe with --batch-size or a larger --time-budget "
        "to judge it)."
    )


def early_steps(n: int) -> int:
    """How many of the first steps count as "early": 10%, at least 3."""
    return min(n, max(3, n // 10))


def loss_window(run) -> tuple[float | None, float | None, int]:
    """(mean loss of the first 10% of steps, of the last 10%, window length)."""
    losses = run.loss
    k = max(1, len(losses) // 10)
    return mean(losses[:k]), mean(losses[-k:]), k


_TORCH_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


def optimizer_expr(cfg) -> str:
    """How the fix snippets spell the optimizer's class: the probe's sgd/adam/adamw, or the
    class a watched run trained with (`optimizer_expr` of the watcher's settings: torch.optim.X
    for torch's own, the bare name for the user's)."""
    expr = getattr(cfg, "optimizer_expr", None)
    if expr:
        return expr
    name = _TORCH_OPTIMIZERS.get(str(cfg.optimizer).lower(), str(cfg.optimizer))
    return f"torch.optim.{name}"


def lr_snippet(run, factor: float) -> str:
    cfg = run.config
    lr = cfg.learning_rate * factor
    sgd = str(cfg.optimizer).lower() == "sgd"
    momentum = getattr(cfg, "momentum", None)
    extra = f", momentum={momentum:g}" if sgd and momentum else ""
    return (
        f"optimizer = {optimizer_expr(cfg)}(model.parameters(), lr={lr:g}{extra})  "
        f"# was lr={cfg.learning_rate:g}\n"
    )


def _site(run, module: str | None):
    return run.site(module) if module else None


def _display(module: str | None, run) -> str:
    if module is None:
        return "?"
    if module == "":
        return "the model's own forward"
    t = run.module_types.get(module)
    return f"{module} ({t})" if t else module


# ------------------------------------------------------------------------------ ND401


@rule("ND401", needs="runtime")
def non_finite(ctx: Context):
    run = ctx.run
    ev = run.nonfinite
    if ev is None:
        return
    s = ev.step
    before = finite(run.loss)
    history = (
        f" The loss before it: {g(before[0])} at step 1 -> {g(before[-1])} at step {len(before)}."
        if len(before) >= 2
        else ""
    )
    evidence: dict[str, Any] = {
        "step": s,
        "kind": ev.kind,
        "module": ev.module,
        "module_type": ev.module_type,
        "parameter": ev.parameter,
        "input_stats": ev.input_stats,
        "output_stats": ev.output_stats,
        "bad_parameters": ev.bad_parameters[:20],
        "nonfinite_modules": ev.nonfinite_modules[:50],
        "reproduced": ev.reproduced,
        "lr": run.config.learning_rate,
    }
    lower = Fix(
        f"lower the learning rate ({g(run.config.learning_rate)} -> "
        f"{g(run.config.learning_rate / 10)}) or clip the gradients",
        lr_snippet(run, 0.1) + "# and/or, between loss.backward() and "
        "optimizer.step():\ntorch.nn.utils.clip_grad_norm_(model.parameters(), "
        "max_norm=1.0)\n",
    )
    module = None
    fix = lower
    if ev.kind == "input":
        st = ev.input_stats or {}
        message = (
            f"step {s}: the input batch holds {st.get('nan', '?')} NaN and "
            f"{st.get('inf', '?')} Inf values, so the loss and every gradient are NaN."
        )
        fix = Fix(
            "remove or repair the non-finite samples before training",
            "bad = ~torch.isfinite(x).flatten(1).all(1)\nx, y = x[~bad], y[~bad]\n",
        )
    elif ev.kind == "forward" and ev.module is not None:
        module = ev.module
        ins = ev.input_stats or {}
        outs = ev.output_stats or {}
        where = _display(module, run)
        what = (
            f"its output holds {outs.get('nan', '?')} NaN and {outs.get('inf', '?')} Inf values"
            if outs
            else "its output is non-finite"
        )
        inp = (
            f"its inputs were finite (min {g(ins.get('min'))}, max {g(ins.get('max'))}, "
            f"mean {g(ins.get('mean'))}, std {g(ins.get('std'))})"
            if ins.get("min") is not None
            else "its inputs were finite"
        )
        after = [m for m in ev.nonfinite_modules if m and m != module]
        message = f"step {s}: {where} produced the first non-finite value: {inp} but {what}. " + (
            f"The {len(after)} module(s) after it ({', '.join(after[:4])}"
            f"{', ...' if len(after) > 4 else ''}) only propagate it."
            if after
            else "Modules after it only propagate it."
        )
        if ev.bad_parameters:
            message += (
                f" Its parameters {', '.join(ev.bad_parameters[:4])} are already "
                f"non-finite: the update of step {s - 1} overflowed."
            )
        if ev.detail and "mask" in ev.detail:
            message += f" Why: {ev.detail}."
            fix = Fix(
                "leave at least one unmasked key per sequence (drop fully padded "
                "sequences from the batch, or unmask one position of them)",
                "keep = ~key_padding_mask.all(dim=1)   # sequences with at least one "
                "real token\nx, key_padding_mask, y = x[keep], key_padding_mask[keep], "
                "y[keep]\n",
            )
        elif s == 1 and not ev.bad_parameters:
            message += (
                " It happened on the very first forward with freshly initialised "
                "weights: look for an unguarded log/sqrt/division or overflow in "
                "this layer rather than at the learning rate."
            )
            fix = Fix(
                f"guard the computation in {where} (add an epsilon, clamp before "
                "log/exp/sqrt, or compute in float32)",
                "# e.g.\ny = torch.log(x.clamp_min(1e-12))\ny = x / (d + 1e-8)\n",
            )
        message += history
    elif ev.kind == "forward":
        message = (
            f"step {s}: the loss went non-finite, but replaying the step did not "
            f"reproduce it ({ev.detail}).{history}"
        )
    elif ev.kind == "loss":
        outs = ev.output_stats or {}
        stats = (
            f" (outputs: min {g(outs.get('min'))}, max {g(outs.get('max'))})"
            if outs.get("min") is not None
            else ""
        )
        message = (
            f"step {s}: the model's outputs were finite but the {run.config.loss} loss "
            f"was not{stats}"
        )
        if ev.detail and "ignore_index" in ev.detail:
            message = f"step {s}: the {run.config.loss} loss went non-finite{stats}: {ev.detail}."
            fix = Fix(
                "skip batches without a single target to learn from (or compute the "
                "mean over the real targets yourself)",
                "if (y != -100).any():   # the loss's ignore_index\n    loss = criterion(out, y)\n",
            )
        else:
            message += (
                "; check the targets and that the loss matches the output (logits, not "
                "probabilities)."
            )
            fix = Fix(
                "check the targets' range and use a loss that takes logits "
                "(cross_entropy, BCEWithLogitsLoss)",
                None,
            )
    else:  # gradient
        module = ev.module
        message = (
            f"step {s}: the loss was finite but the gradient of {ev.parameter} "
            f"({_display(module, run)}) went non-finite: it is the first one backward "
            f"reaches from the output ({len(ev.bad_parameters)} parameters affected)."
            f"{history}"
        )
    yield ctx.finding(
        "ND401",
        message,
        module=module,
        location=ev.location or _site(run, module),
        fix=fix,
        evidence=evidence,
        impact=15.0,
    )


# ------------------------------------------------------------------------------ ND402


@rule("ND402", needs="runtime")
def exploding_gradients(ctx: Context):
    run = ctx.run
    if run.steps_run < 2:
        return
    max_growth = float(ctx.option("ND402", "max-growth", 1e3))
    max_ratio = float(ctx.option("ND402", "max-grad-weight-ratio", 1e3))
    layers = run.weight_layers()
    if not layers:
        return
    totals = total_grad_norms(run)
    start = median(totals[:3])
    peak = max(finite(totals), default=None)
    nonfinite_grad = any(not math.isfinite(t) and not math.isnan(t) for t in totals) or (
        run.nonfinite is not None and run.nonfinite.kind == "gradient"
    )
    growth = (peak / start) if start and peak is not None and start > 0 else None
    worst, worst_ratio = None, 0.0
    for p in layers:
        for gn, wn in zip(p.grad_norm, p.weight_norm):
            if math.isfinite(gn) and wn > 0 and gn / wn > worst_ratio:
                worst, worst_ratio = p, gn / wn
    reasons = []
    if growth is not None and growth > max_growth:
        reasons.append(
            f"the total gradient norm grew {g(growth)}x (from {g(start)} over the "
            f"first steps to {g(peak)}; threshold {g(max_growth)}x)"
        )
    if worst is not None and worst_ratio > max_ratio:
        reasons.append(
            f"{worst.name}'s gradient norm reached {g(worst_ratio)}x its weight norm "
            f"(threshold {g(max_ratio)}x)"
        )
    if nonfinite_grad:
        reasons.append("a gradient overflowed to Inf")
    if not reasons:
        return
    module = worst.module if worst is not None else None
    message = (
        "gradients explode: " + "; ".join(reasons) + ". Each update then jumps far past "
        "the minimum and the weights grow until activations overflow (loss NaN)."
    )
    fix = Fix(
        f"lower the learning rate ({g(run.config.learning_rate)} -> "
        f"{g(run.config.learning_rate / 10)}) and/or clip the gradient norm",
        lr_snippet(run, 0.1) + "# between loss.backward() and optimizer.step():\n"
        "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)\n",
    )
    cut = batch_cut(run)
    if cut:
        message += _batch_cut_text(cut)
    f = ctx.finding(
        "ND402",
        message,
        module=module,
        location=_site(run, module),
        fix=fix,
        evidence={
            "growth": growth,
            "start_norm": start,
            "peak_norm": peak,
            "max_grad_weight_ratio": worst_ratio,
            "worst_parameter": worst.name if worst else None,
            "total_grad_norm": totals,
            "batch_cut_from": cut and cut[1],
            "nonfinite_only": reasons == ["a gradient overflowed to Inf"],
        },
        impact=7.0,
    )
    if cut and not nonfinite_grad and "severity" not in ctx.options.get("ND402", {}):
        f.severity = Severity.INFO
    yield f


# ------------------------------------------------------------------------------ ND403


@rule("ND403", needs="runtime")
def vanishing_gradients(ctx: Context):
    run = ctx.run
    if run.steps_run < 1:
        return
    min_ratio = float(ctx.option("ND403", "min-first-last-ratio", 1e-2))
    min_norm = float(ctx.option("ND403", "min-grad-norm", 1e-7))
    rows = [(p, layer_grad(p)) for p in run.weight_layers()]
    rows = [(p, v) for p, v in rows if v is not None]
    ends = gradient_ends(run)
    if ends is None:
        return
    first, g_first, last, g_last = ends
    ratio = g_first / g_last
    live = [(p, v) for p, v in rows if v > 0]
    tiny = [(p, v) for p, v in live if v < min_norm]
    reasons = []
    if ratio < min_ratio:
        reasons.append(
            f"the first weight layer's gradient norm ({first.module}: {g(g_first)}) "
            f"is {g(ratio)} of the last one's ({last.module}: {g(g_last)}); "
            f"threshold {g(min_ratio)}"
        )
    if tiny:
        reasons.append(
            f"{len(tiny)} layer(s) have gradient norms below {g(min_norm)} "
            f"({', '.join(f'{p.module}: {g(v)}' for p, v in tiny[:4])})"
        )
    if not reasons:
        return
    decades = math.log10(1 / ratio) if 0 < ratio < 1 else None
    message = (
        "vanishing gradients: "
        + "; ".join(reasons)
        + ". The early layers barely learn"
        + (
            f": the gradient loses {decades:.1f} orders of magnitude from output to input."
            if decades
            else "."
        )
    )
    saturating = any(a.kind in ("sigmoid", "tanh") for a in run.activations)
    if saturating:
        fix = Fix(
            "use ReLU instead of sigmoid/tanh in hidden layers, insert BatchNorm after the "
            "hidden conv/linear layers, or add residual connections",
            "nn.Linear(256, 256),\nnn.BatchNorm1d(256),   # normalize before the "
            "activation\nnn.ReLU(),             # instead of nn.Sigmoid()\n",
        )
    else:
        fix = Fix(
            "insert BatchNorm after the hidden conv/linear layers, or add residual connections",
            "nn.Conv2d(64, 64, 3, padding=1, bias=False),\nnn.BatchNorm2d(64),\n"
            "nn.ReLU(),\n# or a residual block: return torch.relu(x + self.body(x))\n",
        )
    yield ctx.finding(
        "ND403",
        message,
        module=first.module,
        location=_site(run, first.module),
        fix=fix,
        evidence={
            "first_last_ratio": ratio,
            "first_layer": first.module,
            "last_layer": last.module,
            "first_grad_norm": g_first,
            "last_grad_norm": g_last,
            "layers": {p.module: v for p, v in rows},
        },
        impact=6.0,
    )


# ------------------------------------------------------------------------------ ND404


@rule("ND404", needs="runtime")
def dead_relu(ctx: Context):
    run = ctx.run
    warn = float(ctx.option("ND404", "dead-fraction", 0.5))
    err = float(ctx.option("ND404", "error-fraction", 0.95))
    min_units = int(ctx.option("ND404", "min-units", 4))
    for a in run.activations:
        if a.kind != "relu" or a.dead_fraction is None or a.units < min_units:
            continue
        frac = a.dead_fraction
        if frac <= warn:
            continue
        w = a.window_steps
        zeros = mean(a.zero_fraction[-w:]) if w else None
        if a.functional:
            what = (
                f"{a.name} (a functional relu on the output of {_display(a.producer, run)})"
                if a.producer
                else f"{a.name}"
            )
        else:
            what = f"the ReLU {a.name}" + (
                f" (after {_display(a.producer, run)})" if a.producer else ""
            )
        message = (
            f"{a.dead_units} of the {a.units} units of {what} "
            f"({pct(frac)}) never fired on any sample of the last {w} steps"
            + (f"; {pct(zeros)} of its outputs are zero" if zeros is not None else "")
            + ". Dead units pass no gradient, so they never recover and the layer "
            "before them stops learning."
        )
        fix = Fix(
            f"lower the learning rate ({g(run.config.learning_rate)} -> "
            f"{g(run.config.learning_rate / 10)}), normalize the inputs, or use He "
            "initialisation / LeakyReLU",
            lr_snippet(run, 0.1) + "# or: nn.init.kaiming_normal_(layer.weight, "
            "nonlinearity='relu'); nn.LeakyReLU(0.01)\n",
        )
        module = a.module if not a.functional else a.producer
        f = ctx.finding(
            "ND404",
            message,
            module=module or a.name,
            location=a.location if a.location else _site(run, module),
            fix=fix,
            evidence={
                "site": a.name,
                "units": a.units,
                "dead_units": a.dead_units,
                "dead_fraction": frac,
                "zero_fraction": zeros,
                "window_steps": w,
                "producer": a.producer,
                "functional": a.functional,
            },
            impact=6.0 + frac,
        )
        if frac >= err and "severity" not in ctx.options.get("ND404", {}):
            f.severity = Severity.ERROR
        yield f


# ------------------------------------------------------------------------------ ND405


@rule("ND405", needs="runtime")
def saturated_activations(ctx: Context):
    run = ctx.run
    limit = float(ctx.option("ND405", "saturated-fraction", 0.5))
    for a in run.activations:
        if a.kind not in ("sigmoid", "tanh") or not a.saturation:
            continue
        w = run.window
        sat = mean(a.saturation[-w:])
        if sat is None or sat <= limit:
            continue
        bound = "outputs within 0.01 of 0 or 1" if a.kind == "sigmoid" else "|output| > 0.99"
        message = (
            f"{pct(sat)} of {a.name}'s {a.kind} outputs are saturated ({bound}) over the "
            f"last {w} steps (threshold {pct(limit)}): their derivative is ~0, so almost "
            "no gradient passes."
        )
        fix = Fix(
            "normalize the inputs of the activation (BatchNorm before it, or scaled inputs)"
            ", or use ReLU",
            "nn.BatchNorm1d(features),  # before the activation\n",
        )
        module = a.module if not a.functional else a.producer
        yield ctx.finding(
            "ND405",
            message,
            module=module or a.name,
            location=a.location if a.location else _site(run, module),
            fix=fix,
            evidence={"site": a.name, "kind": a.kind, "saturated_fraction": sat, "window_steps": w},
            impact=4.0 + sat,
        )


# ------------------------------------------------------------------------------ ND406


@rule("ND406", needs="runtime")
def update_ratio(ctx: Context):
    run = ctx.run
    if run.steps_run < 3:
        return
    low = float(ctx.option("ND406", "min-ratio", 1e-8))
    high = float(ctx.option("ND406", "max-ratio", 0.3))
    rows, early = [], []
    for p in run.weight_layers():
        r = median(p.update_ratio)
        if r is None or p.steps_with_grad == 0:
            continue
        rows.append((p, r))
        early.append((p, median(p.update_ratio[: early_steps(len(p.update_ratio))])))
    if not rows:
        return
    # Too small: typical over the whole probe. Too large: over the first steps, before the
    # damage (dead units, overflow) makes the later updates meaningless.
    small = [(p, r) for p, r in rows if r < low]
    large = [(p, r) for p, r in early if r is not None and r > high]
    lr = run.config.learning_rate
    for direction, group, factor in (("too-large", large, 0.1), ("too-small", small, 10.0)):
        if not group:
            continue
        worst = (
            max(group, key=lambda pr: pr[1])
            if direction == "too-large"
            else min(group, key=lambda pr: pr[1])
        )
        listed = ", ".join(f"{p.module}: {g(r)}" for p, r in group[:5])
        more = f" and {len(group) - 5} more" if len(group) > 5 else ""
        if direction == "too-large":
            message = (
                f"weights change too much per step: over the first steps the median "
                f"update/weight ratio is above {g(high)} in {len(group)} layer(s) "
                f"({listed}{more}); a healthy "
                "ratio is ~1e-3. Training is unstable and overshoots."
            )
            fix = Fix(
                f"lower the learning rate ({g(lr)} -> {g(lr * factor)})", lr_snippet(run, factor)
            )
        elif all(r == 0 for _, r in group):
            message = (
                f"weights do not move at all: the update/weight ratio is 0 in "
                f"{len(group)} layer(s) ({', '.join(p.module for p, _ in group[:5])}"
                f"{more}): their gradient is exactly zero, so they never learn."
            )
            fix = Fix("find what blocks their gradient (dead units, a constant layer)", None)
        else:
            message = (
                f"weights barely change: the median update/weight ratio is below "
                f"{g(low)} in {len(group)} layer(s) ({listed}{more}); a healthy ratio is "
                "~1e-3. These layers are effectively not learning."
            )
            fix = Fix(
                f"raise the learning rate ({g(lr)} -> {g(lr * factor)}) once the "
                "gradient problem behind it is fixed",
                lr_snippet(run, factor),
            )
        p = worst[0]
        cut = batch_cut(run) if direction == "too-large" else None
        if cut:
            message += _batch_cut_text(cut)
        f = ctx.finding(
            "ND406",
            message,
            module=p.module,
            location=_site(run, p.module),
            fix=fix,
            evidence={
                "direction": direction,
                "min_ratio": low,
                "max_ratio": high,
                "ratios": {q.module: r for q, r in rows},
                "early_ratios": {q.module: r for q, r in early},
                "batch_cut_from": cut and cut[1],
            },
            impact=5.0,
        )
        if cut and "severity" not in ctx.options.get("ND406", {}):
            f.severity = Severity.INFO
        yield f


# ------------------------------------------------------------------------------ ND407


@rule("ND407", needs="runtime")
def loss_stalled(ctx: Context):
    run = ctx.run
    min_steps = int(ctx.option("ND407", "min-steps", 10))
    min_drop = float(ctx.option("ND407", "min-relative-drop", 0.1))
    margin = float(ctx.option("ND407", "chance-margin", 0.1))
    if run.steps_run < min_steps or run.stopped in ("non-finite", "labels", "non-finite-input"):
        return
    if run.competing_losses:
        return  # a GAN's losses hover by design
    first, last, k = loss_window(run)
    if first is None or last is None:
        return
    drop = (first - last) / abs(first) if first else 0.0
    if drop >= min_drop:
        return
    chance = run.chance
    accs = [a for a in run.accuracy[-k:] if a is not None]
    acc = sum(accs) / len(accs) if accs else None
    if chance is not None and acc is not None and acc > chance + margin:
        return
    at_chance = (
        f"; accuracy {g(acc)} is at chance ({g(chance)})"
        if acc is not None and chance is not None
        else ""
    )
    message = (
        f"the loss is not decreasing: {g(first)} over the first {k} steps -> {g(last)} "
        f"over the last {k} ({pct(max(drop, 0.0))} lower; threshold "
        f"{pct(min_drop)}){at_chance}. The model is not learning."
    )
    lr = run.config.learning_rate
    fix = Fix(
        f"if nothing else explains it: raise the learning rate ({g(lr)} -> {g(lr * 10)}) "
        "or probe longer (--steps)",
        lr_snippet(run, 10.0),
    )
    # A model that memorizes one batch and takes normal-sized steps is able to learn: the data
    # needs more than this short probe (common with --data synthetic for CNNs). Say so, quietly.
    can_overfit, typical = able_to_learn(run)
    slow_but_able = can_overfit and typical is not None and typical >= 1e-5
    if slow_but_able:
        message += (
            f" But the model memorizes one batch and its updates are normal-sized "
            f"(median update/weight ratio {g(typical)}): it can learn, this data needs a "
            "longer probe (--steps) or a higher learning rate."
        )
    short = cut_short(run)
    if short:
        message += (
            f" The time budget allowed only {run.steps_run} of {short} steps, so this "
            "says the model had not learned yet, not that it cannot (--steps, "
            "--time-budget)."
        )
    f = ctx.finding(
        "ND407",
        message,
        fix=fix,
        evidence={
            "loss_first": first,
            "loss_last": last,
            "relative_drop": drop,
            "accuracy": acc,
            "chance": chance,
            "steps": run.steps_run,
            "can_overfit_batch": bool(can_overfit),
            "median_update_ratio": typical,
            "fallback_fix": True,
            "steps_cut_from": short,
        },
        impact=3.0,
    )
    if (slow_but_able or short) and "severity" not in ctx.options.get("ND407", {}):
        f.severity = Severity.INFO
    yield f


def able_to_learn(run) -> tuple[bool, float | None]:
    """(the overfit-one-batch check passed, median over weight layers of the median
    update/weight ratio): a slow probe of a model that can learn is not a model problem."""
    of = run.overfit or {}
    first, best = of.get("loss_first"), of.get("loss_min")
    can = bool(first and best is not None and math.isfinite(best) and best <= 0.2 * first)
    return can, median([median(p.update_ratio) for p in run.weight_layers()])


# ------------------------------------------------------------------------------ ND408


@rule("ND408", needs="runtime")
def initial_loss(ctx: Context):
    run = ctx.run
    tol = float(ctx.option("ND408", "tolerance", 0.5))
    if run.config.loss != "cross_entropy" or not run.classification or not run.loss:
        return
    c = run.num_outputs
    if not c or c < 2:
        return
    loss0 = run.loss[0]
    if not math.isfinite(loss0):
        return
    expected = math.log(c)
    if abs(loss0 - expected) <= tol * expected:
        return
    if loss0 < expected and not run.from_init:
        return  # resumed or pretrained weights are allowed to know something at step 1
    if loss0 > expected:
        why = (
            "the initial outputs are confidently wrong: the logits are far from zero at "
            "initialisation (input scale or the last layer's init), so the first steps are "
            "spent shrinking them"
        )
    else:
        why = (
            "the model is already confident before training: check for a label leak or "
            "targets that are trivially predictable"
        )
    message = (
        f"cross-entropy at initialisation is {g(loss0)}, but a model that has not learned "
        f"anything should score ln({c}) = {g(expected)} (tolerance +-{pct(tol)}): {why}."
    )
    fix = (
        Fix(
            "initialise the last layer so the initial logits are near zero",
            "nn.init.zeros_(model.fc.weight)   # the last Linear (name yours)\n"
            "nn.init.zeros_(model.fc.bias)\n",
        )
        if loss0 > expected
        else None
    )
    yield ctx.finding(
        "ND408",
        message,
        fix=fix,
        evidence={"loss_at_init": loss0, "expected": expected, "classes": c},
        impact=3.0,
    )


# ------------------------------------------------------------------------------ ND409


@rule("ND409", needs="runtime")
def prediction_collapse(ctx: Context):
    run = ctx.run
    share = float(ctx.option("ND409", "top2-share", 0.9))
    if not run.pred_counts or not run.label_counts or (run.num_outputs or 0) < 3:
        return
    if run.stopped in ("non-finite", "labels", "non-finite-input") or run.steps_run < 10:
        return
    if run.competing_losses:
        return
    preds = sorted(run.pred_counts, reverse=True)
    labels = sorted(run.label_counts, reverse=True)
    total_p, total_l = sum(preds), sum(labels)
    if not total_p or not total_l:
        return
    top2 = (preds[0] + preds[1]) / total_p
    label_top2 = (labels[0] + labels[1]) / total_l
    if top2 < share or label_top2 > share / 2:
        return
    classes = sorted(range(len(run.pred_counts)), key=lambda i: -run.pred_counts[i])[:2]
    message = (
        f"predictions collapsed: over the last {run.window} steps, {pct(top2)} of the "
        f"predictions are class {classes[0]} or {classes[1]}, while those two classes "
        f"are only {pct(label_top2)} of the labels. The model outputs (nearly) the same "
        "answer for every input."
    )
    can_overfit, typical = able_to_learn(run)
    still_learning = can_overfit and typical is not None and typical >= 1e-5
    if still_learning:
        message += (
            " The model memorizes one batch and its updates are normal-sized, so this is "
            "likely an early phase of training (it predicts the most common answers "
            "first), not a broken model."
        )
    short = cut_short(run)
    if short:
        message += (
            f" The time budget allowed only {run.steps_run} of {short} steps: an early "
            "phase of training predicts the most common answers first."
        )
    f = ctx.finding(
        "ND409",
        message,
        fix=None,
        evidence={
            "top2_share": top2,
            "label_top2_share": label_top2,
            "predicted": run.pred_counts,
            "labels": run.label_counts,
            "can_overfit_batch": can_overfit,
            "steps_cut_from": short,
        },
        impact=2.0,
    )
    if (still_learning or short) and "severity" not in ctx.options.get("ND409", {}):
        f.severity = Severity.INFO
    yield f


# ------------------------------------------------------------------------------ ND410


@rule("ND410", needs="runtime")
def no_gradient(ctx: Context):
    run = ctx.run
    if run.steps_run < 1:
        return
    starved: dict[str, list[str]] = {}
    for p in run.params:
        if p.steps_with_grad == 0:
            starved.setdefault(p.module, []).append(p.name)
    for module, names in starved.items():
        where = _display(module, run)
        message = (
            f"{', '.join(names)} received no gradient (grad is None after backward) in "
            f"any of the {run.steps_run} steps: {where} is cut off from the loss "
            "(.detach(), .data, torch.no_grad() or .item()/.numpy() in forward, or its "
            "output is never used), so it never trains."
        )
        fix = Fix(
            f"make {module}'s output reach the loss through autograd: remove the "
            ".detach()/.data/no_grad on its path (or freeze it on purpose with "
            "requires_grad_(False))",
            "features = x.flatten(1)            # not x.flatten(1).detach()\n"
            f"# or, if {module} is meant to be frozen:\n"
            f"model.{module}.requires_grad_(False)\n"
            if module
            else None,
        )
        yield ctx.finding(
            "ND410",
            message,
            module=module,
            location=_site(run, module),
            fix=fix,
            evidence={"parameters": names, "steps": run.steps_run},
            impact=12.0,
        )


# ------------------------------------------------------------------------------ ND411


@rule("ND411", needs="runtime")
def batchnorm_train_eval_gap(ctx: Context):
    run = ctx.run
    te = run.train_eval
    if not te:
        return
    limit = float(ctx.option("ND411", "max-relative-gap", 0.3))
    min_mismatch = float(ctx.option("ND411", "min-stat-mismatch", 0.5))
    gap = te.get("relative_gap")
    if gap is None or gap <= limit:
        return
    mism = te.get("layer_mismatch") or {}
    worst = max(mism, key=mism.get) if mism else (te.get("bn_layers") or [None])[0]
    worst_value = mism.get(worst) if worst else None
    if worst_value is not None and worst_value <= min_mismatch:
        return  # outputs differ, but every layer's running statistics match its batches: noise
    moms = te.get("momentum") or {}
    odd = {n: m for n, m in moms.items() if m is not None and (m == 0 or m >= 0.5)}
    size = pct(gap) if gap < 10 else g(gap) + "x"
    parts = [
        f"the outputs in eval mode differ from train mode by {size} (relative L2, "
        f"threshold {pct(limit)}) on the same batch"
    ]
    if te.get("accuracy_eval_mode") is not None:
        parts.append(
            f"accuracy {g(te['accuracy_train_mode'])} in train mode vs "
            f"{g(te['accuracy_eval_mode'])} in eval mode"
        )
    if worst:
        parts.append(
            f"{worst}'s running statistics are furthest from its batch statistics "
            f"(mismatch {g(worst_value)}: mean |batch mean - running mean| / batch std "
            f"+ mean |log(batch var / running var)| over channels; threshold "
            f"{g(min_mismatch)})"
        )
    message = "; ".join(parts) + (
        ". BatchNorm's running mean/variance do not match the data, "
        "so the model evaluates differently from how it trained."
    )
    if odd:
        message += f" Momentum {', '.join(f'{n}={m:g}' for n, m in odd.items())}: " + (
            "0 never updates the running statistics."
            if 0 in odd.values()
            else "PyTorch's momentum is the weight of the NEW batch "
            "(Keras' 0.99 is PyTorch's 0.01)."
        )
    module = next(iter(odd), worst) if odd else worst
    fix = _momentum_fix(run, module)
    yield ctx.finding(
        "ND411",
        message,
        module=module,
        location=_site(run, module),
        fix=fix,
        evidence={k: v for k, v in te.items()},
        impact=4.0,
    )


def _momentum_fix(run, module: str | None) -> Fix:
    from netdoctor.fixes.patch import diff_fix, set_keyword

    loc = _site(run, module)
    summary = "set BatchNorm momentum=0.1 (PyTorch's default) so running statistics track the data"
    snippet = f"nn.{run.module_types.get(module, 'BatchNorm2d')}(num_features, momentum=0.1)\n"
    if loc is None:
        return Fix(summary, snippet)
    return diff_fix(
        summary,
        loc.path,
        lambda src, line=loc.line: set_keyword(src, line, _BN_TYPES, "momentum", "0.1"),
        snippet,
    )


# ------------------------------------------------------------------------------ ND412


@rule("ND412", needs="runtime")
def cannot_overfit_batch(ctx: Context):
    run = ctx.run
    of = run.overfit
    if not of:
        return
    ratio = float(ctx.option("ND412", "max-loss-ratio", 0.2))
    first, best = of.get("loss_first"), of.get("loss_min")
    if first is None or not math.isfinite(first) or first <= 0:
        return
    falling = float(ctx.option("ND412", "still-falling", 0.9))
    acc = of.get("accuracy")
    if best is not None and math.isfinite(best) and best <= ratio * first:
        return
    losses = [v for v in of.get("losses", []) if math.isfinite(v)]
    trend = None
    if len(losses) >= 20:
        prev, last = mean(losses[-20:-10]), mean(losses[-10:])
        trend = last / prev if prev else None
        if trend is not None and trend < falling:
            return  # slow (e.g. a frozen backbone's few features) but still going down fast
    message = (
        f"the model cannot overfit one batch: {of['steps']} Adam steps (lr "
        f"{g(of['lr'])}) on the same {of['samples']} samples took the loss only from "
        f"{g(first)} to {g(best)} (needs <= {pct(ratio)} of the start)"
        + (
            f" and it has levelled off (last 10 steps at {pct(trend)} of the 10 before)"
            if trend is not None
            else ""
        )
        + (f", accuracy {g(acc)}" if acc is not None else "")
        + ". A working model memorizes a tiny batch almost at once; this points at the "
        "model or the data/loss wiring, not at the learning rate."
    )
    yield ctx.finding(
        "ND412",
        message,
        fix=None,
        evidence={**{k: v for k, v in of.items() if k != "losses"}, "trend": trend},
        impact=3.0,
    )
