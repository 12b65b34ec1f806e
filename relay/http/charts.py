"""Charts as inline SVG: pure functions from numbers to markup, tested without a browser.

No JavaScript and no external assets, so the dashboard works under a ``default-src
'none'`` policy and behind any proxy. Every text that comes from the data (groups,
reasons, days) is escaped here, in attributes too, and each chart is returned as
``Markup`` so a template inserts it as it is, without escaping it twice.
"""

from __future__ import annotations

import bisect
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from markupsafe import Markup

from relay.suppression.report import GMAIL_GOAL, GMAIL_LIMIT

# Okabe-Ito based: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#8C6D31", "#6B6ECF")
OTHER_COLOUR = "#9AA0A6"
SCOPE_COLOURS = {"global": "#0072B2", "group": "#009E73", "sender": "#E69F00"}
GOAL_COLOUR = "#E69F00"
LIMIT_COLOUR = "#C5221F"

_FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, DejaVu Sans, sans-serif"'


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _markup(text: str) -> Markup:
    """Markup built in this module, where every text from the data went through ``_e``."""
    return Markup(text)  # noqa: S704 (the one place: data texts are escaped by _e above)


def _clip(text: str, length: int) -> str:
    """A label that fits its column; the full text is in the element's title."""
    return text if len(text) <= length else text[: length - 1] + "…"


def _n(value: float) -> str:
    """An SVG coordinate: one decimal is finer than a pixel."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


# --- numbers and scales -----------------------------------------------------------------


def nice_step(span: float, ticks: int = 4, integer: bool = False) -> float:
    """A round grid step (1, 2, 2.5 or 5 times a power of ten), about ``ticks`` per ``span``."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * 0.999)
    return max(step, 1.0) if integer else step


def axis_top(maximum: float, ticks: int = 4, integer: bool = False) -> tuple[float, float]:
    """(top, step): the axis ends on a grid line at or above ``maximum``."""
    step = nice_step(maximum, ticks, integer)
    return max(step, step * math.ceil(maximum / step - 1e-9)), step


def fmt_count(value: float) -> str:
    if abs(value) >= 1_000_000:
        return f"{value / 1_000_000:.1f}".rstrip("0").rstrip(".") + "M"
    if abs(value) >= 10_000:
        return f"{value / 1000:.1f}".rstrip("0").rstrip(".") + "k"
    return f"{value:,.0f}"


def fmt_pct(rate: float) -> str:
    """0.001 → ``0.1%``, 0.00025 → ``0.025%``."""
    text = f"{rate * 100:.3f}".rstrip("0").rstrip(".")
    return f"{text}%"


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 0.001:
        return f"{seconds * 1000:.2f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def day_label(day: str) -> str:
    when = date.fromisoformat(day)
    return f"{when:%b} {when.day}"


# --- charts -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """The plot area inside an SVG of ``width`` by ``height``."""

    width: int
    height: int
    left: int = 56
    right: int = 16
    top: int = 14
    bottom: int = 30

    @property
    def plot_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> float:
        return self.height - self.top - self.bottom

    @property
    def baseline(self) -> float:
        return self.top + self.plot_height

    def band(self, n: int) -> float:
        return self.plot_width / max(n, 1)

    def centre(self, i: int, n: int) -> float:
        return self.left + (i + 0.5) * self.band(n)

    def y(self, value: float, top: float) -> float:
        return self.baseline - (value / top) * self.plot_height if top else self.baseline


def _svg_open(frame: Frame, css_class: str, label: str) -> str:
    return (
        f'<svg class="chart {css_class}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {frame.width} {frame.height}" role="img" aria-label="{_e(label)}" '
        f'{_FONT} font-size="12">'
        f"<title>{_e(label)}</title>"
    )


def _grid(frame: Frame, top: float, step: float, fmt: str) -> list[str]:
    """Horizontal grid lines with their values at the left, from 0 to ``top``."""
    parts = []
    for i in range(round(top / step) + 1):
        value = i * step
        y = _n(frame.y(value, top))
        text = fmt_pct(value) if fmt == "pct" else fmt_count(value)
        parts.append(
            f'<line class="grid" x1="{frame.left}" x2="{_n(frame.left + frame.plot_width)}" '
            f'y1="{y}" y2="{y}" stroke="{"#9AA0A6" if value == 0 else "#E8EAED"}"/>'
            f'<text x="{frame.left - 8}" y="{y}" dy="4" text-anchor="end" '
            f'fill="#5F6368">{text}</text>'
        )
    return parts


