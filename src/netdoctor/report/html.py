"""HTML reporter: one self-contained page (styles, scripts and charts inlined; nothing is
fetched when it opens) with the findings as the text report groups them, "fix first" on top,
and for probe and run the charts of `netdoctor.report.charts`.

Everything taken from the report (targets, paths, messages, code) is escaped; the page's
Content-Security-Policy forbids any request besides its own inline scripts and styles.
Torch-free.
"""

from __future__ import annotations

import html
from typing import Any

from netdoctor.catalogue import RULES
from netdoctor.findings import Finding, Report, Severity
from netdoctor.report._common import aggregate_summary, rel_path, summary_phrase
from netdoctor.report.charts import Chart, charts
from netdoctor.report.text import (
    GROUP_TITLE,
    fmt_location,
    fmt_num,
    short_evidence,
    verified_fix_lines,
)

# Only what the page carries: its inline scripts and styles; images from data: and blob: (plotly's
# "download plot as a png" draws one).
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:"
)
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["lasso2d"]}

STYLE = """
:root { --err: #c62828; --warn: #b26a00; --info: #0277bd; --ok: #2e7d32; --line: #e3e6ea;
  --muted: #5f6b7a; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: #1f2328;
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; font-weight: 600; }
h1 code { font-size: 20px; color: #0b5cad; }
h2 { font-size: 18px; margin: 32px 0 12px; padding-bottom: 6px; border-bottom: 1px solid
  var(--line); }
h3 { font-size: 15px; margin: 22px 0 10px; text-transform: uppercase; letter-spacing: .04em; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.summary { color: var(--muted); margin: 0 0 18px; }
.summary b.error { color: var(--err); } .summary b.warning { color: var(--warn); }
.summary b.clean { color: var(--ok); }
.report { margin-bottom: 40px; }
.fix-first { background: #fff; border: 1px solid var(--line); border-left: 6px solid #8e24aa;
  border-radius: 8px; padding: 12px 16px; margin: 12px 0 8px; }
.fix-first .label { display: inline-block; background: #8e24aa; color: #fff; font-weight: 600;
  font-size: 12px; padding: 1px 8px; border-radius: 10px; margin-right: 8px;
  text-transform: uppercase; letter-spacing: .04em; }
.settings { color: var(--muted); font-size: 13px; margin: 6px 0 0; }
.settings span { margin-right: 14px; white-space: nowrap; }
h3.error { color: var(--err); } h3.warning { color: var(--warn); } h3.info { color: var(--info); }
.finding { background: #fff; border: 1px solid var(--line); border-left: 5px solid var(--info);
  border-radius: 8px; padding: 12px 16px; margin: 0 0 12px; }
.finding.error { border-left-color: var(--err); }
.finding.warning { border-left-color: var(--warn); }
.finding .head { display: flex; flex-wrap: wrap; gap: 4px 10px; align-items: baseline; }
.finding .rule { font-weight: 700; }
.finding .name { font-weight: 600; }
.finding .title { color: var(--muted); font-size: 13px; width: 100%; }
.badge { font-size: 12px; font-weight: 600; padding: 0 8px; border-radius: 10px; color: #fff; }
.badge.error { background: var(--err); } .badge.warning { background: var(--warn); }
.badge.info { background: var(--info); }
.where { color: #0b5cad; font-family: ui-monospace, monospace; font-size: 13px; }
.module { color: var(--muted); font-size: 13px; }
.message { margin: 8px 0 4px; white-space: pre-wrap; }
.evidence { color: var(--muted); font-size: 13px; margin: 4px 0; }
.cause { font-style: italic; margin: 4px 0; }
.fix { margin: 8px 0 4px; } .fix b { color: var(--ok); }
.unsafe { color: var(--muted); font-size: 13px; }
details summary { cursor: pointer; color: var(--muted); font-size: 13px; margin: 2px 0; }
.code { background: #f6f8fa; border: 1px solid var(--line); border-radius: 6px; margin: 6px 0 0;
  overflow-x: auto; }
.code pre { margin: 0; padding: 10px 12px; font-size: 13px; line-height: 1.45; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
  gap: 16px; }
.chart { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
.chart p { color: var(--muted); font-size: 13px; margin: 4px 8px 6px; }
.verified { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 16px; margin-bottom: 16px; }
.verified .ok { color: var(--ok); font-weight: 600; }
.verified .no { color: var(--warn); font-weight: 600; }
.verified ul { margin: 6px 0 0; color: var(--muted); }
table.ranks { border-collapse: collapse; background: #fff; font-size: 14px; }
table.ranks th, table.ranks td { border: 1px solid var(--line); padding: 4px 12px;
  text-align: left; }
.notes { color: var(--muted); font-size: 13px; padding-left: 20px; }
.clean { color: var(--ok); font-weight: 600; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; }
"""

