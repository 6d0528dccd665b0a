"""Charts as SVG, drawn on the server: a line (or step) chart and an error-bar chart.

Why not a JavaScript charting library: the consoles run no script at all (their
Content-Security-Policy forbids it, so an injected script could not approve a task), the pages
work without JavaScript, and an SVG is part of the page: its text is text, each point carries
a ``<title>`` a screen reader and a mouse can find, and the chart has a title and a
description (``role="img"``). Every chart on a page has a table of the same numbers beside it.

Pure: numbers in, markup out. Colours are the Okabe-Ito palette (distinguishable with every
common colour-vision deficiency); each series also has its own marker shape and dash, so
colour is never the only cue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count

from markupsafe import Markup, escape

__all__ = ["Bar", "Series", "errorbar_chart", "line_chart", "nice_ticks", "tick_labels"]

COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
DASHES = ("", "6 3", "2 3", "8 3 2 3")
_ids = count(1)

W, H = 800, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 36, 16, 48
LEGEND_ROW = 18


@dataclass(frozen=True)
class Series:
    """A named line: ``points`` are (x, y), y None for a gap."""

    name: str
    points: Sequence[tuple[float, float | None]]
    labels: Sequence[str] = field(default_factory=tuple)  # one per point, for its tooltip


@dataclass(frozen=True)
class Bar:
    """One estimate with its interval, labelled (an error-bar chart's x category)."""

    label: str
    estimate: float | None
    low: float | None
    high: float | None
    note: str = ""


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.2g}"
    if a >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _marker(shape: int, x: float, y: float, colour: str, tip: str) -> str:
    t = f"<title>{escape(tip)}</title>"
    if shape % 3 == 0:
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}">{t}</circle>'
    if shape % 3 == 1:
        return f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{colour}">{t}</rect>'
    return f'<path d="M{x:.1f} {y - 5:.1f} L{x + 5:.1f} {y + 4:.1f} L{x - 5:.1f} {y + 4:.1f} Z" fill="{colour}">{t}</path>'


