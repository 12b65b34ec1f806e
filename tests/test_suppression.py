"""relay.suppression.SuppressionStore against a real Redis (the ``redis_url`` fixture)."""

from __future__ import annotations

import asyncio

import pytest
from helpers import NOW, Clock
from redis.asyncio import Redis

from relay.model import Route
from relay.suppression.store import (
    GLOBAL,
    HARD_REASONS,
    REASONS,
    Suppression,
    SuppressionStore,
    describe_scope,
    group_scope,
    parse_scope,
    scopes_for_unsubscribe,
    sender_scope,
)

ALICE = "alice@example.net"

NEWSLETTER = Route("marketing", "newsletter", "news@example.com")
PROMOTIONS = Route("marketing", "promotions", "deals@promo.example.com")
RECEIPTS = Route("transactional", None, "receipts@example.com")


async def events(redis: Redis) -> list[dict[str, str]]:
    entries = await redis.xrange("ocr:events")
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


async def is_blocked(store: SuppressionStore, route: Route, address: str = ALICE) -> bool:
    return address in await store.blocked([address], route)


# ---------------------------------------------------------------------------
# Scopes


# (scope, reason) -> blocks (newsletter, promotions, receipts)
SCOPE_TABLE = [
    ((GLOBAL, "unsubscribe"), (True, True, False)),
    ((GLOBAL, "soft-bounce"), (True, True, False)),
    ((GLOBAL, "pattern"), (True, True, False)),
    ((GLOBAL, "hard-bounce"), (True, True, True)),
    ((GLOBAL, "complaint"), (True, True, True)),
    ((GLOBAL, "manual"), (True, True, True)),
    ((group_scope("newsletter"), "unsubscribe"), (True, False, False)),
    ((group_scope("newsletter"), "hard-bounce"), (True, False, False)),
    ((group_scope("promotions"), "unsubscribe"), (False, True, False)),
    ((group_scope("other"), "manual"), (False, False, False)),
    ((sender_scope("news@example.com"), "unsubscribe"), (True, False, False)),
    ((sender_scope("News@Example.COM"), "manual"), (True, False, False)),
    ((sender_scope("receipts@example.com"), "hard-bounce"), (False, False, False)),
    ((sender_scope("deals@promo.example.com"), "complaint"), (False, True, False)),
]


@pytest.mark.parametrize(
    ("scope", "reason", "expected"),
    [pytest.param(s, r, e, id=f"{describe_scope(s)}-{r}") for (s, r), e in SCOPE_TABLE],
)
async def test_scopes(
    store: SuppressionStore, scope: str, reason: str, expected: tuple[bool, bool, bool]
) -> None:
    assert await store.add(ALICE, scope, reason, "test")
    got = (
        await is_blocked(store, NEWSLETTER),
        await is_blocked(store, PROMOTIONS),
        await is_blocked(store, RECEIPTS),
    )
    assert got == expected
    assert not await is_blocked(store, NEWSLETTER, "bob@example.org")


def test_hard_reasons() -> None:
    assert frozenset({"hard-bounce", "complaint", "manual"}) == HARD_REASONS
    assert "unsubscribe" in REASONS


async def test_transactional_not_blocked_by_any_unsubscribe(store: SuppressionStore) -> None:
    for scope in (GLOBAL, group_scope("newsletter"), sender_scope("receipts@example.com")):
        await store.add(ALICE, scope, "unsubscribe", "test")
    await store.add(ALICE, group_scope("newsletter"), "complaint", "test")
    assert await store.blocked([ALICE], RECEIPTS) == {}
    assert ALICE in await store.blocked([ALICE], NEWSLETTER)


async def test_blocked_returns_the_blocking_entry(store: SuppressionStore, clock: Clock) -> None:
    await store.add(ALICE, GLOBAL, "hard-bounce", "bounce", ttl=None, detail="550 5.1.1")
    [(recipient, entry)] = (await store.blocked([ALICE], RECEIPTS)).items()
    assert recipient == ALICE
    assert entry == Suppression(ALICE, GLOBAL, "hard-bounce", int(NOW), 0, "bounce")


