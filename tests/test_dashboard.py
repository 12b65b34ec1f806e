"""The dashboard's pure rendering: charts as SVG, thresholds, escaping, the session cookie."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import UTC, date, datetime

import pytest

from relay.http.charts import (
    GMAIL_THRESHOLDS,
    axis_top,
    fmt_pct,
    latency_histogram,
    line_chart,
    reason_bars,
    stacked_bars,
)
from relay.http.dashboard import (
    DashboardData,
    Latency,
    day_range,
    suppression_counts,
    unsubscribes_by_group,
)
from relay.http.pages import render_dashboard, render_login
from relay.http.session import session_valid, session_value
from relay.metrics import RecentDurations
from relay.suppression.report import DayRow
from relay.suppression.transfer import CachedStats, Stats

SVG = "{http://www.w3.org/2000/svg}"
DAYS = day_range(date(2026, 3, 14), 7)
EVIL = "<script>alert(1)</script>"


def parse(svg: str) -> ET.Element:
    """An SVG as XML: well formed, escaping included (our own output, so no XML attacks)."""
    return ET.fromstring(svg)  # noqa: S314


def svgs(page: str) -> list[ET.Element]:
    """Every inline SVG of a page."""
    return [parse(m) for m in re.findall(r"<svg.*?</svg>", page, re.DOTALL)]


def elements(svg: ET.Element, tag: str, css_class: str | None = None) -> list[ET.Element]:
    found = svg.iter(SVG + tag)
    return [e for e in found if css_class is None or e.get("class") == css_class]


def titles(svg: ET.Element) -> list[str]:
    return [b.findtext(SVG + "title") or "" for b in elements(svg, "rect", "bar")]


def rows() -> list[DayRow]:
    """Seven days of two groups: 10 000 sent a day, complaints rising to 0.4 %."""
    result = []
    for i, day in enumerate(DAYS):
        result.append(
            DayRow(
                day,
                "newsletter",
                {"sent": 10_000, "complaint": 5 * i + 2, "hard-bounce": 30, "unsubscribe": i},
            )
        )
        result.append(DayRow(day, EVIL, {"sent": 1000, "unsubscribe": 2}))
    return result


def page(**overrides: object) -> str:
    data = DashboardData(
        days=DAYS,
        rows=rows(),
        latency=Latency(3, 0.0021, 0.0093, [0.0015, 0.0021, 0.0093]),
        generated=datetime(2026, 3, 14, 12, 0, tzinfo=UTC),
        **overrides,  # type: ignore[arg-type]
    )
    return render_dashboard(data)


def test_day_range_ends_today_oldest_first() -> None:
    assert day_range(date(2026, 3, 2), 3) == ["2026-02-28", "2026-03-01", "2026-03-02"]


@pytest.mark.parametrize(
    ("maximum", "integer", "expected"),
    [(37, True, (40, 10)), (3, True, (3, 1)), (0.0033, False, (0.004, 0.001)), (1, True, (1, 1))],
)
def test_axis_ends_on_a_round_grid_line(
    maximum: float, integer: bool, expected: tuple[float, float]
) -> None:
    assert axis_top(maximum, integer=integer) == pytest.approx(expected)


def test_percent_labels() -> None:
    assert [fmt_pct(v) for v in (0, 0.001, 0.003, 0.00025, 0.0125)] == [
        "0%",
        "0.1%",
        "0.3%",
        "0.025%",
        "1.25%",
    ]


def test_stacked_bars_one_segment_per_nonzero_value_heights_proportional() -> None:
    days = DAYS[:3]
    svg = parse(stacked_bars(days, [("a", [4, 0, 2]), ("b", [4, 1, 0])], "Unsubscribes per day"))
    bars = elements(svg, "rect", "bar")
    assert [(b.get("data-series"), b.findtext(SVG + "title")) for b in bars] == [
        ("a", f"{days[0]} · a: 4"),
        ("b", f"{days[0]} · b: 4"),
        ("b", f"{days[1]} · b: 1"),
        ("a", f"{days[2]} · a: 2"),
    ]
    heights = [float(b.get("height", "0")) for b in bars]
    assert heights[0] == pytest.approx(heights[1], abs=0.1)
    assert heights[0] == pytest.approx(4 * heights[2], abs=0.2)
    first_a, first_b = bars[0], bars[1]  # b sits on top of a on the same day
    assert float(first_b.get("y", "0")) + heights[1] == pytest.approx(
        float(first_a.get("y", "0")), abs=0.1
    )
    assert svg.get("role") == "img"


def test_empty_bar_chart_says_so() -> None:
    svg = parse(stacked_bars(DAYS, [], "nothing"))
    assert elements(svg, "rect", "bar") == []
    assert [t.text for t in elements(svg, "text", "empty")] == ["Nothing in this period"]


def test_thresholds_drawn_at_0_1_and_0_3_percent() -> None:
    svg = parse(
        line_chart(DAYS, [("complaint rate", [0.0005] * 7, "#000")], "rate", GMAIL_THRESHOLDS)
    )
    lines = {float(e.get("data-value", "0")): e for e in elements(svg, "line", "threshold")}
    assert sorted(lines) == [0.001, 0.003]
    labels = [t.text for t in elements(svg, "text", "threshold-label")]
    assert labels == ["0.1% goal", "0.3% limit"]
    baseline = max(float(e.get("y1", "0")) for e in elements(svg, "line", "grid"))
    y_goal, y_limit = (float(lines[v].get("y1", "0")) for v in (0.001, 0.003))
    assert lines[0.001].get("y1") == lines[0.001].get("y2")  # horizontal
    assert baseline - y_limit == pytest.approx(3 * (baseline - y_goal), abs=0.2)
    point = elements(svg, "circle")[0]  # 0.05 % is half way between the axis and the goal
    assert baseline - float(point.get("cy", "0")) == pytest.approx((baseline - y_goal) / 2, abs=0.2)


def test_line_has_a_gap_on_days_nothing_was_sent() -> None:
    values: list[float | None] = [0.001, 0.002, None, 0.001, 0.002, 0.003, None]
    svg = parse(line_chart(DAYS, [("r", values, "#000")], "rate"))
    polylines = elements(svg, "polyline", "line")
    assert [len(p.get("points", "").split()) for p in polylines] == [2, 3]
    assert len(elements(svg, "circle")) == 5


def test_thresholds_still_drawn_without_data() -> None:
    svg = parse(line_chart(DAYS, [("r", [None] * 7, "#000")], "rate", GMAIL_THRESHOLDS))
    assert len(elements(svg, "line", "threshold")) == 2
    assert [t.text for t in elements(svg, "text", "empty")] == ["No mail sent in this period"]


def test_reason_bars_sorted_by_total_split_by_scope_kind() -> None:
    svg = parse(
        reason_bars(
            {
                "unsubscribe": {"group": 120, "global": 5},
                "complaint": {"global": 9},
                "hard-bounce": {"global": 40},
            },
            "by reason",
        )
    )
    titles = [b.findtext(SVG + "title") for b in elements(svg, "rect", "bar")]
    assert titles == [
        "unsubscribe · global: 5",
        "unsubscribe · group: 120",
        "hard-bounce · global: 40",
        "complaint · global: 9",
    ]
    widths = [float(b.get("width", "0")) for b in elements(svg, "rect", "bar")]
    assert widths[0] + widths[1] == pytest.approx(125 / 40 * widths[2], abs=0.3)


def test_groups_beyond_the_top_are_one_grey_series() -> None:
    many = [DayRow(DAYS[0], f"g{i}", {"unsubscribe": 10 + i}) for i in range(10)]
    series = unsubscribes_by_group(many, DAYS, top=4)
    assert [name for name, _ in series] == ["g9", "g8", "g7", "7 other groups"]
    assert series[-1][1][0] == sum(10 + i for i in range(7))


def test_page_escapes_group_names_everywhere() -> None:
    text = page()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    series = {e.get("data-series") for svg in svgs(text) for e in elements(svg, "rect", "bar")}
    assert EVIL in series  # the attribute is escaped, and reads back as the name
    assert "(transactional)" not in text  # no group "-" in this data


def test_page_has_every_chart_and_the_numbers() -> None:
    text = page()
    charts = svgs(text)
    assert [c.get("class") for c in charts] == [
        "chart bars",
        "chart lines",
        "chart lines",
        "chart histogram",
    ]
    assert len(elements(charts[1], "line", "threshold")) == 2
    assert "2.1 ms" in text and "9.3 ms" in text  # click → suppression p50 / p99
    assert "Not computed yet." in text  # no suppression counts passed
    assert 'class="on">7 days' in text
    # 7 days of newsletter: 70 000 sent, complaints 2+7+…+32 = 119 → 0.17 %, above the goal
    assert "above the 0.1% goal" in text


def test_page_shows_suppression_counts_and_when_they_were_computed() -> None:
    stats = Stats(by_scope_reason=Counter({("global", "complaint"): 3, ("group", EVIL): 1}))
    stats.addresses, stats.patterns = 4, 2
    cached = CachedStats(stats, datetime(2026, 3, 14, 11, 58, tzinfo=UTC).timestamp(), 0.25)
    text = page(suppressions=suppression_counts(cached), suppressions_note="A scan is running.")
    assert "as of 2026-03-14 11:58:00 UTC" in text
    assert "4 addresses at the last reconcile, 2 patterns" in text
    assert "A scan is running." in text
    assert "<script" not in text.lower()
    (hbars,) = (c for c in svgs(text) if c.get("class") == "chart hbars")
    assert [b.findtext(SVG + "title") for b in elements(hbars, "rect", "bar")] == [
        "complaint · global: 3",
        f"{EVIL} · group: 1",
    ]


def test_latency_histogram_counts_per_bucket_upper_bound_inclusive() -> None:
    svg = parse(latency_histogram([0.0004, 0.001, 0.0011, 0.0012, 3.0], "latency"))
    assert titles(svg) == ["≤ 0.5 ms: 1", "≤ 1 ms: 1", "≤ 2 ms: 2", ">1000 ms: 1"]
    empty = parse(latency_histogram([], "latency"))
    assert titles(empty) == []
    assert [t.text for t in elements(empty, "text", "empty")] == [
        "No unsubscribes since the relay started"
    ]


def test_login_page_escapes_the_message_and_posts_the_token() -> None:
    text = render_login(EVIL)
    assert "<script" not in text.lower()
    assert '<form method="post" action="login">' in text
    assert 'type="password" name="token"' in text


def test_session_cookie_is_an_hmac_that_expires() -> None:
    token, now = b"0123456789abcdef-token", 1_800_000_000.0
    value = session_value(token, now, lifetime=3600)
    assert token.decode() not in value
    assert session_valid(token, value, now + 3599)
    assert not session_valid(token, value, now + 3600)
    assert not session_valid(b"another-token-0123456789", value, now)
    expires, _, mac = value.partition(".")
    assert not session_valid(token, f"{int(expires) + 999}.{mac}", now)  # longer life: no
    for garbage in ("", ".", "abc.def", "١٢٣.x", "9" * 40 + "." + mac):
        assert not session_valid(token, garbage, now)


def test_recent_durations_percentiles() -> None:
    ring = RecentDurations(size=100)
    assert ring.percentile(50) is None
    for ms in range(1, 201):  # only the last 100 are kept: 101..200 ms
        ring.add(ms / 1000)
    assert len(ring) == 100
    assert ring.percentile(50) == pytest.approx(0.150)
    assert ring.percentile(99) == pytest.approx(0.199)
    assert ring.percentile(100) == pytest.approx(0.200)


@pytest.mark.parametrize("computed", [False, True])
def test_suppression_note_is_escaped(computed: bool) -> None:
    """The suppressions note carries a Redis error text: it is text, computed or not."""
    stats = Stats(by_scope_reason=Counter({("global", EVIL): 2}), addresses=1)
    suppressions = (
        suppression_counts(CachedStats(stats, 1_773_000_000.0, 0.2)) if computed else None
    )
    text = page(suppressions=suppressions, suppressions_note=f"scan failed: {EVIL}")
    assert "<script" not in text.lower()
    assert "scan failed: &lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_templates_autoescape_every_page() -> None:
    from relay.http.pages import environment, render_refused, render_unsubscribe_confirm

    env = environment()
    assert env.autoescape is True  # for every template, whatever its name ends with
    assert set(env.list_templates()) >= {"dashboard.html", "login.html", "public.html"}
    page_text = render_unsubscribe_confirm(EVIL, f"j***@{EVIL}", "List-Unsubscribe", "One-Click")
    assert "<script" not in page_text.lower()
    assert page_text.count("&lt;script&gt;") == 2
    assert "<script" not in render_refused(EVIL).lower()
