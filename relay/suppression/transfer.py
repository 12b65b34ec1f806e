"""Import, export and statistics of the suppression list, for the CLI and the admin API.

Import takes a CSV file with a header row naming an ``address`` column (optional
``reason``, ``group``, ``sender`` columns override the defaults per row) or a
plain file of one address per line. Every line is accounted for: accepted,
duplicate (in the file or already stored) or invalid (with its line number and
why). Export streams CSV rows as the store is scanned; nothing is held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from relay.errors import StoreUnavailable
from relay.eventlog import EventLog
from relay.mail.address import normalize_address
from relay.suppression.store import (
    PROTECTED_REASONS,
    REASONS,
    ImportRow,
    ProtectedEntry,
    Suppression,
    SuppressionStore,
    describe_scope,
    parse_scope,
)

log = EventLog(__name__)

EXPORT_COLUMNS = ("address", "scope", "reason", "created", "expires", "source")
_ADDRESS = re.compile(r"^[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\"]+$")
_BATCH = 1000


@dataclass
class ImportReport:
    accepted: int = 0
    duplicates: int = 0
    invalid: list[tuple[int, str, str]] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "invalid": [{"line": n, "text": t, "error": e} for n, t, e in self.invalid],
            "dry_run": self.dry_run,
        }


def _parse_lines(
    lines: Iterable[str], scope: str, reason: str
) -> Iterator[ImportRow | tuple[int, str, str]]:
    """Rows to import, or ``(line, text, error)`` for lines that cannot be."""
    iterator = iter(enumerate(lines, start=1))
    first = next(iterator, None)
    if first is None:
        return
    number, line = first
    header = [cell.strip().lower() for cell in next(csv.reader([line]), [])]
    if "address" in header:
        rest = (text for _, text in iterator)
        for offset, values in enumerate(csv.reader(rest), start=2):
            if not any(v.strip() for v in values):
                continue
            record = dict(zip(header, values, strict=False))
            yield _row(offset, record, scope, reason)
        return
    yield from _plain(number, line, scope, reason)
    for number, line in iterator:
        yield from _plain(number, line, scope, reason)


def _plain(
    number: int, line: str, scope: str, reason: str
) -> Iterator[ImportRow | tuple[int, str, str]]:
    text = line.strip()
    if not text or text.startswith("#"):
        return
    yield _row(number, {"address": text}, scope, reason)


def _row(
    number: int, record: dict[str, str], scope: str, reason: str
) -> ImportRow | tuple[int, str, str]:
    raw = (record.get("address") or "").strip()
    if not _ADDRESS.match(raw):
        return (number, raw[:200], "not an e-mail address")
    row_reason = (record.get("reason") or "").strip() or reason
    if row_reason not in REASONS or row_reason in ("pattern", "soft-bounce"):
        return (number, raw, f"unknown or unsupported reason {row_reason!r}")
    group, sender = (record.get("group") or "").strip(), (record.get("sender") or "").strip()
    try:
        row_scope = parse_scope(group or None, sender or None) if group or sender else scope
    except ValueError as exc:
        return (number, raw, str(exc))
    return ImportRow(number, normalize_address(raw), row_scope, row_reason)


async def import_lines(
    store: SuppressionStore,
    lines: Iterable[str],
    *,
    scope: str,
    reason: str,
    source: str,
    dry_run: bool = False,
) -> ImportReport:
    report = ImportReport(dry_run=dry_run)
    seen: set[tuple[str, str, str]] = set()
    batch: list[ImportRow] = []

    async def flush() -> None:
        if not batch:
            return
        if dry_run:
            present = await store.exists(batch)
            report.duplicates += sum(present)
            report.accepted += len(batch) - sum(present)
        else:
            wrote = await store.add_many(batch, source=source)
            report.accepted += sum(wrote)
            report.duplicates += len(batch) - sum(wrote)
        batch.clear()

    for item in _parse_lines(lines, scope, reason):
        if isinstance(item, tuple):
            report.invalid.append(item)
            continue
        identity = (item.address, item.scope, item.reason)
        if identity in seen:
            report.duplicates += 1
            continue
        seen.add(identity)
        batch.append(item)
        if len(batch) >= _BATCH:
            await flush()
    await flush()
    return report


@dataclass(frozen=True, slots=True)
class RemoveLine:
    """What one line of a re-subscribe file did (or would do, in a dry run)."""

    line: int
    address: str
    outcome: str
    """removed, not-suppressed, protected, duplicate, invalid."""
    detail: str = ""


@dataclass
class RemoveReport:
    lines: list[RemoveLine] = field(default_factory=list)
    dry_run: bool = False

    def count(self, outcome: str) -> int:
        return sum(1 for line in self.lines if line.outcome == outcome)

    def as_dict(self) -> dict[str, object]:
        outcomes = ("removed", "not-suppressed", "protected", "duplicate", "invalid")
        return {
            "dry_run": self.dry_run,
            **{o.replace("-", "_"): self.count(o) for o in outcomes},
            "lines": [
                {"line": r.line, "address": r.address, "outcome": r.outcome, "detail": r.detail}
                for r in self.lines
            ],
        }


async def remove_lines(
    store: SuppressionStore,
    lines: Iterable[str],
    *,
    scope: str | None,
    source: str,
    dry_run: bool = False,
) -> RemoveReport:
    """Bulk re-subscribe: one address per line, or a CSV with an ``address`` column
    (an optional ``group`` or ``sender`` column overrides ``scope`` per row).

    ``scope`` None removes the address's entries in every scope. Complaints stay: an
    address with a complaint entry (in any scope: the person asked not to be mailed) is
    reported ``protected`` and nothing of it is removed; the single-address remove with
    ``--force`` is the audited way.
    """
    report = RemoveReport(dry_run=dry_run)
    seen: set[tuple[str, str]] = set()
    for item in _parse_lines(lines, scope or "", "manual"):
        if isinstance(item, tuple):
            number, text, error = item
            report.lines.append(RemoveLine(number, text, "invalid", error))
            continue
        row_scope = item.scope or None
        identity = (item.address, item.scope)
        if identity in seen:
            report.lines.append(RemoveLine(item.line, item.address, "duplicate"))
            continue
        seen.add(identity)
        report.lines.append(await _remove_one(store, item, row_scope, source, dry_run))
    return report


async def _remove_one(
    store: SuppressionStore, row: ImportRow, scope: str | None, source: str, dry_run: bool
) -> RemoveLine:
    every = await store.entries(row.address)
    entries = [e for e in every if scope is None or e.scope == scope]
    protected = [e for e in every if e.reason in PROTECTED_REASONS]
    if protected:
        what = f"{describe_scope(protected[0].scope)} {protected[0].reason}"
        return RemoveLine(row.line, row.address, "protected", f"{what}: never removed in bulk")
    if not dry_run and entries:
        try:
            entries = await store.remove(row.address, scope, None, source=source)
        except ProtectedEntry as exc:  # a complaint arrived meanwhile
            return RemoveLine(row.line, row.address, "protected", str(exc))
    if not entries:
        return RemoveLine(row.line, row.address, "not-suppressed")
    detail = ", ".join(f"{describe_scope(e.scope)} {e.reason}" for e in entries)
    return RemoveLine(row.line, row.address, "removed", detail)


@dataclass(frozen=True, slots=True)
class ExportFilter:
    group: str | None = None
    sender: str | None = None
    reason: str | None = None
    since: date | None = None
    until: date | None = None
    live_only: bool = True

    def accepts(self, entry: Suppression, now: float) -> bool:
        if self.live_only and not entry.live(now):
            return False
        if self.reason and entry.reason != self.reason:
            return False
        if self.group and entry.scope != f"g:{self.group}":
            return False
        if self.sender and entry.scope != f"s:{normalize_address(self.sender)}":
            return False
        created = datetime.fromtimestamp(entry.created, UTC).date()
        if self.since and created < self.since:
            return False
        return not (self.until and created > self.until)


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def export_row(entry: Suppression) -> list[str]:
    return [
        entry.address,
        describe_scope(entry.scope),
        entry.reason,
        _iso(entry.created),
        _iso(entry.expires) if entry.expires else "",
        entry.source,
    ]


async def export_csv(store: SuppressionStore, filters: ExportFilter) -> AsyncIterator[str]:
    """CSV text in chunks: the header, then rows as the store is scanned."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    now = store.now()
    count = 0
    async for entry in store.scan():
        if filters.accepts(entry, now):
            writer.writerow(export_row(entry))
            count += 1
            if count % 500 == 0:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
    yield buffer.getvalue()


