"""The html report's charts: plotly figures of a probe's or a watched run's curves
(`Report.curves`) and gradient flow (`measurements["gradient_flow"]`). Only the charts with data
are made. plotly is the optional `html` extra; torch-free."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from netdoctor.curves import Curves
from netdoctor.errors import UserError
from netdoctor.findings import Report

if TYPE_CHECKING:
    import plotly.graph_objects as go

#: Lines drawn per chart at most: a deep model's layers are sampled evenly, ends included.
MAX_LINES = 12
#: CS231n's rule of thumb for the update/weight ratio (rules/ND406.md).
UPDATE_RATIO_GUIDE = 1e-3
#: A series spanning more than this factor gets a log axis.
LOG_SPAN = 100.0
HEIGHT = 340
COLORS = {"before": "#d62728", "after": "#2ca02c", "loss": "#1f77b4", "accuracy": "#ff7f0e"}


@dataclass
class Chart:
    """One chart of the report: `key` names it in the page (`data-chart`), `caption` says how
    to read it."""

    key: str
    title: str
    caption: str
    figure: go.Figure


def require_plotly() -> None:
    """UserError (exit 2) when plotly, the `html` extra, is missing."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise UserError(
            "the html report needs plotly, which is not installed: pip install 'netdoctor[html]'"
        ) from None


def charts(report: Report) -> list[Chart]:
    """The report's charts, in reading order; none for a report without curves (check)."""
    c = report.curves
    flow = report.measurements.get("gradient_flow") if report.measurements else None
    if c is None and not flow:
        return []
    require_plotly()
    c = c or Curves()
    made = [
        _loss(c),
        _gradient_flow(flow),
        _grad_norm(c),
        _update_ratio(c),
        _learning_rate(c),
        *(_scale(c, i) for i in range(len(c.scalers))),
        _activations(c),
        _verified_fix(c),
    ]
    return [x for x in made if x is not None]


# ----------------------------------------------------------------------------- helpers


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _log_axis(values: Sequence[float | None], zeros: bool = False) -> float:
    """The decades positive values span when it is more than LOG_SPAN (a log axis then), else
    0; with `zeros`, zeros may be among them (norms: a log axis leaves a gap where one is)."""
    v = _finite(values)
    positive = [x for x in v if x > 0]
    if not positive or min(v) < 0 or (min(v) == 0 and not zeros):
        return 0.0
    span = max(positive) / min(positive)
    return math.log10(span) if span > LOG_SPAN else 0.0


def _sampled(n: int, limit: int = MAX_LINES) -> list[int]:
    """Indices of at most `limit` of n items, evenly spaced, first and last included."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def _figure(title: str, x_title: str, y_title: str, decades: float = 0.0) -> go.Figure:
    """An empty chart; `decades` > 0: a log y axis over that span."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(
        template="plotly_white",
        title={"text": title, "x": 0.02, "font": {"size": 15}},
        height=HEIGHT,
        margin={"l": 60, "r": 20, "t": 48, "b": 48},
        legend={"font": {"size": 11}},
        hovermode="x unified",
    )
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title, exponentformat="e")
    if decades:  # a tick every decade, or every few when they are many
        fig.update_yaxes(type="log", dtick=max(1, math.ceil(decades / 8)))
    return fig


def _aligned(
    steps: Sequence[int], values: Sequence[float | None]
) -> tuple[list[int], list[float | None]]:
    """(steps, values) of a per-layer trace, paired from the first measured step (a run that
    stopped on a NaN has one value fewer of some traces)."""
    n = min(len(steps), len(values))
    return list(steps[:n]), list(values[:n])


def _label(text: Any) -> str:
    """A name from the user's code as plotly shows it: plotly reads labels as a little html
    (<b>, <br>, entities), so they are escaped to show as written."""
    return html.escape(str(text), quote=False)


def _mode(points: int) -> str:
    return "lines+markers" if points <= 60 else "lines"


def _layer_colors(n: int) -> list[str]:
    """Input to output: one colour scale, so depth reads the same in every chart."""
    from plotly.colors import sample_colorscale

    return sample_colorscale("Viridis", [i / max(1, n - 1) * 0.9 for i in range(n)])


def _steps(values: Sequence[Any]) -> list[int]:
    return list(range(1, len(values) + 1))


def _mark_nonfinite(fig: go.Figure, values: Sequence[float | None], what: str) -> None:
    """A red line at the first step whose value was not finite (a gap in the curve)."""
    first = next((i + 1 for i, v in enumerate(values) if v is None), None)
    if first is None or not _finite(values):
        return
    fig.add_vline(
        x=first,
        line={"color": "#d62728", "dash": "dot"},
        annotation_text=f"{what} not finite from step {first}",
        annotation_font_color="#d62728",
    )


