"""Plots as inline SVG strings (no plotting library, no script, nothing fetched at view time).

Every plot is an ``<svg class="plot">`` whose ``data-points`` attribute counts the values it
draws, so that a viewer (or a test in a browser) can tell an empty plot from a drawn one.
"""

from __future__ import annotations

from html import escape
from typing import Sequence

WIDTH, HEIGHT = 460, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 28, 40
COLOR = "#3b6ea5"
PALETTE = ("#3b6ea5", "#d1813b", "#4d9a5b", "#b84a4a", "#7a5aa6", "#8c6d3f", "#c25e9e", "#6b7b8c")


def _frame(title: str, points: int, body: str, xlabel: str = "", ylabel: str = "", height: int = HEIGHT) -> str:
    plot_h = height - TOP - BOTTOM
    parts = [f'<svg class="plot" data-points="{points}" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" xmlns="http://www.w3.org/2000/svg" role="img">',
             f"<title>{escape(title)}</title>",
             f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" class="t">{escape(title)}</text>',
             f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" class="axis"/>',
             f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" class="axis"/>']
    if xlabel:
        parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{height - 4}" text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text x="12" y="{TOP + plot_h / 2}" text-anchor="middle" '
                     f'transform="rotate(-90 12 {TOP + plot_h / 2})">{escape(ylabel)}</text>')
    if not points:
        parts.append(f'<text x="{WIDTH / 2}" y="{TOP + plot_h / 2}" text-anchor="middle" class="empty">no data</text>')
    parts.append(body)
    parts.append("</svg>")
    return "".join(parts)


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.2g}"


def bars(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str = "",
         value_format: str = "{:g}") -> str:
    """A bar per label, its value written above it."""
    n = len(labels)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = max(values, default=0) or 1
    body = []
    for i, (label, value) in enumerate(zip(labels, values)):
        w = plot_w / max(n, 1)
        h = plot_h * 0.9 * value / top  # room for the value above the tallest bar
        x, y = LEFT + i * w, TOP + plot_h - h
        body.append(f'<rect x="{x + w * 0.1:.1f}" y="{y:.1f}" width="{w * 0.8:.1f}" height="{h:.1f}" '
                    f'fill="{PALETTE[i % len(PALETTE)]}"><title>{escape(label)}: {value_format.format(value)}</title></rect>')
        body.append(f'<text x="{x + w / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle">{value_format.format(value)}</text>')
        body.append(f'<text x="{x + w / 2:.1f}" y="{TOP + plot_h + 14}" text-anchor="middle">{escape(label[:14])}</text>')
    return _frame(title, sum(1 for v in values if v), "".join(body), ylabel=ylabel)


def histogram(counts: Sequence[int], lo: float, hi: float, title: str, xlabel: str = "") -> str:
    """Counts of equal-width bins over ``[lo, hi]``."""
    n = len(counts)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = max(counts, default=0) or 1
    w = plot_w / max(n, 1)
    body = []
    for i, c in enumerate(counts):
        h = plot_h * c / top
        a, b = lo + (hi - lo) * i / n, lo + (hi - lo) * (i + 1) / n
        body.append(f'<rect x="{LEFT + i * w + 0.5:.1f}" y="{TOP + plot_h - h:.1f}" width="{max(w - 1, 0.5):.1f}" '
                    f'height="{h:.1f}" fill="{COLOR}"><title>[{_fmt(a)}, {_fmt(b)}): {c}</title></rect>')
    for frac in (0, 0.5, 1):
        x = LEFT + plot_w * frac
        body.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 14}" text-anchor="middle">{_fmt(lo + (hi - lo) * frac)}</text>')
    body.append(f'<text x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end">{top}</text>')
    return _frame(title, sum(counts), "".join(body), xlabel=xlabel, ylabel="rows")


def line(points: Sequence[tuple[float, float]], title: str, xlabel: str = "", ylabel: str = "") -> str:
    """A polyline through ``(x, y)`` points (x ascending), with dots."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    if not points:
        return _frame(title, 0, "", xlabel, ylabel)
    x_hi = max(x for x, _ in points) or 1
    y_hi = max(y for _, y in points) or 1
    xy = [(LEFT + plot_w * x / x_hi, TOP + plot_h - plot_h * y / y_hi) for x, y in points]
    body = [f'<polyline fill="none" stroke="{COLOR}" stroke-width="2" points="'
            + " ".join(f"{x:.1f},{y:.1f}" for x, y in xy) + '"/>']
    body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{COLOR}"><title>{_fmt(px)}, {_fmt(py)}</title></circle>'
             for (x, y), (px, py) in zip(xy, points)]
    body.append(f'<text x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end">{_fmt(y_hi)}</text>')
    body.append(f'<text x="{WIDTH - RIGHT}" y="{TOP + plot_h + 14}" text-anchor="end">{_fmt(x_hi)}</text>')
    return _frame(title, len(points), "".join(body), xlabel, ylabel)


def gantt(spans: Sequence[tuple[str, float, float, float | None]], title: str, xlabel: str = "seconds") -> str:
    """One row per ``(name, start, end, busy)``: a light bar from start to end, a dark one as long
    as the busy time (``None``: no busy time known)."""
    height = TOP + BOTTOM + 22 * max(len(spans), 1)
    plot_w = WIDTH - 110 - RIGHT
    x_hi = max((end for _, _, end, _ in spans), default=0) or 1
    body = []
    for i, (name, start, end, busy) in enumerate(spans):
        y = TOP + 22 * i
        x0, x1 = 110 + plot_w * start / x_hi, 110 + plot_w * end / x_hi
        tip = f"{name}: {start:.1f}-{end:.1f} s" + (f", busy {busy:.1f} s" if busy is not None else "")
        body.append(f'<text x="104" y="{y + 13}" text-anchor="end">{escape(name)}</text>')
        body.append(f'<rect x="{x0:.1f}" y="{y + 2}" width="{max(x1 - x0, 1):.1f}" height="14" fill="#c9d8ea">'
                    f"<title>{escape(tip)}</title></rect>")
        if busy is not None:
            bw = min(plot_w * busy / x_hi, x1 - x0)
            body.append(f'<rect x="{x0:.1f}" y="{y + 6}" width="{max(bw, 1):.1f}" height="6" fill="{COLOR}"/>')
    body.append(f'<text x="{WIDTH - RIGHT}" y="{height - BOTTOM + 14}" text-anchor="end">{_fmt(x_hi)}</text>')
    return _frame(title, len(spans), "".join(body), xlabel, height=height)
