"""From a symptom list to a diagnosis: link each runtime finding to its likely root cause.

A finding's `cause` is the ID of the root finding it most likely follows from (e.g. raw 0..255
inputs ND301 -> dead ReLUs ND404 -> flat loss ND407: both ND404 and ND407 get cause "ND301"), so
`Report.fix_first()` picks the root's fix. Candidates are tried in order; only findings present
in the same report count. Torch-free.
"""

from __future__ import annotations

from netdoctor.findings import Finding

# Keys: a rule ID, or ND406+ / ND406- for update ratios that are too large / too small.
_NOT_LEARNING = ("ND304", "ND303", "ND301", "ND302", "ND202", "ND410", "ND108", "ND104",
                 "ND103", "ND105", "ND106", "ND401", "ND404", "ND403", "ND405", "ND406+",
                 "ND406-", "ND402", "ND102", "ND101", "ND201", "ND204")

# The training-loop rules (ND5xx, found inside the user's own training) are roots too: a flat
# loss follows from steps that change nothing, gradients that pile up, softmax fed to
# cross_entropy, ...
_LOOP_ROOTS = ("ND503", "ND502", "ND506", "ND507", "ND501", "ND505", "ND504")

CAUSES: dict[str, tuple[str, ...]] = {
    "ND401": ("ND304", "ND301", "ND302", "ND506", "ND501", "ND201", "ND204", "ND406+", "ND402",
              "ND101"),
    "ND402": ("ND304", "ND301", "ND302", "ND501", "ND201", "ND204", "ND406+", "ND101"),
    "ND403": ("ND102", "ND101", "ND405", "ND202", "ND204", "ND301", "ND302", "ND406+",
              "ND404"),
    "ND404": ("ND301", "ND302", "ND202", "ND201", "ND406+", "ND402", "ND401", "ND204",
              "ND101"),
    "ND405": ("ND301", "ND302", "ND201", "ND102"),
    "ND406+": ("ND501", "ND301", "ND302"),
    "ND406-": ("ND503", "ND505", "ND410", "ND202", "ND404", "ND403", "ND405", "ND102",
               "ND101"),
    "ND407": _LOOP_ROOTS + _NOT_LEARNING,
    "ND408": ("ND506", "ND301", "ND302", "ND201", "ND105", "ND106"),
    "ND409": _LOOP_ROOTS + _NOT_LEARNING + ("ND407",),
    "ND410": ("ND503", "ND108", "ND103", "ND104"),
    "ND411": ("ND203",),
    "ND412": ("ND304", "ND303", "ND202", "ND410", "ND108", "ND104", "ND105", "ND106", "ND404",
              "ND403", "ND405", "ND102", "ND101", "ND301", "ND302"),
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