def _sampled_caption(shown: int, total: int, what: str) -> str:
    return f" {shown} of the {total} {what} are drawn, evenly spaced." if shown < total else ""


# ----------------------------------------------------------------------------- the charts


def _loss(c: Curves) -> Chart | None:
    if not _finite(c.loss):
        return None
    import plotly.graph_objects as go

    fig = _figure("Loss", "step", "loss", _log_axis(c.loss))
    x = _steps(c.loss)
    fig.add_trace(
        go.Scatter(x=x, y=c.loss, mode="lines", name="loss", line={"color": COLORS["loss"]})
    )
    caption = "The training loss at every step."
    measured = [(i + 1, v) for i, v in enumerate(c.accuracy) if v is not None]
    if measured:  # a watched run measures it on the deep steps only
        fig.add_trace(
            go.Scatter(
                x=[i for i, _ in measured],
                y=[v for _, v in measured],
                mode="lines" if len(measured) == len(c.accuracy) else "lines+markers",
                name="accuracy",
                yaxis="y2",
                line={"color": COLORS["accuracy"], "width": 1},
            )
        )
        fig.update_layout(
            yaxis2={
                "title": "accuracy",
                "overlaying": "y",
                "side": "right",
                "range": [0, 1],
                "tickmode": "auto",
                "tickformat": ".0%",
                "showgrid": False,
            },
            legend={"orientation": "h", "y": -0.25},
        )
        caption += " Accuracy (right axis): the batch's, on the steps that measured it."
    _mark_nonfinite(fig, c.loss, "loss")
    return Chart("loss", "Loss", caption, fig)


def _gradient_flow(rows: Any) -> Chart | None:
    if not isinstance(rows, list) or not rows:
        return None
    import plotly.graph_objects as go

    names = [_label(r.get("name", "?")) for r in rows if isinstance(r, dict)]
    means = [_number(r.get("grad_norm")) for r in rows if isinstance(r, dict)]
    maxes = [_number(r.get("grad_norm_max")) for r in rows if isinstance(r, dict)]
    if not [v for v in means + maxes if v is not None and v > 0]:
        return None
    log = _log_axis(means + maxes, zeros=True)
    fig = _figure("Gradient flow", "layer (input → output)", "gradient norm", log)
    if any(v is not None for v in maxes):
        fig.add_trace(
            go.Bar(x=names, y=maxes, name="max over steps", marker_color="rgba(31,119,180,0.3)")
        )
    fig.add_trace(go.Bar(x=names, y=means, name="mean over steps", marker_color="#1f77b4"))
    fig.update_layout(barmode="overlay", hovermode="x")
    fig.update_xaxes(type="category")
    caption = (
        "Each weight layer's gradient norm, from the input to the output"
        + (" (log scale)" if log else "")
        + ". Falling towards the input: vanishing gradients; a missing bar: no gradient."
    )
    return Chart("gradient-flow", "Gradient flow", caption, fig)


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _per_layer(
    c: Curves, values_of: str, title: str, y_title: str, key: str, caption: str
) -> Chart | None:
    layers = [
        layer
        for layer in c.layers
        if _finite(_aligned(c.measured_steps, getattr(layer, values_of))[1])
    ]
    if not layers:
        return None
    import plotly.graph_objects as go

    picked = _sampled(len(layers))
    everything = [v for layer in layers for v in getattr(layer, values_of)]
    fig = _figure(title, "step", y_title, _log_axis(everything, zeros=True))
    colors = _layer_colors(len(picked))
    for color, i in zip(colors, picked):
        layer = layers[i]
        values = getattr(layer, values_of)
        x, values = _aligned(c.measured_steps, values)
        fig.add_trace(
            go.Scatter(
                x=x, y=values, mode=_mode(len(x)), name=_label(layer.name), line={"color": color}
            )
        )
    caption += _sampled_caption(len(picked), len(layers), "layers")
    return Chart(key, title, caption, fig)


def _grad_norm(c: Curves) -> Chart | None:
    chart = _per_layer(
        c,
        "grad_norm",
        "Gradient norm over steps",
        "gradient norm",
        "grad-norm",
        "Per weight layer on the measured steps (input: dark, output: light), and the total "
        "over all layers at every step (grey).",
    )
    total = c.grad_norm
    if not _finite(total):
        return chart
    import plotly.graph_objects as go

    if chart is None:
        fig = _figure("Gradient norm over steps", "step", "gradient norm", _log_axis(total))
        chart = Chart("grad-norm", "Gradient norm over steps", "The total gradient norm.", fig)
    chart.figure.add_trace(
        go.Scatter(
            x=_steps(total),
            y=total,
            mode="lines",
            name="total",
            line={"color": "#7f7f7f", "width": 1.5, "dash": "dot"},
        )
    )
    _mark_nonfinite(chart.figure, total, "gradient")
    return chart