SEVERITY_CLASS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "info"}


def e(value: Any) -> str:
    """Escaped for html text and attribute values."""
    return html.escape(str(value), quote=True)


def render(reports: list[Report]) -> str:
    """The page for `reports` (one per target)."""
    from netdoctor.version import __version__

    drawn = [charts(r) for r in reports]
    scripts = ""
    if any(drawn):
        from plotly.offline import get_plotlyjs

        scripts = f"<script>{get_plotlyjs()}</script>"
    title = (
        f"netdoctor {reports[0].command} {reports[0].target}"
        if len(reports) == 1
        else f"netdoctor: {len(reports)} targets"
    )
    body = []
    if len(reports) > 1:
        body.append(_contents(reports))
    elif not reports:
        body.append("<p>nothing to check: no targets</p>")
    for i, (report, made) in enumerate(zip(reports, drawn)):
        body.append(_report(report, i, made))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="netdoctor {e(__version__)}">\n'
        f"<title>{e(title)}</title>\n<style>{STYLE}{_code_style()}</style>\n{scripts}\n"
        "</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + f"\n<footer>netdoctor {e(__version__)}</footer>\n</main>\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------- the parts


def _contents(reports: list[Report]) -> str:
    counts = aggregate_summary(reports)
    items = "".join(
        f'<li><a href="#report-{i}"><code>{e(r.target)}</code></a>: '
        f"{e(summary_phrase(r.summary()))}</li>"
        for i, r in enumerate(reports)
    )
    return (
        f"<h1>netdoctor: {len(reports)} targets</h1>"
        f'<p class="summary">{e(summary_phrase(counts))}</p><ul>{items}</ul>'
    )


def _summary(report: Report) -> str:
    counts = report.summary()
    if not counts["total"]:
        return '<p class="summary"><b class="clean">no problems found</b></p>'
    parts = []
    for label in ("error", "warning", "info"):
        n = counts[label]
        word = label if n == 1 or label == "info" else label + "s"
        parts.append(f'<b class="{label}">{n} {word}</b>' if n else f"{n} {word}")
    return f'<p class="summary">{", ".join(parts)}</p>'


def _report(report: Report, index: int, made: list[Chart]) -> str:
    anchors = {id(f): f"finding-{index}-{k}" for k, f in enumerate(report.sorted_findings())}
    out = [
        f'<section class="report" id="report-{index}" data-command="{e(report.command)}">',
        f"<h1>netdoctor {e(report.command)} <code>{e(report.target)}</code></h1>",
        _summary(report),
        _settings(report.measurements or {}),
    ]
    first = report.fix_first()
    if first is not None and first.fix is not None:
        where = fmt_location(first.location) or first.module
        out.append(
            f'<div class="fix-first"><span class="label">Fix first</span>'
            f'<a href="#{anchors[id(first)]}"><b>{e(first.rule)} {e(first.name)}</b></a> — '
            f"{e(first.fix.summary)}"
            + (f' <span class="where">({e(where)})</span>' if where else "")
            + "</div>"
        )
    findings = report.sorted_findings()
    if findings:
        out.append("<h2>Findings</h2>")
    for sev in (Severity.ERROR, Severity.WARNING, Severity.INFO):
        group = [f for f in findings if f.severity == sev]
        if not group:
            continue
        cls = SEVERITY_CLASS[sev]
        out.append(f'<h3 class="{cls}">{GROUP_TITLE[sev]} ({len(group)})</h3>')
        out.extend(_finding(f, anchors[id(f)], report, anchors, f is first) for f in group)
    by_key = {c.key: c for c in made}
    curves = [c for c in made if c.key != "verified-fix"]
    if curves:
        out.append("<h2>Training curves</h2>")
        out.append('<div class="charts">')
        out.extend(_chart(c, index) for c in curves)
        out.append("</div>")
    verified = (report.measurements or {}).get("verified_fix")
    if isinstance(verified, dict):
        out.append(_verified(verified, by_key.get("verified-fix"), index))
    run = (report.measurements or {}).get("run")
    if isinstance(run, dict) and isinstance(run.get("ranks"), dict):
        out.append(_ranks(run, findings, anchors))
    if report.notes:
        out.append("<h2>Notes</h2>")
        out.append(
            '<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in report.notes) + "</ul>"
        )
    out.append("</section>")
    return "\n".join(out)


