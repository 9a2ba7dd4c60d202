"""One report for a whole torchrun job: rank 0's diagnosis merged with what every other rank
handed it at the end (`distributed.summary`), plus what the ranks' exchanges showed.

* A finding every reporting rank made (same rule, module, line and model) is reported once.
* One that only some ranks made is reported once too, its message prefixed with those ranks
  ("rank 1: ...") and `evidence["ranks"]` listing them: the per-rank outliers.
* A NaN that starts on one rank reaches every rank's gradients through DDP's all-reduce in the
  same step. The ND401 of the ranks that only saw a non-finite gradient are symptoms of the rank
  whose loss or forward went non-finite first: only the origin's finding is kept, and says so.
* Notes: the first non-finite step of each rank ("rank 1: loss NaN at step 6"), how a rank ended
  when it was not normally (an exception, terminated, stopped), ranks that never reported, and
  how the comparison went.

Torch-free: summaries hold findings and plain values only.
"""

from __future__ import annotations

from typing import Any

from netdoctor.findings import Finding, Report
from netdoctor.measure.facts import DistributedFacts

NONFINITE_KINDS = {1.0: "loss NaN", 2.0: "loss Inf", 3.0: "gradient NaN", 4.0: "gradient Inf"}


def _key(f: Finding) -> tuple:
    return (f.rule, f.module, str(f.location), (f.evidence or {}).get("model"))


