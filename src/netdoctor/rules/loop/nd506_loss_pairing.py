"""ND506 loss-pairing: a loss fed what it does not expect (probabilities into cross-entropy,
logits into nll_loss or BCELoss, ...) (doc: rules/ND506.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from netdoctor.findings import Finding, Fix, Severity
from netdoctor.rules.base import Fixture, Rule, RuleOptions, Stage
from netdoctor.rules.contexts import LoopContext
from netdoctor.rules.numbers import g


@dataclass(frozen=True)
class Options(RuleOptions):
    min_calls: int = 2  # examined calls that must agree (unless a softmax/sigmoid made the input)


def check(ctx: LoopContext, options: Options) -> Iterator[Finding]:
    loop = ctx.loop
    min_calls = options.min_calls
    for c in loop.loss_calls():
        certain = c.input_producer in ("SoftmaxBackward0", "SigmoidBackward0")
        enough = c.checked >= min_calls or certain
        span = (
            f" (min {g(c.input_min)}, max {g(c.input_max)})"
            if c.input_min is not None and c.input_max is not None
            else ""
        )
        message: str | None = None
        fix: Fix | None = None
        if (
            c.fn in ("cross_entropy", "nll_loss")
            and c.probabilities
            and c.probabilities == c.checked
            and enough
        ):
            source = " from a softmax" if c.input_producer == "SoftmaxBackward0" else ""
            if c.fn == "cross_entropy":
                message = (
                    f"cross_entropy was fed probabilities{source}: in every examined call "
                    f"({c.checked}) its input lies in [0, 1]{span} and sums to 1 over the "
                    "classes. cross_entropy applies log-softmax itself, so softmax runs "
                    "twice: the outputs can never be confident, the gradients shrink and "
                    "the loss stalls near ln(C)."
                )
                fix = Fix(
                    "feed cross_entropy the raw logits (remove the softmax; apply it only "
                    "to read probabilities)",
                    "logits = model(x)            # no softmax here\n"
                    "loss = F.cross_entropy(logits, y)\n"
                    "probs = logits.softmax(dim=1)  # only for metrics / inference\n",
                )
            else:
                message = (
                    f"nll_loss was fed probabilities{source} (in [0, 1]{span}, summing to "
                    "1): it expects log-probabilities, so it maximizes p instead of log p "
                    "and its gradients do not match the likelihood."
                )
                fix = Fix(
                    "use log_softmax instead of softmax before nll_loss (or cross_entropy "
                    "on logits)",
                    "loss = F.nll_loss(F.log_softmax(logits, dim=1), y)\n",
                )
        elif c.fn == "nll_loss" and c.not_log_probs and c.not_log_probs == c.checked and enough:
            message = (
                f"nll_loss was fed values that are not log-probabilities{span}: each "
                "row's logsumexp is not 0, i.e. raw logits. nll_loss only picks the "
                "target's entry, so the loss can fall without bound while the model "
                "learns nothing useful."
            )
            fix = Fix(
                "apply log_softmax before nll_loss, or use cross_entropy on the logits",
                "loss = F.cross_entropy(logits, y)   # = nll_loss(log_softmax(logits))\n",
            )
        elif (
            c.fn == "binary_cross_entropy_with_logits"
            and c.probabilities
            and c.probabilities == c.checked
            and (certain or c.checked >= max(3, min_calls))
        ):
            source = (
                "sigmoid outputs"
                if c.input_producer == "SigmoidBackward0"
                else "values that all lie in (0, 1)"
            )
            message = (
                f"BCEWithLogitsLoss was fed {source}{span} in every examined call "
                f"({c.checked}): it applies the sigmoid itself, so the outputs are "
                "squashed twice, every prediction sits between 0.5 and 0.73, and the "
                "loss cannot go down."
            )
            fix = Fix(
                "feed BCEWithLogitsLoss the raw logits (remove the sigmoid)",
                "logits = model(x)   # no sigmoid here\n"
                "loss = F.binary_cross_entropy_with_logits(logits, y)\n",
            )
        elif c.fn == "binary_cross_entropy" and c.out_of_range:
            raised = f" It raised {c.raised}." if c.raised else ""
            message = (
                f"BCELoss was fed values outside [0, 1]{span}: logits, not "
                f"probabilities.{raised} BCELoss takes probabilities; logits belong in "
                "BCEWithLogitsLoss, which is also numerically stable."
            )
            fix = Fix(
                "use BCEWithLogitsLoss on the logits (or apply sigmoid first)",
                "criterion = nn.BCEWithLogitsLoss()   # instead of nn.BCELoss()\n"
                "loss = criterion(logits, y)\n",
            )
        if message is None:
            continue
        yield RULE.finding(
            message,
            location=c.site,
            fix=fix,
            evidence={
                "loss": c.fn,
                "calls": c.calls,
                "examined": c.checked,
                "input_min": c.input_min,
                "input_max": c.input_max,
                "input_producer": c.input_producer,
                "raised": c.raised,
            },
            impact=12.0,
        )


RULE = Rule(
    "ND506",
    "loss-pairing",
    Severity.ERROR,
    Stage.LOOP,
    summary="a loss fed what it does not expect (probabilities into cross-entropy, ...)",
    check=check,
    options=Options,
    fixture=Fixture("run", ("fixtures/loops/softmax_cross_entropy.py",)),
    healthy=Fixture("run", ("fixtures/loops/plain.py",)),
)
