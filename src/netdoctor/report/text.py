"""Text reporter: rich output for people.

Renders into a StringIO so the caller decides where it goes; with color=False the output is plain
text (no ANSI escapes) that is safe for files, logs and tests.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from io import StringIO
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from netdoctor.catalogue import RULES
from netdoctor.findings import Finding, Location, Report, Severity
from netdoctor.report._common import aggregate_summary, rel_path, summary_phrase

if TYPE_CHECKING:
    from rich.table import Table

SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
GROUP_TITLE = {Severity.ERROR: "errors", Severity.WARNING: "warnings", Severity.INFO: "info"}
SPARK = "▁▂▃▄▅▆▇█"
EIGHTHS = " ▏▎▍▌▋▊▉█"
MAX_EVIDENCE = 6
HEADROOM_ROWS = 4  # the tightest modules the float16 headroom table shows
SPARK_WIDTH = 60
BAR_WIDTH = 30


# ----------------------------------------------------------------------------- small formatters


def fmt_num(x: Any) -> str:
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.3g}"


def fmt_fixed(x: Any) -> str:
    """Two decimals, for losses and accuracies (huge losses in scientific notation)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "?"
    if not math.isfinite(v) or abs(v) >= 1e4:
        return fmt_num(v)
    return f"{v:.2f}"


def fmt_location(loc: Location | None) -> str | None:
    if loc is None or not loc.path:
        return None
    path = rel_path(loc.path)
    return f"{path}:{loc.line}" if loc.line else path


def _is_number(v: Any) -> bool:
    return (
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        or (type(v).__name__.startswith(("float", "int")) and hasattr(v, "item"))
    )


def short_evidence(evidence: dict[str, Any]) -> str | None:
    """Only the short scalar numbers from the evidence, never the raw dump."""
    parts = [
        f"{k}={fmt_num(v)}"
        for k, v in evidence.items()
        if not str(k).startswith("_") and _is_number(v)
    ][:MAX_EVIDENCE]
    return ", ".join(parts) if parts else None