@dataclass
class Stats:
    by_scope_reason: Counter[tuple[str, str]] = field(default_factory=Counter)
    unsubscribes_per_day: Counter[str] = field(default_factory=Counter)
    addresses: int | None = 0
    """Distinct addresses with a live entry; from the kept counts: as of the last reconcile."""
    expired: int | None = 0
    """Expired entries still stored (a full scan only)."""
    patterns: int = 0
    scanned: bool = True
    """True: counted by a full scan now; False: the counts kept as entries change."""
    reconciled: float | None = None

    @property
    def entries(self) -> int:
        return sum(self.by_scope_reason.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "addresses": self.addresses,
            "expired_entries": self.expired,
            "live_entries": self.entries,
            "patterns": self.patterns,
            "source": "scan" if self.scanned else "kept counts",
            "reconciled": self.reconciled,
            "entries": [
                {"scope": scope, "reason": reason, "count": n}
                for (scope, reason), n in sorted(self.by_scope_reason.items())
            ],
            "unsubscribes_per_day": dict(sorted(self.unsubscribes_per_day.items())),
        }


async def stats(store: SuppressionStore, days: int = 30) -> Stats:
    """Live entries per scope kind and reason, and unsubscribes per day: O(1) at any size.

    From the counts the store keeps as entries change (``SuppressionStore.counts``);
    ``scan_stats`` counts the same with a full scan.
    """
    counts = await store.counts()
    first_day = datetime.fromtimestamp(store.now() - days * 86400, UTC).date().isoformat()
    return Stats(
        by_scope_reason=counts.by_scope_reason,
        unsubscribes_per_day=Counter(
            {d: n for d, n in counts.unsubscribes_per_day.items() if d >= first_day}
        ),
        addresses=counts.addresses,
        expired=None,
        patterns=counts.patterns,
        scanned=False,
        reconciled=counts.reconciled,
    )