def _settings(m: dict[str, Any]) -> str:
    """What the run trained with, one line (probe: its settings; run: steps and optimizers)."""
    items: list[tuple[str, Any]] = []
    probe = m.get("probe")
    if isinstance(probe, dict):
        for key, label in (
            ("steps", "steps"),
            ("batch_size", "batch"),
            ("optimizer", "optimizer"),
            ("lr", "lr"),
            ("loss", "loss"),
            ("precision", "precision"),
            ("device", "device"),
            ("seed", "seed"),
        ):
            if probe.get(key) is not None:
                items.append((label, probe[key]))
    run = m.get("run")
    if isinstance(run, dict):
        items.append(("steps", run.get("steps")))
        for o in run.get("optimizers") or []:
            if isinstance(o, dict):
                lr = o.get("lr_first")
                items.append((str(o.get("label")), f"lr {fmt_num(lr)}" if lr is not None else ""))
    if not items:
        return ""
    spans = "".join(
        f"<span>{e(k)} <b>{e(fmt_num(v) if not isinstance(v, str) else v)}</b></span>"
        for k, v in items
    )
    return f'<p class="settings">{spans}</p>'


def _finding(f: Finding, anchor: str, report: Report, anchors: dict[int, str], first: bool) -> str:
    """One finding as the text report shows it; its patch folded, unless it is the fix
    first."""
    cls = SEVERITY_CLASS[f.severity]
    info = RULES.get(f.rule)
    head = [
        f'<span class="rule">{e(f.rule)}</span>',
        f'<span class="name">{e(f.name)}</span>',
        f'<span class="badge {cls}">{cls}</span>',
    ]
    where = fmt_location(f.location)
    if where:
        head.append(f'<span class="where">{e(where)}</span>')
    if f.module:
        head.append(f'<span class="module">({e(f.module)})</span>')
    if info is not None:
        head.append(f'<span class="title">{e(info.summary)}</span>')
    out = [
        f'<article class="finding {cls}" id="{anchor}" data-rule="{e(f.rule)}">',
        f'<div class="head">{"".join(head)}</div>',
        f'<p class="message">{e(f.message)}</p>',
    ]
    ev = short_evidence(f.evidence or {})
    if ev:
        out.append(f'<p class="evidence">{e(ev)}</p>')
    if f.cause:
        cause = next((x for x in report.sorted_findings() if x.rule == f.cause), None)
        label = f"{f.cause} {RULES[f.cause].name}" if f.cause in RULES else f.cause
        link = f'<a href="#{anchors[id(cause)]}">{e(label)}</a>' if cause else f"<b>{e(label)}</b>"
        out.append(f'<p class="cause">likely caused by {link}</p>')
    if f.fix is not None:
        unsafe = (
            ' <span class="unsafe">(unsafe: needs --unsafe-fixes)</span>' if not f.fix.safe else ""
        )
        out.append(f'<p class="fix"><b>fix:</b> {e(f.fix.summary)}{unsafe}</p>')
        if f.fix.patch:
            diff = f.fix.kind == "diff"
            what = f"the patch ({rel_path(f.fix.path)})" if diff and f.fix.path else "the code"
            out.append(
                f"<details{' open' if first else ''}><summary>{e(what)}</summary>"
                f"{_code(f.fix.patch, 'diff' if diff else 'python')}</details>"
            )
    out.append("</article>")
    return "\n".join(out)