def _finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def sparkline(values: list[Any], width: int = SPARK_WIDTH) -> str:
    """A one-line sparkline; buckets that hold a non-finite value show as '×'."""
    vals: list[float] = []
    for v in values:
        try:
            vals.append(float(v))
        except (TypeError, ValueError):
            vals.append(float("nan"))
    if not vals:
        return ""
    n = len(vals)
    buckets: list[list[float]] = []
    if n <= width:
        buckets = [[v] for v in vals]
    else:
        for i in range(width):
            start, end = i * n // width, (i + 1) * n // width
            buckets.append(vals[start : max(end, start + 1)])
    means: list[float | None] = []
    for b in buckets:
        means.append(sum(b) / len(b) if all(math.isfinite(x) for x in b) else None)
    finite = [m for m in means if m is not None]
    if not finite:
        return "×" * len(means)
    lo, hi = min(finite), max(finite)
    chars = []
    for m in means:
        if m is None:
            chars.append("×")
        elif hi == lo:
            chars.append(SPARK[len(SPARK) // 2])
        else:
            chars.append(
                SPARK[min(len(SPARK) - 1, int((m - lo) / (hi - lo) * (len(SPARK) - 1) + 0.5))]
            )
    return "".join(chars)


def log_bar(value: float, lo: float, hi: float, width: int = BAR_WIDTH) -> str:
    """A bar whose length is log10(value) placed between log10 lo and hi (value > 0)."""
    if hi <= lo:
        frac = 1.0
    else:
        frac = (math.log10(value) - lo) / (hi - lo)
    frac = min(1.0, max(0.0, frac))
    eighths = max(1, round((0.04 + 0.96 * frac) * width * 8))
    full, part = divmod(eighths, 8)
    return "█" * full + (EIGHTHS[part] if part else "")


# ----------------------------------------------------------------------------- the printer


class _Printer:
    def __init__(self, console: Console) -> None:
        self.c = console

    def line(self, text: Text | str = "", indent: int = 0, wrap: bool = True) -> None:
        t = text if isinstance(text, Text) else Text(text)
        pad = " " * indent
        if not wrap:
            self.c.print(Text(pad) + t if indent else t, soft_wrap=True)
            return
        width = max(20, self.c.width - indent)
        for piece in t.wrap(self.c, width):
            piece.rstrip()
            self.c.print(Text(pad) + piece if indent else piece, soft_wrap=True)

    def code(self, source: str, lexer: str, indent: int = 4) -> None:
        from rich.syntax import Syntax  # pygments: only when there is code to show

        source = source.rstrip("\n")
        highlighted = Syntax(
            source, lexer, theme="ansi_dark", background_color="default"
        ).highlight(source)
        highlighted.rstrip()
        for piece in highlighted.split("\n", allow_blank=True):
            piece.rstrip()
            self.line(piece, indent=indent, wrap=False)

    def table(self, table: Table) -> None:
        buf = StringIO()
        sub = Console(
            file=buf,
            force_terminal=self.c.is_terminal,
            color_system="standard" if self.c.color_system else None,
            width=self.c.width,
            highlight=False,
        )
        sub.print(table)
        for raw in buf.getvalue().rstrip("\n").split("\n"):
            self.c.file.write(raw.rstrip() + "\n")


def _rule_label(rule_id: str) -> str:
    info = RULES.get(rule_id)
    return f"{rule_id} {info.name}" if info else rule_id


def _finding(p: _Printer, f: Finding) -> None:
    head = Text()
    head.append(f.rule, style="bold")
    head.append(" ")
    head.append(f.name, style="bold")
    head.append(" ")
    head.append(f"[{f.severity.label}]", style=SEVERITY_STYLE[f.severity])
    loc = fmt_location(f.location)
    if loc:
        head.append(" ")
        head.append(loc, style="underline")
    if f.module:
        head.append(" ")
        head.append(f"({f.module})", style="dim")
    p.line(head, indent=2)
    p.line(Text(f.message), indent=4)
    ev = short_evidence(f.evidence or {})
    if ev:
        p.line(Text(ev, style="dim"), indent=4)
    if f.cause:
        p.line(
            Text.assemble(("likely caused by ", "italic"), (_rule_label(f.cause), "bold italic")),
            indent=4,
        )
    if f.fix is not None:
        fix = Text.assemble(("fix: ", "bold green"), f.fix.summary)
        if not f.fix.safe:
            fix.append(" (unsafe: needs --unsafe-fixes)", style="dim")
        p.line(fix, indent=4)
        if f.fix.patch:
            lexer = "diff" if f.fix.kind == "diff" else "python"
            p.code(f.fix.patch, lexer, indent=6)


def _gradient_flow(p: _Printer, rows: Any) -> None:
    if not isinstance(rows, list) or not rows:
        return
    norms = []
    for r in rows:
        try:
            norms.append(float(r.get("grad_norm")))
        except (TypeError, ValueError, AttributeError):
            norms.append(float("nan"))
    positive = [math.log10(v) for v in norms if math.isfinite(v) and v > 0]
    lo, hi = (min(positive), max(positive)) if positive else (0.0, 0.0)
    names = [str(r.get("name", "?")) if isinstance(r, dict) else "?" for r in rows]
    name_width = min(max(len("layer"), *(len(n) for n in names)), max(12, p.c.width // 2))
    bar_width = max(5, min(BAR_WIDTH, p.c.width - name_width - 14))
    from rich.table import Table

    table = Table(
        title=None,
        box=None,
        show_header=True,
        header_style="bold",
        pad_edge=False,
        padding=(0, 2, 0, 0),
    )
    table.add_column("layer", overflow="fold", max_width=name_width)
    table.add_column("grad norm", justify="right", no_wrap=True, min_width=9)
    table.add_column("input → output", no_wrap=True, min_width=bar_width)
    for name, v in zip(names, norms):
        if not math.isfinite(v):
            table.add_row(name, Text(fmt_num(v), style="bold red"), Text("non-finite", style="red"))
        elif v <= 0:
            table.add_row(name, Text("0", style="red"), Text("·", style="red"))
        else:
            table.add_row(name, fmt_num(v), Text(log_bar(v, lo, hi, bar_width), style="green"))
    p.line(Text("Gradient flow", style="bold"))
    p.table(table)
    if positive and hi > lo:
        p.line(
            Text(
                f"bars: log scale from {fmt_num(10**lo)} to {fmt_num(10**hi)} "
                f"({hi - lo:.1f} decades)",
                style="dim",
            ),
            indent=2,
        )


def _loss_curve(p: _Printer, values: Any) -> None:
    if not isinstance(values, (list, tuple)) or not values:
        return
    line = Text()
    line.append("Loss curve ", style="bold")
    line.append(sparkline(list(values), max(10, min(SPARK_WIDTH, p.c.width - 40))), style="magenta")
    line.append(f"  {fmt_fixed(values[0])} → {fmt_fixed(values[-1])} ({len(values)} steps)")
    if not _finite(values):
        line.append("  (no finite values)", style="red")
    p.line(line, wrap=False)


def _headroom(p: _Printer, rows: Any, precision: Any) -> None:
    """The tightest modules' float16 headroom (65504 / max |output|) with their source lines;
    of the modules that overflowed, the first (forward order: the producer) is shown and the
    others, which only propagate its inf/NaN, are counted."""
    if not isinstance(rows, list) or not rows:
        return
    rows = [r for r in rows if isinstance(r, dict)]
    over = [r for r in rows if r.get("overflowed")]
    shown = over[:1] + [r for r in rows if not r.get("overflowed")]
    from rich.table import Table

    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    table.padding = (0, 2, 0, 0)
    table.add_column("module", overflow="fold", max_width=max(12, p.c.width // 3))
    table.add_column("max |out|", justify="right", no_wrap=True)
    table.add_column("headroom", justify="right", no_wrap=True)
    table.add_column("built at", overflow="fold")
    for r in shown[:HEADROOM_ROWS]:
        name = str(r.get("module") or "(model)")
        if r.get("module_type"):
            name += f" ({r['module_type']})"
        loc = r.get("location") or {}
        where = fmt_location(Location(loc["path"], loc.get("line"))) if loc.get("path") else ""
        if r.get("overflowed"):
            table.add_row(
                name, Text("inf", style="bold red"), Text("overflowed", style="bold red"), where
            )
        else:
            h = r.get("fp16_headroom")
            style = "yellow" if isinstance(h, (int, float)) and h < 8 else ""
            table.add_row(name, fmt_num(r.get("max_abs")), Text(f"{fmt_num(h)}x", style), where)
    what = "bfloat16 autocast; what float16 would leave" if precision == "bf16" else "float16"
    p.line(Text.assemble(("Float16 headroom", "bold"), f" ({what}: 65504 / max |output|)"))
    p.table(table)
    if len(over) > 1:
        p.line(
            Text(f"{len(over) - 1} module(s) after it were non-finite too (they propagate it)"),
            indent=2,
        )


def _side(d: Any) -> str:
    d = d if isinstance(d, dict) else {}
    text = f"{fmt_fixed(d.get('loss_first'))} → {fmt_fixed(d.get('loss_last'))}"
    if d.get("accuracy") is not None:
        text += f" (accuracy {fmt_fixed(d.get('accuracy'))})"
    return text


def _symptom_text(s: Any, before: bool = True) -> str | None:
    if not isinstance(s, dict) or not s.get("name"):
        return None
    text = f"{s['name']}: "
    if before:
        text += f"{s.get('before_text', '?')} → "
    text += str(s.get("after_text", "?"))
    if s.get("gone"):
        text += " (symptom gone)"
    return text


def _verified_fix(p: _Printer, v: Any) -> None:
    """The verified fix: what was applied, the outcome before → after, the symptom's
    measurement before → after, and the attempts that did not work (or all of them)."""
    if not isinstance(v, dict):
        return
    improved = v.get("improved", True)
    outcome = v.get("outcome_improved", improved)
    steps = v.get("steps")
    line = Text()
    if improved:
        line.append("Verified fix: ", style="bold green")
        what = v.get("applied") or v.get("fix")
    else:
        line.append("Fix not verified: ", style="bold yellow")
        what = None
    if what:
        line.append(f"{what}: ")
    if improved:
        line.append(f"loss {_side(v.get('before'))} became {_side(v.get('after'))}")
        if steps:
            line.append(f" over {steps} steps", style="dim")
        if not outcome:
            line.append(" (the loss and accuracy did not improve in this short run)")
    else:
        attempts = v.get("attempts") or []
        sym = _symptom_dict(v)
        if sym.get("present_before") is False:
            line.append(
                f"the probe showed no {sym.get('name')} problem for it to remove "
                f"({sym.get('before_text')}; the rule's threshold is "
                f"{sym.get('threshold_text')}), and "
            )
        if v.get("baseline_learned_well"):
            line.append(
                f"the model learned well without it (loss {_side(v.get('before'))}"
                + (f" over {steps} steps" if steps else "")
                + "), so this short run had nothing for it to improve"
                + (f"; tried {len(attempts)}:" if attempts else "")
            )
        else:
            line.append(
                f"nothing tried improved the probe's loss {_side(v.get('before'))}"
                + (f" over {steps} steps" if steps else "")
                + (f"; tried {len(attempts)}:" if attempts else "")
            )
    p.line(line)
    symptom = _symptom_text(v.get("symptom"))
    if symptom and improved:
        p.line(Text(symptom), indent=2)
    tried = [a for a in v.get("attempts") or [] if isinstance(a, dict)]
    if improved:
        tried = [
            a for a in tried if a.get("applied") != v.get("applied") or a.get("steps") != steps
        ]
    if improved and symptom is None and not tried:
        return
    for a in tried:
        t = Text(("tried " if improved else "") + f"{a.get('applied', '?')}: ")
        if a.get("error"):
            t.append(f"the re-run failed ({a['error']})")
        else:
            t.append(f"loss {_side(a.get('after'))}")
            if a.get("symptom_text") and isinstance(v.get("symptom"), dict):
                t.append(f", {v['symptom']['name']} {a['symptom_text']}")
            if a.get("steps") and a.get("steps") != steps:
                t.append(f" ({a['steps']} steps)")
        p.line(t, indent=2)
    sym = _symptom_dict(v)
    if not improved and symptom and sym.get("present_before") is not False:
        p.line(Text("before: " + symptom.split(" → ")[0]), indent=2)


def verified_fix_lines(verified: dict[str, Any]) -> list[str]:
    """The verified-fix block as plain lines, unwrapped, details indented (for the html
    report: one wording)."""
    buf = StringIO()
    console = Console(file=buf, width=10_000, color_system=None, highlight=False, markup=False)
    _verified_fix(_Printer(console), verified)
    return [line.rstrip() for line in buf.getvalue().splitlines() if line.strip()]


def _symptom_dict(verified: dict[str, Any]) -> dict[str, Any]:
    symptom = verified.get("symptom")
    return symptom if isinstance(symptom, dict) else {}


def _report(p: _Printer, report: Report) -> None:
    title = Text()
    title.append(f"netdoctor {report.command} ", style="bold")
    title.append(report.target, style="bold cyan")
    p.c.rule(title, align="left", characters="─")
    first = report.fix_first()
    if first is not None and first.fix is not None:
        line = Text()
        line.append("Fix first:", style="bold reverse magenta")
        line.append(" ")
        line.append(f"{first.rule} {first.name}", style="bold")
        line.append(f" — {first.fix.summary}")
        where = fmt_location(first.location) or first.module
        if where:
            line.append(f" ({where})", style="dim")
        p.line(line)
    findings = report.sorted_findings()
    for sev in (Severity.ERROR, Severity.WARNING, Severity.INFO):
        group = [f for f in findings if f.severity == sev]
        if not group:
            continue
        p.line()
        p.line(Text(f"{GROUP_TITLE[sev]} ({len(group)})", style=SEVERITY_STYLE[sev] + " bold"))
        for f in group:
            _finding(p, f)
    m = report.measurements or {}
    if any(k in m for k in ("gradient_flow", "loss_curve", "verified_fix")):
        p.line()
    if "gradient_flow" in m:
        _gradient_flow(p, m["gradient_flow"])
    if "loss_curve" in m:
        _loss_curve(p, m["loss_curve"])
    if "headroom" in m:
        _headroom(p, m["headroom"], (m.get("probe") or {}).get("precision"))
    if "verified_fix" in m:
        _verified_fix(p, m["verified_fix"])
    if report.notes:
        p.line()
        for note in report.notes:
            p.line(Text.assemble(("note: ", "dim bold"), (note, "dim")))
    p.line()
    counts = report.summary()
    style = "bold red" if counts["error"] else "yellow" if counts["warning"] else "green"
    p.line(Text(summary_phrase(counts), style=style))


def _auto_color() -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return sys.stdout.isatty()


def render(reports: list[Report], *, color: bool | None = None, width: int | None = None) -> str:
    if color is None:
        color = _auto_color()
    buf = StringIO()
    console = Console(
        file=buf,
        force_terminal=color,
        width=width or 100,
        color_system="standard" if color else None,
        highlight=False,
        emoji=False,
        markup=False,
    )
    p = _Printer(console)
    for i, report in enumerate(reports):
        if i:
            p.line()
        _report(p, report)
    if len(reports) > 1:
        counts = aggregate_summary(reports)
        p.line()
        total = Text(f"{len(reports)} targets: {summary_phrase(counts)}", style="bold")
        p.line(total)
    elif not reports:
        p.line("nothing to check: no targets")
    return buf.getvalue()