async def scan_stats(store: SuppressionStore, days: int = 30) -> Stats:
    """The same as ``stats`` and distinct addresses, by one full scan (minutes at 10 M)."""
    result = Stats()
    now = store.now()
    first_day = datetime.fromtimestamp(now - days * 86400, UTC).date().isoformat()
    addresses: set[str] = set()
    expired = 0
    async for entry in store.scan():
        if not entry.live(now):
            expired += 1
            continue
        addresses.add(entry.address)
        kind = describe_scope(entry.scope).split(":")[0]
        result.by_scope_reason[(kind, entry.reason)] += 1
        if entry.reason == "unsubscribe":
            day = datetime.fromtimestamp(entry.created, UTC).date().isoformat()
            if day >= first_day:
                result.unsubscribes_per_day[day] += 1
    result.addresses = len(addresses)
    result.expired = expired
    result.patterns = len(await store.patterns()) + len(store.policy.patterns)
    return result


@dataclass(frozen=True, slots=True)
class CachedStats:
    stats: Stats
    computed: float
    """Wall-clock time the scan finished (the page says how old the numbers are)."""
    seconds: float
    """How long the scan took."""


class StatsCache:
    """``stats()`` at most once per ``max_age`` seconds, computed in the background.

    ``stats()`` reads the kept counts (one HGETALL), so this only spares Redis a read
    per page view: a request refreshes a result older than ``max_age``, waits for it
    at most ``wait`` seconds, and otherwise gets the previous result (``None`` before
    the first one). One refresh runs at a time.
    """

    def __init__(
        self,
        store: SuppressionStore,
        max_age: float = 30.0,
        wait: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._max_age = max_age
        self._wait = wait
        self._clock = clock
        self._value: CachedStats | None = None
        self._task: asyncio.Task[None] | None = None
        self.error: str | None = None
        """Why the last scan failed, until one succeeds."""

    @property
    def max_age(self) -> float:
        return self._max_age

    @property
    def refreshing(self) -> bool:
        return self._task is not None

    async def get(self) -> CachedStats | None:
        value = self._value
        stale = value is None or self._clock() - value.computed >= self._max_age
        if stale and self._task is None:
            self._task = asyncio.create_task(self._refresh())
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=self._wait)
        return self._value

    async def _refresh(self) -> None:
        started = self._clock()
        try:
            result = await stats(self._store)
        except StoreUnavailable as exc:
            self.error = str(exc)
            log.warning("suppression stats not computed", error=exc)
        else:
            finished = self._clock()
            self._value = CachedStats(result, finished, finished - started)
            self.error = None
        finally:
            self._task = None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