def _frame(title: str, desc: str, body: list[str], legend: list[str], *, height: int = H) -> Markup:
    n = next(_ids)
    head = (
        f'<svg class="chart" viewBox="0 0 {W} {height}" role="img" aria-labelledby="chart-t{n} chart-d{n}" '
        f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet" font-size="12">'
        f'<title id="chart-t{n}">{escape(title)}</title><desc id="chart-d{n}">{escape(desc)}</desc>'
        f'<rect x="0" y="0" width="{W}" height="{height}" fill="#ffffff"/>'
    )
    return Markup(head + "".join(body) + "".join(legend) + "</svg>")


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Tick values as text, with as many decimals as the ticks need (592.5 stays 592.5)."""
    if any(abs(t) >= 1e6 for t in ticks) or all(0 < abs(t) < 1e-3 for t in ticks if t):
        return [_fmt(t) for t in ticks]
    for d in range(7):
        if all(abs(round(t, d) - t) <= 1e-9 * max(1.0, abs(t)) for t in ticks):
            return [f"{t:,.{d}f}" for t in ticks]
    return [_fmt(t) for t in ticks]


def _y_axis(ticks: list[float], y: Callable[[float], float], label: str, *, bottom: float) -> list[str]:
    out = []
    for t, text in zip(ticks, tick_labels(ticks), strict=True):
        yy = y(t)
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#d0d0d0" stroke-width="1"/>')
        out.append(f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="#222">{escape(text)}</text>')
    out.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{bottom}" stroke="#444"/>')
    out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{bottom}" y2="{bottom}" stroke="#444"/>')
    mid = (TOP + bottom) / 2
    out.append(
        f'<text x="14" y="{mid:.1f}" text-anchor="middle" transform="rotate(-90 14 {mid:.1f})" fill="#222">{escape(label)}</text>'
    )
    return out


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_format: Callable[[float], str] = _fmt,
    step: bool = False,
    hlines: Sequence[tuple[float, str]] = (),
    y_min: float | None = None,
    y_max: float | None = None,
    x_range: tuple[float, float] | None = None,
    x_ticks: Sequence[float] | None = None,
    desc: str = "",
) -> Markup:
    """Lines (or steps) of ``series`` over a numeric x, with horizontal reference ``hlines``;
    the legend below the plot. ``x_range``/``x_ticks`` fix the x axis (else: the data's)."""
    xs = [x for s in series for x, y in s.points if y is not None]
    ys = [y for s in series for _, y in s.points if y is not None] + [v for v, _ in hlines]
    drawn = [s for s in series if any(y is not None for _, y in s.points)]
    # the legend below the plot, entries side by side, wrapped (about 7 px a character)
    places: list[tuple[float, float]] = []
    lx, row = float(LEFT), 0
    for name in [s.name for s in drawn] + [name for _, name in hlines]:
        width = 40 + 7.0 * len(name)
        if lx + width > W - RIGHT and lx > LEFT:
            lx, row = float(LEFT), row + 1
        places.append((lx, H + 4 + LEGEND_ROW * row))
        lx += width + 16
    height = H + LEGEND_ROW * (row + 1)
    bottom = H - BOTTOM
    if not xs:
        return _frame(title, "no data yet", [f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#222">no data yet</text>'], [])
    x0, x1 = x_range if x_range is not None else (min(xs), max(xs))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    lo = min(ys) if y_min is None else min(y_min, *ys)
    hi = max(ys) if y_max is None else max(y_max, *ys)
    ticks = nice_ticks(lo, hi)
    if y_max is not None and ticks[-1] > y_max >= hi:
        ticks = [t for t in ticks if t <= y_max]
    if y_min is not None and ticks[0] < y_min <= lo:
        ticks = [t for t in ticks if t >= y_min]
    lo, hi = min(ticks[0], lo), max(ticks[-1], hi)

    def X(v: float) -> float:
        return LEFT + (v - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def Y(v: float) -> float:
        return bottom - (v - lo) / ((hi - lo) or 1.0) * (bottom - TOP)

    body = _y_axis(ticks, Y, y_label, bottom=bottom)
    if x_ticks is not None:
        xt = list(x_ticks)
    else:
        xt = nice_ticks(x0, x1, 6) if x_format is _fmt else [x0 + i * (x1 - x0) / 4 for i in range(5)]
    for t in xt:
        if x0 - 1e-9 <= t <= x1 + 1e-9:
            body.append(f'<text x="{X(t):.1f}" y="{bottom + 16}" text-anchor="middle" fill="#222">{escape(x_format(t))}</text>')
    body.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 8}" text-anchor="middle" fill="#222">{escape(x_label)}</text>')
    legend: list[str] = []

    def slot(k: int) -> tuple[float, float]:
        return places[k]

    for v, name in hlines:
        body.append(
            f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#555" stroke-width="1.5" stroke-dasharray="4 3">'
            f"<title>{escape(name)}</title></line>"
        )
    k = 0
    for i, s in enumerate(series):
        colour, dash = COLOURS[i % len(COLOURS)], DASHES[i % len(DASHES)]
        pts = [(x, y) for x, y in s.points if y is not None]
        if not pts:
            continue
        path: list[str] = []
        for j, (x, y) in enumerate(pts):
            if j == 0:
                path.append(f"M{X(x):.1f} {Y(y):.1f}")
            elif step:
                path.append(f"H{X(x):.1f} V{Y(y):.1f}")
            else:
                path.append(f"L{X(x):.1f} {Y(y):.1f}")
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        body.append(f'<path d="{" ".join(path)}" fill="none" stroke="{colour}" stroke-width="2"{dash_attr}/>')
        labels = list(s.labels)
        for j, (x, maybe) in enumerate(s.points):
            if maybe is None:
                continue
            tip = f"{s.name}: {_fmt(maybe)}" + (f" ({labels[j]})" if j < len(labels) and labels[j] else f" at {x_format(x)}")
            body.append(_marker(i, X(x), Y(maybe), colour, tip))
        lx, ly = slot(k)
        k += 1
        legend.append(
            f'<line x1="{lx}" x2="{lx + 22}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash_attr}/>'
            + _marker(i, lx + 11, ly, colour, s.name)
            + f'<text x="{lx + 28}" y="{ly + 4}" fill="#222">{escape(s.name)}</text>'
        )
    for _v, name in hlines:
        lx, ly = slot(k)
        k += 1
        legend.append(
            f'<line x1="{lx}" x2="{lx + 22}" y1="{ly}" y2="{ly}" stroke="#555" stroke-width="1.5" stroke-dasharray="4 3"/>'
            f'<text x="{lx + 28}" y="{ly + 4}" fill="#222">{escape(name)}</text>'
        )
    return _frame(title, desc or f"{y_label} by {x_label}: " + ", ".join(s.name for s in drawn), body, legend, height=height)


def errorbar_chart(bars: Sequence[Bar], *, title: str, y_label: str, desc: str = "") -> Markup:
    """Each bar's estimate as a point with its interval as a whisker, by label."""
    shown = [b for b in bars if b.estimate is not None]
    longest = min(max((len(b.label) for b in bars), default=1), 28)
    height = H + int(4.5 * longest)
    bottom = height - BOTTOM - int(4.5 * longest)
    if not shown:
        return _frame(title, "no published figure", [f'<text x="{W / 2}" y="{height / 2}" text-anchor="middle" fill="#222">no published figure</text>'], [], height=height)
    values = [v for b in shown for v in (b.estimate, b.low, b.high) if v is not None and math.isfinite(v)]
    ticks = nice_ticks(min(values), max(values))
    lo, hi = ticks[0], ticks[-1]

    def Y(v: float) -> float:
        return bottom - (v - lo) / ((hi - lo) or 1.0) * (bottom - TOP)

    body = _y_axis(ticks, Y, y_label, bottom=bottom)
    n = len(bars)
    slot = (W - LEFT - RIGHT) / max(n, 1)
    colour = COLOURS[0]
    for i, b in enumerate(bars):
        cx = LEFT + slot * (i + 0.5)
        label = b.label if len(b.label) <= 28 else b.label[:27] + "…"
        body.append(
            f'<text x="{cx:.1f}" y="{bottom + 12}" text-anchor="end" transform="rotate(-40 {cx:.1f} {bottom + 12})" '
            f'fill="#222" font-size="11">{escape(label)}</text>'
        )
        if b.estimate is None:
            body.append(f'<text x="{cx:.1f}" y="{bottom - 6}" text-anchor="middle" fill="#555" font-size="11">–<title>{escape(b.label)}: {escape(b.note or "not published")}</title></text>')
            continue
        tip = f"{b.label}: {_fmt(b.estimate)}"
        if b.low is not None and b.high is not None:
            tip += f", 95% interval {_fmt(b.low)} to {_fmt(b.high)}"
            cap = min(6.0, slot / 3)
            y0, y1 = Y(b.low), Y(b.high)
            body.append(
                f'<g class="errorbar" stroke="{colour}" stroke-width="1.5"><title>{escape(tip)}</title>'
                f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y0:.1f}" y2="{y1:.1f}"/>'
                f'<line x1="{cx - cap:.1f}" x2="{cx + cap:.1f}" y1="{y0:.1f}" y2="{y0:.1f}"/>'
                f'<line x1="{cx - cap:.1f}" x2="{cx + cap:.1f}" y1="{y1:.1f}" y2="{y1:.1f}"/></g>'
            )
        if b.note:
            tip += f" ({b.note})"
        body.append(_marker(0 if not b.note else 1, cx, Y(b.estimate), colour if not b.note else COLOURS[1], tip))
    return _frame(title, desc or f"{y_label}: estimates with their 95% intervals", body, [], height=height)