def _update_ratio(c: Curves) -> Chart | None:
    chart = _per_layer(
        c,
        "update_ratio",
        "Update / weight ratio",
        "‖update‖ / ‖weight‖",
        "update-ratio",
        "How far each step moved each weight layer, relative to its size. The dashed line is "
        f"the rule of thumb, about {UPDATE_RATIO_GUIDE:g}: far above is unstable, far below "
        "barely learns.",
    )
    if chart is not None:
        chart.figure.add_hline(
            y=UPDATE_RATIO_GUIDE,
            line={"color": "#555", "dash": "dash", "width": 1},
        )
    return chart


def _learning_rate(c: Curves) -> Chart | None:
    values = _finite(c.lr)
    if not values or max(values) == min(values):
        return None  # a constant learning rate is a setting (the header), not a curve
    import plotly.graph_objects as go

    fig = _figure("Learning rate", "step", "learning rate", _log_axis(c.lr))
    fig.add_trace(go.Scatter(x=_steps(c.lr), y=c.lr, mode="lines", name="lr"))
    caption = "The learning rate each step used (the largest over the parameter groups)."
    return Chart("lr", "Learning rate", caption, fig)


def _scale(c: Curves, index: int) -> Chart | None:
    s = c.scalers[index]
    if not _finite(s.scale):
        return None
    import plotly.graph_objects as go

    title = f"{s.label} scale"
    fig = _figure(_label(title), "scaler step", "scale", _log_axis(s.scale))
    x = _steps(s.scale)
    fig.add_trace(go.Scatter(x=x, y=s.scale, mode=_mode(len(x)), name="scale"))
    caption = "The loss scale after each step."
    skipped = [k for k in s.skipped if 1 <= k <= len(s.scale)]
    if skipped:
        fig.add_trace(
            go.Scatter(
                x=skipped,
                y=[s.scale[k - 1] for k in skipped],
                mode="markers",
                name="skipped step",
                marker={"color": "#d62728", "symbol": "x", "size": 9},
            )
        )
        caption += f" Red crosses: the {len(skipped)} steps it skipped (gradients overflowed)."
    return Chart(f"scale-{index + 1}", title, caption, fig)


def _activations(c: Curves) -> Chart | None:
    sites = [a for a in c.activations if _finite(_aligned(c.measured_steps, a.share)[1])]
    if not sites:
        return None
    import plotly.graph_objects as go

    picked = _sampled(len(sites))
    fig = _figure("Dead and saturated units", "step", "share of outputs")
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    colors = _layer_colors(len(picked))
    for color, i in zip(colors, picked):
        a = sites[i]
        x, share = _aligned(c.measured_steps, a.share)
        what = "at zero" if a.measure == "zero" else "saturated"
        fig.add_trace(
            go.Scatter(
                x=x,
                y=share,
                mode=_mode(len(x)),
                name=_label(f"{a.name} ({a.kind}, {what})"),
                line={"color": color, "dash": "solid" if a.kind == "relu" else "dash"},
            )
        )
    caption = (
        "On the measured steps, each activation's share of outputs at zero (ReLU, solid) or "
        "saturated (sigmoid within 0.01 of 0 or 1, tanh beyond ±0.99; dashed): those pass "
        "almost no gradient." + _sampled_caption(len(picked), len(sites), "activations")
    )
    return Chart("activations", "Dead and saturated units", caption, fig)


def _verified_fix(c: Curves) -> Chart | None:
    fix = c.fix
    if fix is None or not (_finite(fix.before) or _finite(fix.after)):
        return None
    import plotly.graph_objects as go

    both = fix.before + fix.after
    fig = _figure("Verified fix: loss before and after", "step", "loss", _log_axis(both))
    fig.add_trace(
        go.Scatter(
            x=_steps(fix.before),
            y=fix.before,
            mode="lines",
            name="as it is",
            line={"color": COLORS["before"]},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=_steps(fix.after),
            y=fix.after,
            mode="lines",
            name=_label(f"with the fix: {fix.applied}"),
            line={"color": COLORS["after"]},
        )
    )
    fig.update_layout(legend={"orientation": "h", "y": -0.25})
    caption = "The same data and steps, trained as it is and with the fix applied in memory."
    return Chart("verified-fix", "Verified fix", caption, fig)