# ---------------------------------------------------------------------------
# Expiry


async def test_expiry_exact_boundary(store: SuppressionStore, clock: Clock) -> None:
    assert await store.add(ALICE, group_scope("newsletter"), "manual", "t", ttl=100)
    [entry] = await store.entries(ALICE)
    expires = int(NOW) + 100
    assert entry.expires == expires
    clock.now = expires - 1
    assert await is_blocked(store, NEWSLETTER)
    clock.now = expires
    assert not await is_blocked(store, NEWSLETTER)
    assert entry.live(expires - 1)
    assert not entry.live(expires)
    # expired entries are still listed (the caller decides), until swept or replaced
    assert [e.expires for e in await store.entries(ALICE)] == [expires]


async def test_add_over_an_expired_entry_writes_a_new_one(
    store: SuppressionStore, redis: Redis, clock: Clock
) -> None:
    assert await store.add(ALICE, GLOBAL, "manual", "t", ttl=10)
    clock.now = NOW + 5
    assert not await store.add(ALICE, GLOBAL, "manual", "t", ttl=10)
    clock.now = NOW + 10
    assert await store.add(ALICE, GLOBAL, "manual", "t", ttl=10)
    [entry] = await store.entries(ALICE)
    assert (entry.created, entry.expires) == (int(NOW) + 10, int(NOW) + 20)
    assert [e["type"] for e in await events(redis)] == ["add", "add"]


async def test_no_ttl_never_expires(store: SuppressionStore, clock: Clock) -> None:
    await store.add(ALICE, GLOBAL, "manual", "t", ttl=None)
    clock.now = NOW + 100 * 365 * 86400
    assert await is_blocked(store, RECEIPTS)


# ---------------------------------------------------------------------------
# Add, remove, events


async def test_add_is_idempotent(store: SuppressionStore, redis: Redis) -> None:
    assert await store.add(ALICE, group_scope("newsletter"), "unsubscribe", "post") is True
    assert await store.add(ALICE, group_scope("newsletter"), "unsubscribe", "post") is False
    assert await store.add("ALICE@example.NET", group_scope("newsletter"), "unsubscribe", "x") is (
        False
    )
    assert len(await store.entries(ALICE)) == 1
    assert [e["type"] for e in await events(redis)] == ["add"]
    # a different reason for the same scope is a separate entry
    assert await store.add(ALICE, group_scope("newsletter"), "complaint", "fbl") is True
    assert len(await store.entries(ALICE)) == 2


async def test_unknown_reason_is_refused(store: SuppressionStore, redis: Redis) -> None:
    with pytest.raises(ValueError, match="reason"):
        await store.add(ALICE, GLOBAL, "bored", "t")
    assert await store.entries(ALICE) == []
    assert await events(redis) == []


async def test_events_for_add_and_remove(
    store: SuppressionStore, redis: Redis, clock: Clock
) -> None:
    await store.add(
        "Alice@Example.NET", group_scope("newsletter"), "unsubscribe", "post", detail="d"
    )
    clock.now = NOW + 7
    removed = await store.remove(ALICE, source="cli")
    assert [e.scope for e in removed] == [group_scope("newsletter")]
    assert await events(redis) == [
        {
            "type": "add",
            "address": ALICE,
            "scope": "g:newsletter",
            "reason": "unsubscribe",
            "source": "post",
            "detail": "d",
            "time": str(int(NOW)),
        },
        {
            "type": "remove",
            "address": ALICE,
            "scope": "g:newsletter",
            "reason": "unsubscribe",
            "source": "cli",
            "detail": "",
            "time": str(int(NOW) + 7),
        },
    ]