def _x_labels(frame: Frame, days: Sequence[str]) -> list[str]:
    """A date under every ``step``-th bar, today always, never closer than 60 units."""
    n = len(days)
    step = max(1, math.ceil(n / max(2, frame.plot_width // 60)))
    return [
        f'<text x="{_n(frame.centre(i, n))}" y="{_n(frame.baseline + 18)}" text-anchor="middle" '
        f'fill="#5F6368">{_e(day_label(day))}</text>'
        for i, day in enumerate(days)
        if (n - 1 - i) % step == 0
    ]


def _empty(frame: Frame, text: str) -> str:
    return (
        f'<text class="empty" x="{_n(frame.left + frame.plot_width / 2)}" '
        f'y="{_n(frame.top + frame.plot_height / 2)}" text-anchor="middle" fill="#80868B" '
        f'font-size="14">{_e(text)}</text>'
    )


def colours(names: Sequence[str]) -> dict[str, str]:
    """A colour per series, in order; a combined "other groups" series is grey."""
    return {
        name: OTHER_COLOUR if name.endswith(" other groups") else PALETTE[i % len(PALETTE)]
        for i, name in enumerate(names)
    }


def stacked_bars(
    days: Sequence[str],
    series: Sequence[tuple[str, Sequence[int]]],
    label: str,
    frame: Frame | None = None,
) -> Markup:
    """A bar per day, one stacked segment per series (each with a hover title)."""
    frame = frame or Frame(1100, 220)
    n = len(days)
    per_day = [sum(values[i] for _, values in series) for i in range(n)]
    top, step = axis_top(max(per_day, default=0) or 1, integer=True)
    palette = colours([name for name, _ in series])
    parts = [_svg_open(frame, "bars", label), *_grid(frame, top, step, "count")]
    width = max(1.0, frame.band(n) * 0.72)
    for i, day in enumerate(days):
        x = frame.centre(i, n) - width / 2
        base = 0
        for name, values in series:
            value = values[i]
            if not value:
                continue
            y_top, y_base = frame.y(base + value, top), frame.y(base, top)
            parts.append(
                f'<rect class="bar" x="{_n(x)}" y="{_n(y_top)}" width="{_n(width)}" '
                f'height="{_n(y_base - y_top)}" fill="{palette[name]}" data-series="{_e(name)}">'
                f"<title>{_e(day)} · {_e(name)}: {value:,}</title></rect>"
            )
            base += value
    if not any(per_day):
        parts.append(_empty(frame, "Nothing in this period"))
    parts.extend(_x_labels(frame, days))
    parts.append("</svg>")
    return _markup("".join(parts))


@dataclass(frozen=True, slots=True)
class Threshold:
    value: float
    label: str
    colour: str


GMAIL_THRESHOLDS = (
    Threshold(GMAIL_GOAL, f"{fmt_pct(GMAIL_GOAL)} goal", GOAL_COLOUR),
    Threshold(GMAIL_LIMIT, f"{fmt_pct(GMAIL_LIMIT)} limit", LIMIT_COLOUR),
)


def line_chart(
    days: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None], str]],
    label: str,
    thresholds: Sequence[Threshold] = (),
    frame: Frame | None = None,
) -> Markup:
    """Rates per day as lines (a gap where a day has no value), with reference lines."""
    frame = frame or Frame(540, 230, right=84 if thresholds else 16)
    n = len(days)
    values = [v for _, vs, _ in series for v in vs if v is not None]
    highest = max([*values, *(t.value for t in thresholds)], default=0.0)
    top, step = axis_top(highest * 1.1 or 0.01)
    parts = [_svg_open(frame, "lines", label), *_grid(frame, top, step, "pct")]
    right = _n(frame.left + frame.plot_width)
    for t in thresholds:
        y = _n(frame.y(t.value, top))
        parts.append(
            f'<line class="threshold" data-value="{t.value}" x1="{frame.left}" x2="{right}" '
            f'y1="{y}" y2="{y}" stroke="{t.colour}" stroke-width="1.5" stroke-dasharray="6 4"/>'
            f'<text class="threshold-label" x="{_n(frame.left + frame.plot_width + 6)}" '
            f'y="{y}" dy="4" fill="{t.colour}" font-weight="600">{_e(t.label)}</text>'
        )
    for name, points, colour in series:
        segment: list[str] = []
        segments = [segment]
        dots = []
        for i, value in enumerate(points):
            if value is None:
                segment = []
                segments.append(segment)
                continue
            x, y = _n(frame.centre(i, n)), _n(frame.y(value, top))
            segment.append(f"{x},{y}")
            dots.append(
                f'<circle cx="{x}" cy="{y}" r="3" fill="{colour}">'
                f"<title>{_e(days[i])} · {_e(name)}: {fmt_pct(value)}</title></circle>"
            )
        parts.extend(
            f'<polyline class="line" data-series="{_e(name)}" points="{" ".join(s)}" '
            f'fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round"/>'
            for s in segments
            if len(s) > 1
        )
        parts.extend(dots)
    if not values:
        parts.append(_empty(frame, "No mail sent in this period"))
    parts.extend(_x_labels(frame, days))
    parts.append("</svg>")
    return _markup("".join(parts))


