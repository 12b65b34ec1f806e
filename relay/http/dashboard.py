"""The dashboard's figures: daily counters and suppression statistics shaped for the page.

Pure functions and frozen values; ``relay.http.pages`` turns them into HTML.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from relay.suppression.report import DayRow
from relay.suppression.transfer import CachedStats

TOP_GROUPS = 8


def day_range(today: date, days: int) -> list[str]:
    """ISO dates, oldest first, ending today (the same days ``daily_report`` reads)."""
    return [(today - timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1)]


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
