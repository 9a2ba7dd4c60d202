"""ND401 non-finite: the first NaN/Inf of a run (in the input, a module's output, the loss or a
gradient), localized to what produced it (doc: rules/ND401.md)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.measure.record import TrainingRun
from netdoctor.measure.summary import (
    finite,
)
from netdoctor.rules.base import Fixture, NoOptions, Rule, Stage
from netdoctor.rules.contexts import RuntimeContext
from netdoctor.rules.numbers import g
from netdoctor.rules.runtime._common import (
    display,
    lower_lr,
    lr_snippet,
    site,
)
from netdoctor.rules.verification import Remedy, RemedyContext, SymptomSpec


def check(ctx: RuntimeContext, options: NoOptions) -> Iterator[Finding]:
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
        where = display(module, run)
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
        elif _fp16_overflow(outs) and not ev.bad_parameters:
            message += (
                f" Its finite outputs reach {g(outs.get('abs_max'))}, at float16's largest "
                "value (65504): the forward runs in float16 (autocast or a half model) and "
                "this layer's output passes its range."
            )
            fix = Fix(
                f"keep {where}'s output inside float16's range: normalize what feeds it (raw "
                "sensor or pixel counts), run it in float32, or train in bfloat16",
                "x = (x - mean) / std   # inputs near unit scale\n"
                "# or run the layer in float32:\n"
                "with torch.autocast(device_type, enabled=False):\n"
                "    out = layer(x.float())\n"
                "# or: torch.autocast(device_type, dtype=torch.bfloat16), no GradScaler\n",
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
            f"({display(module, run)}) went non-finite: it is the first one backward "
            f"reaches from the output ({len(ev.bad_parameters)} parameters affected)."
            f"{history}"
        )
    yield RULE.finding(
        message,
        module=module,
        location=ev.location or site(run, module),
        fix=fix,
        evidence=evidence,
        impact=15.0,
    )


def _fp16_overflow(outs: dict[str, Any]) -> bool:
    """Inf (not NaN) in an output whose finite values reach float16's top binade: the layer
    computed in float16 and passed 65504."""
    top = outs.get("abs_max")
    return bool(outs.get("inf")) and isinstance(top, (int, float)) and 32768 <= top <= 65504


def causes(finding: Finding) -> tuple[str, ...]:
    """NaN in the input batch follows from NaN in the data; elsewhere, from what blows up."""
    if finding.evidence.get("kind") == "input":
        return ("ND304",)
    return (
        "ND605",
        "ND304",
        "ND302",
        "ND301",
        "ND506",
        "ND501",
        "ND604",
        "ND201",
        "ND204",
        "ND406+",
        "ND402",
        "ND101",
    )


def nonfinite_step(run: TrainingRun, options: NoOptions) -> float | None:
    return float(run.nonfinite.step) if run.nonfinite is not None else None


def remedy(finding: Finding, context: RemedyContext) -> Remedy | None:
    """A lower learning rate, when that is the fix the finding offers."""
    if finding.fix is not None and finding.fix.summary.startswith("lower the learning rate"):
        return lower_lr(finding, context)
    return None


RULE = Rule(
    "ND401",
    "non-finite",
    Severity.ERROR,
    Stage.RUNTIME,
    summary="NaN/Inf in loss, activations or gradients, localized to its producer",
    check=check,
    options=NoOptions,
    causes=causes,
    symptoms=(SymptomSpec("first non-finite value", "step", "lower", nonfinite_step),),
    remedy=remedy,
    fixture=Fixture("run", ("fixtures/loops/nan_attention_mask.py",)),
    healthy=Fixture("run", ("fixtures/loops/transformer.py",)),
)
