"""Every HTML page the relay serves, rendered from Jinja2 templates with autoescape on.

The templates are package data (``relay/http/templates/``). Autoescaping is on for
every template and undefined names are errors, so a value from the data — a group
name, a reason, a list name, a note — is text wherever it lands, and no call site
escapes by hand. The only markup passed in is the SVG from ``relay.http.charts``,
which escapes its own texts and says so by returning ``Markup``.

``public.html`` (the unsubscribe pages a recipient sees) and ``admin.html`` (the
dashboard and its sign-in) share nothing but the headers below.
"""

from __future__ import annotations

import functools
from datetime import UTC
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from relay.http.charts import (
    GMAIL_THRESHOLDS,
    GOAL_COLOUR,
    LIMIT_COLOUR,
    OTHER_COLOUR,
    SCOPE_COLOURS,
    colours,
    day_label,
    fmt_count,
    fmt_pct,
    fmt_seconds,
    latency_histogram,
    legend,
    line_chart,
    reason_bars,
    stacked_bars,
)
from relay.http.dashboard import (
    DashboardData,
    daily_totals,
    group_totals,
    rate_series,
    unsubscribes_by_group,
)
from relay.suppression.report import verdict

PAGE_HEADERS = {  # every HTML or text page the relay serves: nothing cached, framed or sniffed
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
}
PERIODS = (7, 30, 90)
GROUP_COLUMNS = ("sent", "unsubscribe", "hard-bounce", "soft-bounce", "policy-bounce", "complaint")


@functools.cache
def environment() -> Environment:
    """The one template environment of the process (templates are read once)."""
    return Environment(
        loader=PackageLoader("relay.http", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def _verdict_class(rate: float) -> str:
    return {"ok": "ok", "above the 0.1% goal": "warn"}.get(verdict(rate), "bad")


def _group_name(group: str) -> str:
    return "(transactional)" if group == "-" else group


def _tile(title: str, value: str, note: str = "", css: str = "") -> dict[str, str]:
    return {"title": title, "value": value, "note": note, "css": css}


def render_dashboard(data: DashboardData) -> str:
    days = list(data.days)
    totals = daily_totals(data.rows, days)
    period = {m: sum(t.get(m, 0) for t in totals) for m in ("sent", "complaint", "unsubscribe")}
    sent = period["sent"]
    bounces = sum(t.get("hard-bounce", 0) for t in totals)
    rate = period["complaint"] / sent if sent else 0.0
    unsubs = unsubscribes_by_group(data.rows, days)
    unsub_colours = colours([name for name, _ in unsubs])
    n = len(days)
    lat = data.latency
    tiles = [
        _tile("Sent", fmt_count(sent), f"in {n} days"),
        _tile("Unsubscribes", fmt_count(period["unsubscribe"]), f"in {n} days"),
        _tile(
            "Complaint rate",
            fmt_pct(rate) if sent else "\N{EN DASH}",
            verdict(rate) if sent else "nothing sent",
            _verdict_class(rate) if sent else "",
        ),
        _tile(
            "Hard bounces",
            fmt_count(bounces),
            fmt_pct(bounces / sent) + " of sent" if sent else "",
        ),
        _tile("Click → suppression", fmt_seconds(lat.p50), f"p50; p99 {fmt_seconds(lat.p99)}"),
    ]
    bounce_series = [
        ("hard bounces", rate_series(totals, "hard-bounce"), "#D55E00"),
        ("soft bounces", rate_series(totals, "soft-bounce"), "#56B4E9"),
        ("policy bounces", rate_series(totals, "policy-bounce"), "#CC79A7"),
    ]
    charts = {
        "unsubscribes": stacked_bars(days, unsubs, "Unsubscribes per day by group"),
        "unsubscribes_legend": legend((name, unsub_colours[name]) for name, _ in unsubs),
        "complaints": line_chart(
            days,
            [("complaint rate", rate_series(totals, "complaint"), "#0072B2")],
            "Complaint rate per day",
            GMAIL_THRESHOLDS,
        ),
        "complaints_legend": legend(
            [
                ("complaint rate", "#0072B2"),
                ("0.1% goal", GOAL_COLOUR),
                ("0.3% limit", LIMIT_COLOUR),
            ]
        ),
        "bounces": line_chart(days, bounce_series, "Bounce rate per day", GMAIL_THRESHOLDS),
        "bounces_legend": legend((name, colour) for name, _, colour in bounce_series),
        "latency": latency_histogram(
            lat.durations, "Click to suppression, recent requests by duration"
        ),
    }
    s = data.suppressions
    suppressions = None
    if s is not None:
        kinds = sorted(
            {k for ks in s.by_reason.values() for k in ks}, key=lambda k: (k != "global", k)
        )
        charts["reasons"] = reason_bars(s.by_reason, "Suppression entries by reason")
        charts["reasons_legend"] = legend((k, SCOPE_COLOURS.get(k, OTHER_COLOUR)) for k in kinds)
        suppressions = {
            "computed": s.computed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "scan": fmt_seconds(s.scan_seconds),
            "cache_seconds": f"{data.cache_minutes * 60:g}",
            "addresses": (
                f"{s.addresses:,} addresses at the last reconcile"
                if s.addresses is not None
                else "addresses: counted by 'suppress stats --reconcile'"
            ),
            "patterns": f"{s.patterns:,}",
        }
    groups = []
    for group, c in group_totals(data.rows).items():
        group_sent = c.get("sent", 0)
        group_rate = c.get("complaint", 0) / group_sent if group_sent else 0.0
        groups.append(
            {
                "name": _group_name(group),
                "counts": [f"{c.get(m, 0):,}" for m in GROUP_COLUMNS],
                "rate": fmt_pct(group_rate) if group_sent else None,
                "rate_class": _verdict_class(group_rate),
            }
        )
    return render(
        "dashboard.html",
        title="oneclick-relay dashboard",
        periods=PERIODS,
        days=n,
        span=f"{day_label(days[0])} to {day_label(days[-1])}" if days else "",
        generated=data.generated.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        tiles=tiles,
        charts=charts,
        suppressions=suppressions,
        suppressions_note=data.suppressions_note,
        latency={
            "samples": f"{lat.samples:,}",
            "p50": fmt_seconds(lat.p50),
            "p99": fmt_seconds(lat.p99),
        },
        groups=groups,
    )


def render_login(error: str = "") -> str:
    return render("login.html", title="oneclick-relay admin: sign in", error=error)


def render_unsubscribe_confirm(name: str, address: str, field: str, value: str) -> str:
    """The page behind a GET of the link: a button that POSTs, nothing changed yet."""
    return render(
        "unsubscribe_confirm.html",
        title="Unsubscribe",
        name=name,
        address=address,
        field=field,
        value=value,
    )


def render_unsubscribed(name: str, address: str) -> str:
    return render("unsubscribe_done.html", title="Unsubscribed", name=name, address=address)


def render_refused(text: str) -> str:
    return render("unsubscribe_refused.html", title="Link not valid", text=text)