async def test_remove_with_filters(store: SuppressionStore, redis: Redis) -> None:
    await store.add(ALICE, GLOBAL, "manual", "t")
    await store.add(ALICE, group_scope("newsletter"), "unsubscribe", "t")
    await store.add(ALICE, group_scope("newsletter"), "hard-bounce", "t")
    await store.add(ALICE, sender_scope("news@example.com"), "unsubscribe", "t")
    await store.add("bob@example.org", GLOBAL, "manual", "t")

    removed = await store.remove(ALICE, scope=group_scope("newsletter"), reason="unsubscribe")
    assert [(e.scope, e.reason) for e in removed] == [("g:newsletter", "unsubscribe")]

    removed = await store.remove(ALICE, reason="manual")
    assert [(e.scope, e.reason) for e in removed] == [(GLOBAL, "manual")]

    assert await store.remove(ALICE, scope=group_scope("promotions")) == []

    removed = await store.remove("ALICE@EXAMPLE.NET", scope=group_scope("newsletter"))
    assert [(e.scope, e.reason) for e in removed] == [("g:newsletter", "hard-bounce")]

    assert [(e.scope, e.reason) for e in await store.entries(ALICE)] == [
        ("s:news@example.com", "unsubscribe")
    ]
    removed = await store.remove(ALICE)
    assert len(removed) == 1
    assert await store.entries(ALICE) == []
    assert await store.remove(ALICE) == []
    # bob untouched
    assert len(await store.entries("bob@example.org")) == 1
    kinds = [e["type"] for e in await events(redis)]
    assert kinds.count("add") == 5
    assert kinds.count("remove") == 4


# ---------------------------------------------------------------------------
# Scan, bulk lookup, normalisation


async def test_scan_streams_every_entry(store: SuppressionStore) -> None:
    expected = set()
    for i in range(7):
        address = f"user{i}@example.net"
        await store.add(address, GLOBAL, "hard-bounce", "t")
        expected.add((address, GLOBAL, "hard-bounce"))
        if i % 2:
            await store.add(address, group_scope("newsletter"), "unsubscribe", "t")
            expected.add((address, "g:newsletter", "unsubscribe"))
    got = [(e.address, e.scope, e.reason) async for e in store.scan(batch=2)]
    assert len(got) == len(expected)
    assert set(got) == expected


async def test_scan_ignores_other_prefixes(redis: Redis) -> None:
    ours = SuppressionStore(redis, "ocr")
    theirs = SuppressionStore(redis, "other")
    await ours.add(ALICE, GLOBAL, "manual", "t")
    await theirs.add("bob@example.org", GLOBAL, "manual", "t")
    assert [e.address async for e in ours.scan()] == [ALICE]
    assert await theirs.blocked([ALICE], RECEIPTS) == {}


async def test_lookup_of_200_recipients(store: SuppressionStore) -> None:
    recipients = [f"User{i}@Example{i % 5}.NET" for i in range(200)]
    want_newsletter = set()
    want_receipts = set()
    for i, rcpt in enumerate(recipients):
        if i % 3 == 0:
            await store.add(rcpt.lower(), GLOBAL, "hard-bounce", "t")
            want_newsletter.add(rcpt)
            want_receipts.add(rcpt)
        elif i % 7 == 0:
            await store.add(rcpt, group_scope("newsletter"), "unsubscribe", "t")
            want_newsletter.add(rcpt)
        elif i % 11 == 0:
            await store.add(rcpt, group_scope("promotions"), "unsubscribe", "t")
    blocked = await store.blocked(recipients, NEWSLETTER)
    assert set(blocked) == want_newsletter  # keyed by the recipient as given
    assert set(await store.blocked(recipients, RECEIPTS)) == want_receipts
    assert all(blocked[r].address == r.lower() for r in blocked)
    assert await store.blocked([], NEWSLETTER) == {}


@pytest.mark.parametrize(
    ("stored", "looked_up"),
    [
        ("Alice@Example.NET", "alice@example.net"),
        ("alice@example.net", "Alice@Example.NET"),
        ("<ALICE@EXAMPLE.NET>", "alice@example.net"),
        ("jürgen@Bücher.Example", "JÜRGEN@xn--bcher-kva.example"),
    ],
)
async def test_address_normalisation(store: SuppressionStore, stored: str, looked_up: str) -> None:
    await store.add(stored, GLOBAL, "manual", "t")
    assert looked_up in await store.blocked([looked_up], RECEIPTS)
    assert len(await store.entries(looked_up)) == 1