def _who(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def merge(
    report: Report,
    summaries: dict[int, dict[str, Any]],
    missing: list[int],
    facts: DistributedFacts | None,
    own_nonfinite: tuple[int, float] | None,
    timeout: float,
) -> None:
    """Turn rank 0's `report` into the job's (in place)."""
    reporting = [0, *sorted(summaries)]
    merged: dict[tuple, tuple[Finding, list[int]]] = {}
    for f in report.findings:
        merged.setdefault(_key(f), (f, []))[1].append(0)
    for r in sorted(summaries):
        for f in summaries[r].get("findings", []):
            merged.setdefault(_key(f), (f, []))[1].append(r)
    kept = _origin_of_nonfinite(list(merged.values()))
    findings = []
    for f, ranks in kept:
        if sorted(ranks) != reporting:
            f.evidence = dict(f.evidence or {})
            f.evidence["ranks"] = sorted(ranks)
            if len(reporting) > 1:
                f.message = f"{_who(sorted(ranks))}: {f.message}"
        findings.append(f)
    report.findings = findings
    report.notes.extend(_notes(summaries, missing, facts, own_nonfinite, timeout))
    report.measurements.setdefault("run", {})["ranks"] = _measurements(summaries, missing, facts)


def _origin_of_nonfinite(items: list[tuple[Finding, list[int]]]) -> list[tuple[Finding, list[int]]]:
    nd401 = [(f, r) for f, r in items if f.rule == "ND401"]
    origins = [(f, r) for f, r in nd401 if (f.evidence or {}).get("kind") != "gradient"]
    if not origins:
        return items
    first = min((f.evidence or {}).get("step", 0) for f, _ in origins)
    symptoms = [
        (f, r)
        for f, r in nd401
        if (f.evidence or {}).get("kind") == "gradient"
        and (f.evidence or {}).get("step", 0) >= first
    ]
    if not symptoms:
        return items
    origin_ranks = {x for _, r in origins for x in r}
    hit = sorted({x for _, r in symptoms for x in r} - origin_ranks)
    if hit:
        f, _ = min(origins, key=lambda o: (o[0].evidence or {}).get("step", 0))
        f.message += (
            f" DDP's gradient all-reduce carried it into the gradients of "
            f"{_who(hit)} in the same step (their own losses stayed finite)."
        )
    dropped = {id(f) for f, _ in symptoms}
    # a symptom rank's "gradients explode" that only says its gradient went non-finite
    dropped |= {
        id(f)
        for f, r in items
        if f.rule == "ND402" and set(r) <= set(hit) and (f.evidence or {}).get("nonfinite_only")
    }
    return [(f, r) for f, r in items if id(f) not in dropped]


def _notes(summaries, missing, facts, own_nonfinite, timeout) -> list[str]:
    notes = []
    if facts is not None:
        what = f"{facts.world_size} ranks" + (f" ({facts.backend})" if facts.backend else "")
        if facts.exchanges:
            compared = (
                f", {facts.compared_tensors} DDP-replicated parameter tensors each"
                if facts.compared_tensors
                else ""
            )
            same = ""
            if facts.compared_tensors and facts.divergence is None:
                same = (
                    ": the replicas were identical"
                    if facts.largest_difference == 0
                    else f": the replicas agreed to {facts.largest_difference:.1e} of their norms"
                )
            notes.append(
                f"torchrun: {what}; the ranks compared their statistics on "
                f"{facts.exchanges} step(s){compared}{same}"
            )
        else:
            notes.append(f"torchrun: {what}; the ranks compared nothing")
        if facts.broken:
            notes.append(f"the ranks stopped comparing {facts.broken}")
        if facts.grad_norms:
            shown = "; ".join(f"step {s}: {v:.3g}" for s, v in facts.grad_norms[-6:])
            notes.append(
                "sharded parameters (FSDP/DTensor): each rank measures its own shards "
                "every step (the curves above are rank 0's); the whole model's gradient "
                "norm, the square root of the sum over shards of their squared norms "
                f"(a replicated shard counted once), on the compared steps: {shown}"
            )
    first: dict[int, tuple[int, str]] = dict(facts.nonfinite) if facts is not None else {}
    if own_nonfinite is not None:
        first.setdefault(0, (own_nonfinite[0], NONFINITE_KINDS.get(own_nonfinite[1], "non-finite")))
    for r, s in summaries.items():
        nf = s.get("nonfinite")
        if nf is not None:
            first.setdefault(r, (int(nf[0]), NONFINITE_KINDS.get(nf[1], "non-finite")))
    if first:
        notes.append(
            "first non-finite value per rank: "
            + "; ".join(
                f"rank {r}: {kind} at step {step}" for r, (step, kind) in sorted(first.items())
            )
        )
    for r in sorted(summaries):
        s = summaries[r]
        stopped, steps = s.get("stopped"), s.get("steps", 0)
        if stopped == "exception":
            notes.append(
                f"rank {r} ended with an exception after {steps} step(s): "
                f"{s.get('error') or 'see its traceback'}"
            )
        elif stopped == "terminated":
            notes.append(f"rank {r} was terminated (SIGTERM) after {steps} step(s)")
        elif stopped == "interrupted":
            notes.append(f"rank {r} was interrupted after {steps} step(s)")
    if facts is not None and facts.stop_requested:
        notes.append(
            "--stop-on: "
            + "; ".join(
                f"rank {r} confirmed {rule}" for r, rule in sorted(facts.stop_requested.items())
            )
            + " (every rank stopped at the same exchange step)"
        )
    if missing:
        notes.append(
            f"{_who(missing)} sent no report within {timeout:g} s (killed, or still "
            "running): what only they saw is not in this report"
        )
    for r in sorted(summaries):
        for n in summaries[r].get("notes", []):
            if n.startswith("internal netdoctor error"):
                notes.append(f"rank {r}: {n}")
    return notes


def _measurements(summaries, missing, facts) -> dict[str, Any]:
    out: dict[str, Any] = {
        "reported": [0, *sorted(summaries)],
        "missing": list(missing),
        "per_rank": {
            str(r): {"steps": s.get("steps"), "stopped": s.get("stopped"), "error": s.get("error")}
            for r, s in sorted(summaries.items())
        },
    }
    if facts is not None:
        out.update(
            {
                "world_size": facts.world_size,
                "backend": facts.backend,
                "exchanges": facts.exchanges,
                "compared_tensors": facts.compared_tensors,
                "largest_difference": facts.largest_difference,
                "broken": facts.broken,
            }
        )
        if facts.grad_norms:
            out["sharded_grad_norm"] = [[s, v] for s, v in facts.grad_norms]
    return out
