"""Reasons, expiry, soft bounces, patterns, import/export against the real Redis."""

from __future__ import annotations

from datetime import date

import pytest
from helpers import Clock
from redis.asyncio import Redis

from relay.config import SuppressionConfig
from relay.model import Route
from relay.suppression.store import (
    DAY,
    GLOBAL,
    ImportRow,
    ProtectedEntry,
    SuppressionPolicy,
    SuppressionStore,
    group_scope,
)
from relay.suppression.transfer import (
    ExportFilter,
    export_csv,
    import_lines,
    scan_stats,
    stats,
)

MARKETING = Route("marketing", "newsletter", "news@example.com")
TRANSACTIONAL = Route("transactional", None, "receipts@example.com")


@pytest.fixture
def clock() -> Clock:
    return Clock(1_800_000_000.0)


@pytest.fixture
def store(redis: Redis, clock: Clock) -> SuppressionStore:
    policy = SuppressionPolicy.from_config(SuppressionConfig(patterns=("disposable.test",)))
    return SuppressionStore(redis, "ocr", clock=clock, policy=policy)


async def test_hard_bounce_expires_after_180_days_exactly(
    store: SuppressionStore, clock: Clock
) -> None:
    await store.add("a@example.com", GLOBAL, "hard-bounce", "test")
    [entry] = await store.entries("a@example.com")
    assert entry.expires - entry.created == 180 * DAY
    clock.now = entry.expires - 1
    assert "a@example.com" in await store.blocked(["a@example.com"], TRANSACTIONAL)
    clock.now = entry.expires
    assert await store.blocked(["a@example.com"], TRANSACTIONAL) == {}
    assert await store.blocked(["a@example.com"], MARKETING) == {}


async def test_soft_bounces_graduate_7_14_30_180(store: SuppressionStore, clock: Clock) -> None:
    durations = []
    for _ in range(5):
        count = await store.record_soft_bounce("s@example.com", "bounce")
        [entry] = [e for e in await store.entries("s@example.com") if e.reason == "soft-bounce"]
        durations.append((count, (entry.expires - entry.created) / DAY))
        clock.now += 1
    assert durations == [(1, 7), (2, 14), (3, 30), (4, 180), (5, 180)]
    assert "s@example.com" in await store.blocked(["s@example.com"], MARKETING)
    assert await store.blocked(["s@example.com"], TRANSACTIONAL) == {}  # soft is not hard
    await store.remove("s@example.com", reason="soft-bounce", source="test")
    assert await store.record_soft_bounce("s@example.com", "bounce") == 1  # count restarts


async def test_complaint_is_protected(store: SuppressionStore) -> None:
    await store.add("c@example.com", GLOBAL, "complaint", "test")
    await store.add("c@example.com", group_scope("newsletter"), "unsubscribe", "test")
    with pytest.raises(ProtectedEntry):
        await store.remove("c@example.com", source="test")
    assert len(await store.entries("c@example.com")) == 2
    removed = await store.remove("c@example.com", reason="unsubscribe", source="test")
    assert [e.reason for e in removed] == ["unsubscribe"]
    removed = await store.remove("c@example.com", source="test", force=True)
    assert [e.reason for e in removed] == ["complaint"]


async def test_patterns_from_config_and_redis_in_one_lookup(store: SuppressionStore) -> None:
    await store.add_pattern("noreply@*", "test")
    blocked = await store.blocked(
        ["x@disposable.test", "noreply@shop.example", "real@example.com"], MARKETING
    )
    assert {r: e.source for r, e in blocked.items()} == {
        "x@disposable.test": "*@disposable.test",
        "noreply@shop.example": "noreply@*",
    }
    assert await store.blocked(["x@disposable.test"], TRANSACTIONAL) == {}
    assert await store.remove_pattern("noreply@*", "test")
    assert "noreply@shop.example" not in await store.blocked(["noreply@shop.example"], MARKETING)


async def test_import_reports_every_line(store: SuppressionStore) -> None:
    lines = ["# customers who asked by phone", "A@x.com", "", "a@x.com", "nope", "b@y.com "]
    dry = await import_lines(
        store, lines, scope=GLOBAL, reason="manual", source="import", dry_run=True
    )
    assert (dry.accepted, dry.duplicates, dry.invalid) == (
        2,
        1,
        [(5, "nope", "not an e-mail address")],
    )
    assert await store.entries("a@x.com") == []
    real = await import_lines(store, lines, scope=GLOBAL, reason="manual", source="import")
    assert (real.accepted, real.duplicates) == (2, 1)
    again = await import_lines(store, lines, scope=GLOBAL, reason="manual", source="import")
    assert (again.accepted, again.duplicates) == (0, 3)


async def test_csv_import_columns_override_defaults(store: SuppressionStore) -> None:
    lines = ["Address,Reason,Group", "a@x.com,hard-bounce,", "b@x.com,,promo", "c@x.com,pattern,"]
    report = await import_lines(store, lines, scope=GLOBAL, reason="manual", source="import")
    assert report.accepted == 2
    assert report.invalid == [(4, "c@x.com", "unknown or unsupported reason 'pattern'")]
    assert [(e.scope, e.reason) for e in await store.entries("a@x.com")] == [("*", "hard-bounce")]
    assert [(e.scope, e.reason) for e in await store.entries("b@x.com")] == [("g:promo", "manual")]