async def test_key_layout_uses_a_hash_tag(store: SuppressionStore, redis: Redis) -> None:
    await store.add("Alice@Example.NET", GLOBAL, "manual", "cli", ttl=None)
    assert store.key(ALICE) == "ocr:sup:{alice@example.net}"
    fields = await redis.hgetall("ocr:sup:{alice@example.net}")
    assert fields == {b"*|manual": f"{int(NOW)}|0|cli".encode()}


async def test_corrupt_fields_are_ignored(store: SuppressionStore, redis: Redis) -> None:
    await redis.hset(store.key(ALICE), mapping={"*|manual": "garbage", "g:x|unsubscribe": "1|2"})
    assert await store.blocked([ALICE], NEWSLETTER) == {}
    assert await store.entries(ALICE) == []


async def test_ping(store: SuppressionStore) -> None:
    assert await store.ping() is True


# ---------------------------------------------------------------------------
# Scope helpers


def test_scope_helpers() -> None:
    assert scopes_for_unsubscribe("group", "newsletter", "news@example.com") == "g:newsletter"
    assert scopes_for_unsubscribe("sender", "newsletter", "News@Example.com") == (
        "s:news@example.com"
    )
    assert scopes_for_unsubscribe("sender", "newsletter", None) == "g:newsletter"
    assert scopes_for_unsubscribe("all_marketing", "newsletter", None) == GLOBAL
    assert parse_scope(None, None) == GLOBAL
    assert parse_scope("newsletter", None) == "g:newsletter"
    assert parse_scope(None, "News@Example.com") == "s:news@example.com"
    with pytest.raises(ValueError, match="not both"):
        parse_scope("newsletter", "news@example.com")
    assert describe_scope(GLOBAL) == "global"
    assert describe_scope("g:newsletter") == "group:newsletter"
    assert describe_scope("s:news@example.com") == "sender:news@example.com"


# ---------------------------------------------------------------------------
# The stored pattern set, reused between lookups


async def commands(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def test_a_one_recipient_lookup_is_one_command_while_the_patterns_are_fresh(
    redis: Redis, clock: Clock
) -> None:
    store = SuppressionStore(redis, "ocr", clock=clock, patterns_refresh=60)
    await store.lookup([ALICE], NEWSLETTER)  # reads the pattern set
    before = await commands(redis)
    for _ in range(5):
        await store.lookup([ALICE], NEWSLETTER)
    after = await commands(redis)
    assert after.get("hgetall", 0) - before.get("hgetall", 0) == 5
    assert after.get("smembers", 0) == before.get("smembers", 0)


async def test_a_pattern_added_elsewhere_applies_within_patterns_refresh(
    redis: Redis, clock: Clock
) -> None:
    relay_store = SuppressionStore(redis, "ocr", clock=clock, patterns_refresh=0.3)
    admin_store = SuppressionStore(redis, "ocr", clock=clock)  # another process, say the CLI
    address = "x@trap.example"
    assert not (await relay_store.lookup([address], NEWSLETTER)).blocked
    assert await admin_store.add_pattern("trap.example", "test")
    # a fan-out reads the pattern set only when it is stale too
    assert not (await relay_store.lookup([address, ALICE], NEWSLETTER)).blocked
    await asyncio.sleep(0.35)
    assert (await relay_store.lookup([address], NEWSLETTER)).blocked[address].source == (
        "*@trap.example"
    )
    assert await admin_store.remove_pattern("trap.example", "test")
    await asyncio.sleep(0.35)
    assert not (await relay_store.lookup([address], NEWSLETTER)).blocked


async def test_a_pattern_added_through_the_same_store_applies_at_once(
    redis: Redis, clock: Clock
) -> None:
    store = SuppressionStore(redis, "ocr", clock=clock, patterns_refresh=60)
    assert not (await store.lookup(["y@trap.example"], NEWSLETTER)).blocked
    assert await store.add_pattern("trap.example", "test")
    assert (await store.lookup(["y@trap.example"], NEWSLETTER)).blocked
    assert await store.remove_pattern("trap.example", "test")
    assert not (await store.lookup(["y@trap.example"], NEWSLETTER)).blocked
