"""The admin dashboard: one self-contained HTML page with its charts drawn as inline SVG.

Pure functions from data to strings, so every chart is tested without a server or a
browser. No JavaScript and no external assets: the page works under the same
``default-src 'none'`` policy as the unsubscribe page, and behind any proxy. Every
name that comes from the data (groups, reasons) goes through ``html.escape``, in
attributes too, so a group called ``<script>`` is text.

A browser cannot send the admin bearer token when a person opens ``/admin/``, so the
page has a login form; a correct token gets a session cookie holding an expiry and an
HMAC of it keyed by the token (nothing to store, and rotating the token ends every
session). The cookie is only good for viewing this page, not for the JSON API.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from relay.suppression.report import GMAIL_GOAL, GMAIL_LIMIT, DayRow, verdict
from relay.suppression.transfer import CachedStats

SESSION_COOKIE = "ocr_admin"
SESSION_SECONDS = 12 * 3600

PAGE_HEADERS = {  # every HTML or text page the relay serves: nothing cached, framed or sniffed
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
}

# Okabe-Ito based: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#8C6D31", "#6B6ECF")
OTHER_COLOUR = "#9AA0A6"
SCOPE_COLOURS = {"global": "#0072B2", "group": "#009E73", "sender": "#E69F00"}
GOAL_COLOUR = "#E69F00"
LIMIT_COLOUR = "#C5221F"
TOP_GROUPS = 8

_FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, DejaVu Sans, sans-serif"'


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _clip(text: str, length: int) -> str:
    """A label that fits its column; the full text is in the element's title."""
    return text if len(text) <= length else text[: length - 1] + "…"


def _n(value: float) -> str:
    """An SVG coordinate: one decimal is finer than a pixel."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


# --- login session ----------------------------------------------------------------------


def _session_mac(token: bytes, expires: int) -> str:
    message = f"oneclick-relay admin session|{expires}".encode()
    return hmac.new(token, message, hashlib.sha256).hexdigest()


def session_value(token: bytes, now: float, lifetime: int = SESSION_SECONDS) -> str:
    """``<expires>.<hmac>``: proves the token was typed, without containing it."""
    expires = int(now) + lifetime
    return f"{expires}.{_session_mac(token, expires)}"


def session_valid(token: bytes, value: str, now: float) -> bool:
    expires, _, mac = value.partition(".")
    if not (expires.isascii() and expires.isdigit()) or len(expires) > 12:
        return False
    if int(expires) <= now:
        return False
    return hmac.compare_digest(mac.encode(), _session_mac(token, int(expires)).encode())


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


def day_range(today: date, days: int) -> list[str]:
    """ISO dates, oldest first, ending today (the same days ``daily_report`` reads)."""
    return [(today - timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1)]


def _day_label(day: str) -> str:
    when = date.fromisoformat(day)
    return f"{when:%b} {when.day}"


# --- data shaping -----------------------------------------------------------------------


def unsubscribes_by_group(
    rows: Iterable[DayRow], days: Sequence[str], top: int = TOP_GROUPS
) -> list[tuple[str, list[int]]]:
    """Per group, unsubscribes per day; the biggest ``top - 1`` groups, the rest as one."""
    index = {day: i for i, day in enumerate(days)}
    per_group: dict[str, list[int]] = {}
    for row in rows:
        count = row.counts.get("unsubscribe", 0)
        if count and row.day in index:
            per_group.setdefault(row.group, [0] * len(days))[index[row.day]] += count
    ranked = sorted(per_group.items(), key=lambda item: (-sum(item[1]), item[0]))
    if len(ranked) <= top:
        return ranked
    rest = [sum(values) for values in zip(*(v for _, v in ranked[top - 1 :]), strict=True)]
    return [*ranked[: top - 1], (f"{len(ranked) - top + 1} other groups", rest)]


def daily_totals(rows: Iterable[DayRow], days: Sequence[str]) -> list[dict[str, int]]:
    """Every group's counts summed, per day."""
    index = {day: i for i, day in enumerate(days)}
    totals: list[dict[str, int]] = [{} for _ in days]
    for row in rows:
        if row.day in index:
            target = totals[index[row.day]]
            for metric, n in row.counts.items():
                target[metric] = target.get(metric, 0) + n
    return totals


def rate_series(totals: Sequence[Mapping[str, int]], metric: str) -> list[float | None]:
    """``metric / sent`` per day; None on a day nothing was sent (a gap, not a zero)."""
    return [t.get(metric, 0) / t["sent"] if t.get("sent") else None for t in totals]


