"""Daily counts per group — sent, bounces, complaints, unsubscribes — and the complaint rate.

Counts live in one Redis hash per UTC day, ``{prefix}:daily:<YYYY-MM-DD>``, field
``<metric>|<group>`` (transactional mail counts under group ``-``), kept 400 days.
The hot path never waits for Redis: ``DailyCounters.add`` only adds to memory and a
background task flushes the sums once a second in one pipeline (a relay that dies
loses at most that second of counts, never mail).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import cast

from relay.errors import StoreUnavailable
from relay.eventlog import EventLog
from relay.store.client import RedisClient, unavailable
from relay.store.keys import Keys

log = EventLog(__name__)

METRICS = (
    "sent",
    "hard-bounce",
    "soft-bounce",
    "unknown-bounce",
    "policy-bounce",
    "complaint",
    "unsubscribe",
    "no-body-link",
)
KEEP_SECONDS = 400 * 86400
GMAIL_GOAL = 0.001
GMAIL_LIMIT = 0.003


def day_of(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).date().isoformat()


class DailyCounters:
    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        clock: Callable[[], float] = time.time,
        interval: float = 1.0,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._clock = clock
        self._interval = interval
        self._pending: Counter[tuple[str, str, str]] = Counter()
        self._stopped = asyncio.Event()

    def key(self, day: str) -> str:
        return Keys(self._prefix).daily(day)

    async def report(self, days: int, today: date | None = None) -> list[DayRow]:
        """``daily_report`` over this store; raises ``StoreUnavailable``."""
        return await daily_report(self._redis, self._prefix, days, today)

    def add(self, metric: str, group: str | None, count: int = 1) -> None:
        if count:
            self._pending[(day_of(self._clock()), metric, group or "-")] += count

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, Counter()
        try:
            with unavailable("daily counters write"):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for (day, metric, group), n in pending.items():
                        pipe.hincrby(self.key(day), f"{metric}|{group}", n)
                    for day in {day for day, _, _ in pending}:
                        pipe.expire(self.key(day), KEEP_SECONDS)
                    await pipe.execute()
        except StoreUnavailable as exc:
            self._pending.update(pending)  # keep them for the next flush
            log.warning("daily counters not written", error=exc, kept="memory")

    async def run(self) -> None:
        while not self._stopped.is_set():
            waiter = asyncio.ensure_future(self._stopped.wait())
            try:
                await asyncio.wait({waiter}, timeout=self._interval)
            finally:
                waiter.cancel()
            await self.flush()

    def stop(self) -> None:
        self._stopped.set()


@dataclass(frozen=True, slots=True)
class DayRow:
    day: str
    group: str
    counts: dict[str, int]

    @property
    def complaint_rate(self) -> float:
        sent = self.counts.get("sent", 0)
        return self.counts.get("complaint", 0) / sent if sent else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "day": self.day,
            "group": self.group,
            **{m: self.counts.get(m, 0) for m in METRICS},
            "complaint_rate": round(self.complaint_rate, 6),
        }


async def daily_report(
    redis: RedisClient, prefix: str, days: int, today: date | None = None
) -> list[DayRow]:
    """One row per day and group over the last ``days`` days (oldest first)."""
    today = today or datetime.now(UTC).date()
    dates = [(today - timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1)]
    keys = Keys(prefix)
    with unavailable("daily counters"):
        async with redis.pipeline(transaction=False) as pipe:
            for day in dates:
                pipe.hgetall(keys.daily(day))
            results = cast(list[dict[bytes, bytes]], await pipe.execute())
    rows: list[DayRow] = []
    for day, fields in zip(dates, results, strict=True):
        by_group: dict[str, dict[str, int]] = {}
        for field, value in fields.items():
            metric, _, group = field.decode().partition("|")
            by_group.setdefault(group, {})[metric] = int(value)
        rows.extend(DayRow(day, group, counts) for group, counts in sorted(by_group.items()))
    return rows


def verdict(rate: float) -> str:
    """Where a complaint rate stands against Gmail's bulk-sender thresholds."""
    if rate >= GMAIL_LIMIT:
        return "over the 0.3% limit"
    if rate >= GMAIL_GOAL:
        return "above the 0.1% goal"
    return "ok"