async def test_export_filters_by_date_and_round_trips(
    store: SuppressionStore, clock: Clock
) -> None:
    await store.add("old@x.com", group_scope("newsletter"), "unsubscribe", "post")
    clock.now += 40 * DAY
    await store.add("new@x.com", group_scope("newsletter"), "unsubscribe", "post")
    await store.add("other@x.com", group_scope("promo"), "unsubscribe", "post")
    newest = date.fromtimestamp(clock.now)
    text = "".join(
        [c async for c in export_csv(store, ExportFilter(group="newsletter", since=newest))]
    )
    lines = text.splitlines()
    assert lines[0] == "address,scope,reason,created,expires,source"
    assert [line.split(",")[0] for line in lines[1:]] == ["new@x.com"]
    await store.remove("new@x.com", source="test")
    report = await import_lines(store, lines, scope=GLOBAL, reason="unsubscribe", source="reimport")
    assert report.accepted == 1
    assert [e.scope for e in await store.entries("new@x.com")] == [GLOBAL]


async def test_scan_stats_counts_live_entries(store: SuppressionStore, clock: Clock) -> None:
    await store.add("a@x.com", group_scope("n"), "unsubscribe", "post")
    await store.add("b@x.com", GLOBAL, "hard-bounce", "bounce")
    await store.add("c@x.com", GLOBAL, "manual", "cli", ttl=10)
    clock.now += 11
    result = await scan_stats(store)
    assert result.addresses == 2
    assert result.expired == 1
    assert dict(result.by_scope_reason) == {
        ("group", "unsubscribe"): 1,
        ("global", "hard-bounce"): 1,
    }
    assert dict(result.unsubscribes_per_day) == {"2027-01-15": 1}


async def test_add_many_is_idempotent_and_emits_events(
    store: SuppressionStore, redis: Redis
) -> None:
    rows = [ImportRow(i, f"u{i}@x.com", GLOBAL, "manual") for i in range(1, 2501)]
    assert sum(await store.add_many(rows, source="import")) == 2500
    assert sum(await store.add_many(rows, source="import")) == 0
    assert await redis.xlen("ocr:events") == 2500


async def test_kept_counts_follow_every_write_and_match_a_scan(
    store: SuppressionStore, clock: Clock, redis: Redis
) -> None:
    """add, re-add over an expired entry, graduated soft bounces, import, remove, expiry:
    the counts kept as entries change equal a full scan's at every step."""

    async def same() -> None:
        kept, scanned = await stats(store), await scan_stats(store)
        assert dict(kept.by_scope_reason) == dict(scanned.by_scope_reason)

    await store.add("a@x.com", group_scope("n"), "unsubscribe", "post")
    await store.add("a@x.com", group_scope("n"), "unsubscribe", "post")  # live: not written
    await store.add("b@x.com", GLOBAL, "manual", "cli", ttl=86400)
    await store.add("c@x.com", GLOBAL, "hard-bounce", "bounce")
    await same()
    for _ in range(3):  # each rewrite moves the entry to a later expiry day
        await store.record_soft_bounce("d@x.com", "bounce")
    await same()
    rows = [ImportRow(i, f"i{i}@x.com", GLOBAL, "unsubscribe") for i in range(1, 301)]
    await store.add_many(rows, source="import")
    await same()
    unsubscribed = (await stats(store)).unsubscribes_per_day
    assert unsubscribed == (await scan_stats(store)).unsubscribes_per_day == {"2027-01-15": 301}
    await store.remove("c@x.com", source="cli")
    await store.remove("i7@x.com", source="cli")
    await same()
    clock.now += 3 * 86400  # b's entry expired two days ago
    await same()
    assert ("global", "manual") not in (await stats(store)).by_scope_reason
    await store.add("b@x.com", GLOBAL, "manual", "cli")  # over the expired one
    await same()
    assert (await stats(store)).by_scope_reason[("global", "manual")] == 1
    # unsubscribes per day count requests: a later removal does not take one back
    assert (await stats(store)).unsubscribes_per_day == {"2027-01-15": 301}


async def test_reconcile_corrects_drift(store: SuppressionStore, redis: Redis) -> None:
    await store.add("a@x.com", GLOBAL, "complaint", "arf")
    await store.add("b@x.com", GLOBAL, "complaint", "arf")
    await redis.hincrby("ocr:{stats}", "global|complaint|-", 5)  # a count cut from its write
    assert (await stats(store)).by_scope_reason[("global", "complaint")] == 7
    before = await stats(store)
    assert before.addresses is None and before.reconciled is None
    counts = await store.reconcile()
    assert counts.by_scope_reason[("global", "complaint")] == 2
    assert counts.addresses == 2 and counts.reconciled is not None