def group_totals(rows: Iterable[DayRow]) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = {}
    for row in rows:
        target = result.setdefault(row.group, {})
        for metric, n in row.counts.items():
            target[metric] = target.get(metric, 0) + n
    return dict(sorted(result.items(), key=lambda item: (-item[1].get("sent", 0), item[0])))


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
        f'fill="#5F6368">{_e(_day_label(day))}</text>'
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
) -> str:
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
    return "".join(parts)


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
) -> str:
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
    return "".join(parts)


def reason_bars(counts: Mapping[str, Mapping[str, int]], label: str, width: int = 540) -> str:
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
    return "".join(parts)


LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


def latency_histogram(durations: Sequence[float], label: str, width: int = 540) -> str:
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
    return "".join(parts)


def legend(items: Iterable[tuple[str, str]]) -> str:
    entries = "".join(
        f'<li><span class="sw" style="background:{colour}"></span>{_e(name)}</li>'
        for name, colour in items
    )
    return f'<ul class="legend">{entries}</ul>'


# --- the page ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Latency:
    """Click-to-suppression times of the recent unsubscribes this process handled."""

    samples: int
    p50: float | None
    p99: float | None
    durations: Sequence[float] = ()


@dataclass(frozen=True, slots=True)
class SuppressionCounts:
    by_reason: Mapping[str, Mapping[str, int]]
    """reason → scope kind (global, group, sender) → live entries."""
    addresses: int | None
    """As of the last reconcile; None before the first."""
    patterns: int
    computed: datetime
    scan_seconds: float


def suppression_counts(cached: CachedStats) -> SuppressionCounts:
    by_reason: dict[str, dict[str, int]] = {}
    for (kind, reason), n in cached.stats.by_scope_reason.items():
        by_reason.setdefault(reason, {})[kind] = n
    return SuppressionCounts(
        by_reason=by_reason,
        addresses=cached.stats.addresses,
        patterns=cached.stats.patterns,
        computed=datetime.fromtimestamp(cached.computed, UTC),
        scan_seconds=cached.seconds,
    )


@dataclass(frozen=True, slots=True)
class DashboardData:
    days: Sequence[str]
    rows: Sequence[DayRow]
    latency: Latency
    generated: datetime
    suppressions: SuppressionCounts | None = None
    """None until the first scan finished."""
    suppressions_note: str = ""
    """Why the counts are missing or old (a scan still running, Redis unavailable)."""
    cache_minutes: float = 5


_STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
background:#F4F5F7;color:#202124;line-height:1.4}
header{background:#1F2937;color:#fff;padding:.75rem 1.5rem;display:flex;align-items:center;
gap:1.25rem;flex-wrap:wrap}
header h1{font-size:1.15rem;margin:0;font-weight:600}
header .period{display:flex;gap:.3rem}
header .period a{color:#D1D5DB;text-decoration:none;padding:.15rem .55rem;border-radius:.3rem;
font-size:.85rem;border:1px solid #4B5563}
header .period a.on{background:#fff;color:#1F2937;border-color:#fff}
header .when{color:#9CA3AF;font-size:.85rem;margin-left:auto}
header form{margin:0}
header button{background:none;border:1px solid #4B5563;color:#D1D5DB;border-radius:.3rem;
padding:.15rem .6rem;font-size:.85rem;cursor:pointer}
main{max-width:1200px;margin:0 auto;padding:1rem 1.5rem 2rem}
.tiles{display:grid;grid-template-columns:repeat(5,1fr);gap:.75rem}
.tile{background:#fff;border:1px solid #E3E5E8;border-radius:.5rem;padding:.6rem .9rem}
.tile span{display:block;color:#5F6368;font-size:.8rem}
.tile b{display:block;font-size:1.45rem;font-weight:600;margin:.1rem 0}
.tile small{color:#5F6368;font-size:.78rem}
.card{background:#fff;border:1px solid #E3E5E8;border-radius:.5rem;padding:.9rem 1.1rem;
margin-top:.9rem;min-width:0}
.row{display:grid;grid-template-columns:1fr 1fr;gap:.9rem}
.row .card{margin-top:.9rem}
h2{font-size:1rem;margin:0}
.note{color:#5F6368;font-size:.82rem;margin:.15rem 0 .5rem}
svg.chart{display:block;width:100%;height:auto}
.legend{display:flex;flex-wrap:wrap;gap:.3rem 1.1rem;font-size:.82rem;margin:.4rem 0 0;
padding:0;list-style:none;color:#3C4043}
.sw{display:inline-block;width:.75rem;height:.75rem;border-radius:2px;margin-right:.35rem;
vertical-align:-.05rem}
table{border-collapse:collapse;width:100%;font-size:.86rem;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .55rem;border-bottom:1px solid #EEF0F2;text-align:right;white-space:nowrap}
th{color:#5F6368;font-weight:600;font-size:.8rem}
th:first-child,td:first-child{text-align:left}
.ok{color:#137333}.warn{color:#B06000}.bad{color:#C5221F;font-weight:600}
.pct{display:flex;gap:1.5rem;margin:.3rem 0 .2rem}
.pct div{font-size:.8rem;color:#5F6368}
.pct b{display:block;font-size:1.6rem;color:#202124;font-weight:600}
@media (max-width:860px){.tiles{grid-template-columns:repeat(2,1fr)}.row{display:block}}
"""


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="robots" content="noindex"><title>{_e(title)}</title>'
        f"<style>{_STYLE}</style></head><body>{body}</body></html>\n"
    )


def _verdict_class(rate: float) -> str:
    return {"ok": "ok", "above the 0.1% goal": "warn"}.get(verdict(rate), "bad")


def _group_name(group: str) -> str:
    return "(transactional)" if group == "-" else group


def _tile(title: str, value: str, note: str = "", css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return (
        f'<div class="tile"><span>{_e(title)}</span><b{cls}>{value}</b><small>{note}</small></div>'
    )


def _group_table(rows: Sequence[DayRow]) -> str:
    totals = group_totals(rows)
    if not totals:
        return '<p class="note">No mail counted in this period.</p>'
    head = (
        "<tr><th>group</th><th>sent</th><th>unsubscribes</th><th>hard bounces</th>"
        "<th>soft bounces</th><th>policy bounces</th><th>complaints</th>"
        "<th>complaint rate</th></tr>"
    )
    body = []
    for group, c in totals.items():
        sent = c.get("sent", 0)
        rate = c.get("complaint", 0) / sent if sent else 0.0
        rate_cell = (
            f'<td class="{_verdict_class(rate)}">{fmt_pct(rate)}</td>'
            if sent
            else "<td>&ndash;</td>"
        )
        cells = "".join(
            f"<td>{c.get(m, 0):,}</td>"
            for m in ("sent", "unsubscribe", "hard-bounce", "soft-bounce", "policy-bounce")
        )
        body.append(
            f"<tr><td>{_e(_group_name(group))}</td>{cells}<td>{c.get('complaint', 0):,}</td>"
            f"{rate_cell}</tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _suppressions(data: DashboardData) -> str:
    s = data.suppressions
    note = _e(data.suppressions_note)
    if s is None:
        return f'<p class="note">{note or "Not computed yet."} Reload in a minute.</p>'
    when = s.computed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    addresses = (
        f"{s.addresses:,} addresses at the last reconcile"
        if s.addresses is not None
        else "addresses: counted by 'suppress stats --reconcile'"
    )
    age = (
        f"Live entries as of {when}, kept as entries change (read in"
        f" {fmt_seconds(s.scan_seconds)}, at most every {data.cache_minutes * 60:g} s). "
        f"{addresses}, {s.patterns:,} patterns."
    )
    kinds = sorted({k for ks in s.by_reason.values() for k in ks}, key=lambda k: (k != "global", k))
    return (
        f'<p class="note">{_e(age)} {note}</p>'
        + reason_bars(s.by_reason, "Suppression entries by reason")
        + legend((k, SCOPE_COLOURS.get(k, OTHER_COLOUR)) for k in kinds)
    )


def render_dashboard(data: DashboardData) -> str:
    days = list(data.days)
    totals = daily_totals(data.rows, days)
    period = {m: sum(t.get(m, 0) for t in totals) for m in ("sent", "complaint", "unsubscribe")}
    bounces = sum(t.get("hard-bounce", 0) for t in totals)
    rate = period["complaint"] / period["sent"] if period["sent"] else 0.0
    unsubs = unsubscribes_by_group(data.rows, days)
    unsub_colours = colours([name for name, _ in unsubs])
    span = f"{_day_label(days[0])} to {_day_label(days[-1])}" if days else ""
    n = len(days)
    on = ' class="on"'
    links = "".join(f'<a href="?days={d}"{on if d == n else ""}>{d} days</a>' for d in (7, 30, 90))
    header = (
        "<header><h1>oneclick-relay</h1>"
        f'<nav class="period">{links}</nav>'
        f'<span class="when">{_e(span)} · UTC · generated '
        f"{_e(data.generated.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S'))}</span>"
        '<form method="post" action="logout"><button type="submit">Sign out</button></form>'
        "</header>"
    )
    lat = data.latency
    tiles = (
        '<div class="tiles">'
        + _tile("Sent", fmt_count(period["sent"]), f"in {n} days")
        + _tile("Unsubscribes", fmt_count(period["unsubscribe"]), f"in {n} days")
        + _tile(
            "Complaint rate",
            fmt_pct(rate) if period["sent"] else "&ndash;",
            _e(verdict(rate) if period["sent"] else "nothing sent"),
            _verdict_class(rate) if period["sent"] else "",
        )
        + _tile(
            "Hard bounces",
            fmt_count(bounces),
            fmt_pct(bounces / period["sent"]) + " of sent" if period["sent"] else "",
        )
        + _tile(
            "Click → suppression",
            _e(fmt_seconds(lat.p50)),
            f"p50; p99 {_e(fmt_seconds(lat.p99))}",
        )
        + "</div>"
    )
    unsub_card = (
        '<section class="card"><h2>Unsubscribes per day, by group</h2>'
        '<p class="note">One-click and confirmation-page unsubscribes counted by the relay.</p>'
        + stacked_bars(days, unsubs, "Unsubscribes per day by group")
        + legend((name, unsub_colours[name]) for name, _ in unsubs)
        + "</section>"
    )
    complaint_card = (
        '<section class="card"><h2>Complaint rate</h2>'
        '<p class="note">Complaints ÷ sent, all groups. Gmail: stay under 0.1%, never reach '
        "0.3%.</p>"
        + line_chart(
            days,
            [("complaint rate", rate_series(totals, "complaint"), "#0072B2")],
            "Complaint rate per day",
            GMAIL_THRESHOLDS,
        )
        + legend(
            [
                ("complaint rate", "#0072B2"),
                ("0.1% goal", GOAL_COLOUR),
                ("0.3% limit", LIMIT_COLOUR),
            ]
        )
        + "</section>"
    )
    bounce_series = [
        ("hard bounces", rate_series(totals, "hard-bounce"), "#D55E00"),
        ("soft bounces", rate_series(totals, "soft-bounce"), "#56B4E9"),
        ("policy bounces", rate_series(totals, "policy-bounce"), "#CC79A7"),
    ]
    bounce_card = (
        '<section class="card"><h2>Bounce rate</h2>'
        '<p class="note">Bounces ÷ sent, all groups (dashed: the complaint thresholds).</p>'
        + line_chart(days, bounce_series, "Bounce rate per day", GMAIL_THRESHOLDS)
        + legend((name, colour) for name, _, colour in bounce_series)
        + "</section>"
    )
    latency_card = (
        '<section class="card"><h2>Time from click to suppression</h2>'
        '<p class="note">From an unsubscribe request reaching the relay to the suppression '
        f"being written, over the last {lat.samples:,} unsubscribes this process handled "
        "(all of them: <code>oneclick_unsubscribe_seconds</code> in /metrics).</p>"
        f'<div class="pct"><div>p50<b>{_e(fmt_seconds(lat.p50))}</b></div>'
        f"<div>p99<b>{_e(fmt_seconds(lat.p99))}</b></div>"
        f"<div>samples<b>{lat.samples:,}</b></div></div>"
        + latency_histogram(lat.durations, "Click to suppression, recent requests by duration")
        + '<p class="note">Requests per duration bucket; upper bounds in milliseconds.</p>'
        + "</section>"
    )
    body = (
        header
        + "<main>"
        + tiles
        + unsub_card
        + f'<div class="row">{complaint_card}{bounce_card}</div>'
        + '<div class="row"><section class="card"><h2>Suppression list by reason</h2>'
        + _suppressions(data)
        + "</section>"
        + latency_card
        + "</div>"
        + '<section class="card"><h2>Per group</h2>'
        + f'<p class="note">Totals over the {n} days.</p>'
        + _group_table(data.rows)
        + "</section></main>"
    )
    return _page("oneclick-relay dashboard", body)


def render_login(error: str = "") -> str:
    message = f'<p class="bad">{_e(error)}</p>' if error else ""
    body = (
        '<main style="max-width:24rem;margin:5rem auto">'
        '<section class="card"><h2>oneclick-relay admin</h2>'
        '<p class="note">Paste the admin token (the contents of '
        "<code>http.admin_token_file</code>).</p>"
        f"{message}"
        '<form method="post" action="login">'
        '<input type="password" name="token" autocomplete="current-password" required '
        'autofocus aria-label="admin token" '
        'style="width:100%;padding:.5rem;font-size:1rem;border:1px solid #C4C7CC;'
        'border-radius:.3rem;margin-bottom:.6rem">'
        '<button type="submit" style="padding:.5rem 1.2rem;font-size:1rem;border:0;'
        'border-radius:.3rem;background:#1A5FB4;color:#fff;cursor:pointer">Sign in</button>'
        "</form></section></main>"
    )
    return _page("oneclick-relay admin: sign in", body)
