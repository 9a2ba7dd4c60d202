"""From a symptom list to a diagnosis: link each runtime finding to its likely root cause.

A finding's `cause` is the ID of the root finding it most likely follows from (e.g. raw 0..255
inputs ND301 -> dead ReLUs ND404 -> flat loss ND407: both ND404 and ND407 get cause "ND301"), so
`Report.fix_first()` picks the root's fix. Candidates are tried in order; only findings present
in the same report count. Torch-free.
"""

from __future__ import annotations

from netdoctor.findings import Finding, Severity

# Keys: a rule ID, or ND406+ / ND406- for update ratios that are too large / too small.
_NOT_LEARNING = (
    "ND304",
    "ND303",
    "ND302",
    "ND301",
    "ND202",
    "ND410",
    "ND108",
    "ND104",
    "ND103",
    "ND105",
    "ND106",
    "ND401",
    "ND404",
    "ND403",
    "ND405",
    "ND406+",
    "ND406-",
    "ND402",
    "ND102",
    "ND101",
    "ND201",
    "ND204",
)

# The training-loop rules (ND5xx, found inside the user's own training) are roots too: a flat
# loss follows from steps that change nothing, gradients that pile up, softmax fed to
# cross_entropy, ...
_LOOP_ROOTS = ("ND503", "ND502", "ND506", "ND507", "ND501", "ND505", "ND504")

CAUSES: dict[str, tuple[str, ...]] = {
    "ND401": (
        "ND304",
        "ND302",
        "ND301",
        "ND506",
        "ND501",
        "ND201",
        "ND204",
        "ND406+",
        "ND402",
        "ND101",
    ),
    "ND402": ("ND304", "ND302", "ND301", "ND501", "ND201", "ND204", "ND406+", "ND101"),
    "ND403": ("ND102", "ND101", "ND405", "ND202", "ND204", "ND302", "ND301", "ND406+", "ND404"),
    "ND404": ("ND302", "ND301", "ND202", "ND201", "ND406+", "ND402", "ND401", "ND204", "ND101"),
    "ND405": ("ND302", "ND301", "ND201", "ND102"),
    "ND406+": ("ND501", "ND302", "ND301"),
    "ND406-": ("ND503", "ND505", "ND410", "ND202", "ND404", "ND403", "ND405", "ND102", "ND101"),
    "ND407": _LOOP_ROOTS + _NOT_LEARNING,
    "ND408": ("ND506", "ND302", "ND301", "ND201", "ND105", "ND106"),
    "ND409": _LOOP_ROOTS + _NOT_LEARNING + ("ND407",),
    "ND410": ("ND503", "ND108", "ND103", "ND104"),
    "ND411": ("ND203",),
    "ND412": (
        "ND304",
        "ND303",
        "ND202",
        "ND410",
        "ND108",
        "ND104",
        "ND105",
        "ND106",
        "ND404",
        "ND403",
        "ND405",
        "ND102",
        "ND101",
        "ND302",
        "ND301",
    ),
}


def key_of(f: Finding) -> str:
    if f.rule == "ND406":
        return "ND406+" if (f.evidence or {}).get("direction") == "too-large" else "ND406-"
    if f.rule == "ND401" and (f.evidence or {}).get("kind") == "input":
        return "ND401"
    return f.rule


def _candidates(f: Finding) -> tuple[str, ...]:
    if f.rule == "ND401" and (f.evidence or {}).get("kind") == "input":
        return ("ND304",)
    return CAUSES.get(key_of(f), ())


def link_causes(findings: list[Finding]) -> None:
    """Set `cause` on every runtime finding that follows from another finding present
    (transitively, to the root). Static and data findings are roots and are left alone."""
    present: dict[str, Finding] = {}
    for f in findings:
        present.setdefault(key_of(f), f)

    def direct(f: Finding) -> Finding | None:
        for key in _candidates(f):
            other = present.get(key)
            if other is not None and other is not f and key_of(other) != key_of(f):
                return other
        return None

    def root(f: Finding, seen: set[int]) -> Finding:
        if id(f) in seen or not f.rule.startswith("ND4"):
            return f
        seen.add(id(f))
        parent = direct(f)
        return f if parent is None else root(parent, seen)

    for f in findings:
        if not f.rule.startswith("ND4") or f.cause is not None:
            continue
        r = root(f, set())
        if r is not f:
            f.cause = r.rule
            if (f.evidence or {}).get("fallback_fix"):
                f.fix = None  # "if nothing else explains it" -- something else does


# ------------------------------------------------------------------------------ data findings

DATA_SCALE = ("ND301", "ND302")


def learned_well(run) -> dict | None:
    """The run's numbers when it clearly learned -- the loss at least halved (mean of the last
    10% of steps against the first 10%) and, for classification, the accuracy at least halfway
    from chance to 1 -- else None."""
    from netdoctor.rules.runtime import cut_short, loss_window

    if run is None or run.steps_run < 10 or run.stopped or cut_short(run):
        return None
    first, last, k = loss_window(run)
    if first is None or last is None or not last <= 0.5 * first:
        return None
    accs = [a for a in run.accuracy[-k:] if a is not None]
    acc = sum(accs) / len(accs) if accs else None
    chance = run.chance
    if acc is not None and chance is not None and acc < chance + 0.5 * (1 - chance):
        return None
    return {
        "loss_first": first,
        "loss_last": last,
        "accuracy": acc,
        "chance": chance,
        "steps": run.steps_run,
    }


def settle_data_findings(findings: list[Finding], run, options: dict) -> None:
    """A scale finding (ND301/ND302) that training survived -- no runtime finding follows from
    it and the run learned well anyway -- is a risk, not what stops the model from learning: it
    is reported as info, with the run's numbers (unless its severity is configured)."""
    survived = learned_well(run)
    if survived is None:
        return
    if any(o.cause in DATA_SCALE and o.severity >= Severity.WARNING for o in findings):
        return
    for f in findings:
        if (
            f.rule not in DATA_SCALE
            or f.severity != Severity.WARNING
            or "severity" in options.get(f.rule, {})
        ):
            continue
        f.severity = Severity.INFO
        acc = survived["accuracy"]
        f.message += (
            f" Training survived it in the probe (loss {survived['loss_first']:.3g} -> "
            f"{survived['loss_last']:.3g} over {survived['steps']} steps"
            + (f", accuracy {acc:.2f}" if acc is not None else "")
            + "), so it is reported as info: scaling is still the safer input, but it "
            "is not what decides whether this model learns."
        )
        f.evidence = {**(f.evidence or {}), "training_survived": survived}