def reason_bars(counts: Mapping[str, Mapping[str, int]], label: str, width: int = 540) -> Markup:
    """One horizontal bar per reason, split by scope kind (global, group, sender)."""
    rows = sorted(counts.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    row_height, label_width, total_width = 30, 110, 70
    height = max(len(rows), 1) * row_height + 12
    frame = Frame(width, height, left=label_width, right=total_width, top=6, bottom=6)
    top = max((sum(kinds.values()) for _, kinds in rows), default=0)
    parts = [_svg_open(frame, "hbars", label)]
    for i, (reason, kinds) in enumerate(rows):
        y = frame.top + i * row_height + 4
        mid = _n(y + (row_height - 8) / 2)
        parts.append(
            f'<text x="{label_width - 8}" y="{mid}" dy="4" text-anchor="end" '
            f'fill="#3C4043">{_e(_clip(reason, 15))}</text>'
        )
        x = float(frame.left)
        for kind in sorted(kinds, key=lambda k: (k not in SCOPE_COLOURS, k)):
            n = kinds[kind]
            if not n:
                continue
            w = frame.plot_width * n / top if top else 0
            parts.append(
                f'<rect class="bar" x="{_n(x)}" y="{_n(y)}" width="{_n(max(w, 1))}" '
                f'height="{row_height - 8}" fill="{SCOPE_COLOURS.get(kind, OTHER_COLOUR)}" '
                f'data-series="{_e(kind)}"><title>{_e(reason)} · {_e(kind)}: {n:,}</title></rect>'
            )
            x += w
        parts.append(
            f'<text x="{_n(x + 6)}" y="{mid}" dy="4" fill="#3C4043" font-weight="600">'
            f"{sum(kinds.values()):,}</text>"
        )
    if not rows:
        parts.append(_empty(frame, "No live suppressions"))
    parts.append("</svg>")
    return _markup("".join(parts))


LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


def latency_histogram(durations: Sequence[float], label: str, width: int = 540) -> Markup:
    """How many of ``durations`` fall in each bucket (upper bounds in ms under the bars)."""
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for seconds in durations:
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
    names = [f"{b * 1000:g}" for b in LATENCY_BUCKETS]
    names.append(f">{names[-1]}")
    frame = Frame(width, 130, left=44)
    top, step = axis_top(max(counts) or 1, ticks=3, integer=True)
    parts = [_svg_open(frame, "histogram", label), *_grid(frame, top, step, "count")]
    n = len(counts)
    bar = frame.band(n) * 0.8
    for i, (name, count) in enumerate(zip(names, counts, strict=True)):
        x = frame.centre(i, n)
        if count:
            y = frame.y(count, top)
            bound = name if name.startswith(">") else f"≤ {name}"
            parts.append(
                f'<rect class="bar" x="{_n(x - bar / 2)}" y="{_n(y)}" width="{_n(bar)}" '
                f'height="{_n(frame.baseline - y)}" fill="#0072B2">'
                f"<title>{_e(bound)} ms: {count:,}</title></rect>"
            )
        parts.append(
            f'<text x="{_n(x)}" y="{_n(frame.baseline + 18)}" text-anchor="middle" '
            f'fill="#5F6368">{_e(name)}</text>'
        )
    if not durations:
        parts.append(_empty(frame, "No unsubscribes since the relay started"))
    parts.append("</svg>")
    return _markup("".join(parts))


def legend(items: Iterable[tuple[str, str]]) -> Markup:
    entries = "".join(
        f'<li><span class="sw" style="background:{colour}"></span>{_e(name)}</li>'
        for name, colour in items
    )
    return _markup(f'<ul class="legend">{entries}</ul>')
