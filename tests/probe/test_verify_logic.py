"""The verified fix's logic without training: judging before/after, the symptom behind a
finding, and which remedies combine."""

from __future__ import annotations

import math

import pytest

from netdoctor.findings import Finding, Fix, Report, Severity
from netdoctor.measure.record import ActivationTrace, NonFinite, TrainingRun
from netdoctor.probe.engine import ProbeConfig
from netdoctor.probe.verify import _candidates, judge, with_learning_rate
from netdoctor.rules.engine import RuleSettings, remedy_for, symptom_for, symptoms
from netdoctor.rules.verification import RemedyContext, conflicts, lr_remedy

DEFAULTS = RuleSettings()


def side(first, last, acc):
    return {"loss_first": first, "loss_last": last, "accuracy": acc}


@pytest.mark.parametrize(
    "before,after,verdict",
    [
        (side(2.3, 2.3, 0.1), side(2.3, 0.4, 0.88), "improved"),
        (side(2.3, 2.3, 0.1), side(2.3, 2.25, 0.1), "no"),  # 2% lower: noise
        (side(2.3, 2.3, 0.1), side(2.3, 2.18, 0.11), "unclear"),  # 5% lower: run longer
        (side(2.3, 2.3, 0.1), side(2.3, 2.0, 0.09), "unclear"),  # lower loss, worse accuracy
        (side(2.3, math.nan, None), side(2.3, 0.5, None), "improved"),  # NaN before, learns after
        (side(2.3, math.nan, None), side(2.3, 2.3, None), "no"),  # finite, but does not learn
        (side(2.3, 0.004, 1.0), side(2.3, 0.002, 1.0), "no"),  # both solved: noise
        (side(2.3, 1.47, 1.0), side(2.3, 0.002, 1.0), "improved"),  # softmax floor removed
        (side(2.3, 1.0, 0.5), side(2.3, math.nan, None), "no"),  # the fix blew up
    ],
)
def test_judge(before, after, verdict):
    assert judge(before, after) == verdict


def _run(**kw) -> TrainingRun:
    run = TrainingRun(config=ProbeConfig(lr=0.5), device="cpu", steps_run=10)
    for k, v in kw.items():
        setattr(run, k, v)
    return run


def test_symptom_of_a_data_finding_is_what_it_causes():
    scale = Finding("ND301", "input-not-normalized", Severity.WARNING, "raw", fix=Fix("x/255"))
    dead = Finding("ND404", "dead-relu", Severity.ERROR, "dead", cause="ND301")
    sym = symptom_for(scale, [dead, scale], DEFAULTS)
    assert sym.rule == "ND404"
    site = ActivationTrace(
        "net.2", "relu", "net.2", "net.1", False, None, units=300, dead_units=297
    )
    run = _run(activations=[site])
    assert sym.value(run) == pytest.approx(0.99)
    assert not sym.healthy(0.99, 100) and sym.healthy(0.02, 100)
    assert sym.to_dict(0.99, 0.02, 100)["gone"]
    # a static finding without a runtime consequence in the report: its known consequence
    chain = Finding("ND102", "saturating-activation-chain", Severity.WARNING, "4 sigmoids")
    assert symptom_for(chain, [chain], DEFAULTS).rule == "ND403"
    # none known: no symptom, loss and accuracy only
    assert (
        symptom_for(
            Finding("ND106", "activation-on-logits", Severity.WARNING, "relu"), [], DEFAULTS
        )
        is None
    )


def test_nonfinite_symptom_is_the_step():
    sym = symptoms(DEFAULTS)["ND401"]
    run = _run(nonfinite=NonFinite(step=7, kind="forward"))
    assert sym.value(run) == 7 and sym.describe(7, 100) == "step 7"
    assert sym.describe(None, 100) == "none in 100 steps" and sym.healthy(None, 100)


def test_remedies_of_one_kind_do_not_stack_and_the_top_one_comes_first():
    run = _run()
    scale = Finding(
        "ND301",
        "input-not-normalized",
        Severity.WARNING,
        "raw",
        fix=Fix("x/255"),
        evidence={"range_max": 255.0},
    )
    mismatch = Finding(
        "ND302",
        "feature-scale-mismatch",
        Severity.WARNING,
        "units",
        fix=Fix("standardize"),
        evidence={"axis": 1, "mean": [0.0, 1.0], "std": [1.0, 100.0]},
    )
    dead = Finding("ND404", "dead-relu", Severity.ERROR, "dead", fix=Fix("lower lr"), cause="ND301")
    big = Finding(
        "ND406",
        "update-ratio",
        Severity.WARNING,
        "big",
        fix=Fix("lower lr"),
        cause="ND301",
        evidence={"direction": "too-large"},
    )
    report = Report(target="t", findings=[scale, mismatch, dead, big])
    context = RemedyContext(report, run)
    first = remedy_for(scale, context)
    assert first.description == "inputs scaled to [0, 1] (x / 255)" and first.kind == "data"
    chosen = _candidates(first, scale, report.sorted_findings(), context)
    # the second data remedy (ND302) and the second lr change (ND406) are left out
    assert [r.rule for r in chosen] == ["ND301", "ND404"]
    assert chosen[1].description == "learning rate 0.5 → 0.05"
    assert conflicts(lr_remedy("ND406", 0.5, 0.1), chosen)
    cfg = with_learning_rate(run.config, chosen[1:], 2)
    assert cfg.learning_rate == pytest.approx(0.005)  # retried: scaled again