def _code(source: str, language: str) -> str:
    """Highlighted with pygments (it escapes the code)."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import DiffLexer, PythonLexer

    lexer = DiffLexer() if language == "diff" else PythonLexer()
    return highlight(source.rstrip("\n") + "\n", lexer, HtmlFormatter(cssclass="code"))


def _code_style() -> str:
    from pygments.formatters import HtmlFormatter

    return HtmlFormatter(style="default").get_style_defs(".code")


def _chart(chart: Chart, index: int) -> str:
    import plotly.io as pio

    div = pio.to_html(
        chart.figure,
        full_html=False,
        include_plotlyjs=False,
        div_id=f"chart-{index}-{chart.key}",
        config=PLOTLY_CONFIG,
    )
    return (
        f'<figure class="chart" data-chart="{e(chart.key)}" style="margin:0">{div}'
        f"<p>{e(chart.caption)}</p></figure>"
    )


def _verified(v: dict[str, Any], chart: Chart | None, index: int) -> str:
    lines = verified_fix_lines(v)
    if not lines:
        return ""
    head, details = lines[0], [line.strip() for line in lines[1:]]
    label, _, rest = head.partition(": ")
    cls = "ok" if v.get("improved", True) else "no"
    out = [
        "<h2>Verified fix</h2>",
        f'<div class="verified"><p><span class="{cls}">{e(label)}:</span> {e(rest)}</p>',
    ]
    if details:
        out.append("<ul>" + "".join(f"<li>{e(d)}</li>" for d in details) + "</ul>")
    out.append("</div>")
    if chart is not None:
        out.append(f'<div class="charts">{_chart(chart, index)}</div>')
    return "\n".join(out)


def _ranks(run: dict[str, Any], findings: list[Finding], anchors: dict[int, str]) -> str:
    """A distributed run (`measurements["run"]`): how each rank ended, and the findings only
    some ranks made (`evidence["ranks"]`, see `netdoctor.watcher.ranks`)."""
    ranks = run["ranks"]
    per_rank = dict(ranks.get("per_rank") or {})
    per_rank.setdefault("0", {"steps": run.get("steps"), "stopped": run.get("stopped")})
    missing = {str(r) for r in ranks.get("missing") or []}
    rows = []
    for r in sorted({*per_rank, *missing}, key=lambda k: int(k) if k.isdigit() else 0):
        s = per_rank.get(r) or {}
        ended = "sent no report" if r in missing else (s.get("stopped") or "finished")
        steps = s.get("steps")
        rows.append(
            f"<tr><td>{e(r)}</td><td>{e(steps if steps is not None else '')}</td>"
            f"<td>{e(ended)}</td><td>{e(s.get('error') or '')}</td></tr>"
        )
    outliers = [f for f in findings if isinstance((f.evidence or {}).get("ranks"), list)]
    out = [
        "<h2>Ranks</h2>",
        '<table class="ranks"><tr><th>rank</th><th>steps</th><th>ended</th><th>error</th></tr>',
        *rows,
        "</table>",
    ]
    facts = [
        f"{label} {e(ranks[key])}"
        for key, label in (
            ("world_size", "world size"),
            ("backend", "backend"),
            ("exchanges", "compared steps"),
            ("largest_difference", "largest replica difference"),
        )
        if ranks.get(key) is not None
    ]
    if facts:
        out.append(f'<p class="settings">{" · ".join(facts)}</p>')
    if outliers:
        out.append("<h3>Per-rank outliers</h3><ul>")
        for f in outliers:
            who = ", ".join(str(r) for r in f.evidence["ranks"])
            out.append(
                f'<li><a href="#{anchors[id(f)]}">{e(f.rule)} {e(f.name)}</a>: '
                f"only on rank{'s' if len(f.evidence['ranks']) > 1 else ''} {e(who)}</li>"
            )
        out.append("</ul>")
    return "\n".join(out)
