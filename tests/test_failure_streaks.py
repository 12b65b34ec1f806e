"""Failure streaks in the store and ``Feedback`` thresholds, against the real Redis.

The run of failures is broken by a copy accepted *after* the last failure and sent
*before* the next failed one: with a store-and-forward upstream every copy is
accepted first and bounces later, so an acceptance alone proves nothing.
"""

from __future__ import annotations

import pytest
from helpers import NOW, Clock
from redis.asyncio import Redis

from relay.config import BounceThresholds
from relay.feedback.record import Attribution, Feedback
from relay.metrics import Metrics
from relay.model import Route
from relay.suppression.report import DailyCounters
from relay.suppression.store import CONFIRMED_AFTER, DAY, GLOBAL, SuppressionStore

ALICE = "alice@example.net"
NEWSLETTER = Route("marketing", "newsletter", "news@example.com")


async def accepted(store: SuppressionStore, message: str) -> None:
    """What the pipeline does after the upstream accepted a copy to ALICE."""
    lookup = await store.lookup([ALICE], NEWSLETTER)
    await store.note_delivered(lookup.streaks, message)


async def test_kinds_are_counted_apart(store: SuppressionStore) -> None:
    assert await store.record_failure(ALICE, "soft", NOW, "AAAA") == 1
    assert await store.record_failure(ALICE, "soft", NOW, "BBBB") == 2
    assert await store.record_failure(ALICE, "hard", NOW, "CCCC") == 1
    assert await store.record_failure(ALICE, "unknown") == 1
    with pytest.raises(ValueError, match="kind"):
        await store.record_failure(ALICE, "spam")


async def test_a_later_copy_accepted_breaks_the_run(store: SuppressionStore, clock: Clock) -> None:
    await store.record_failure(ALICE, "soft", NOW, "AAAA")
    await store.record_failure(ALICE, "soft", NOW, "BBBB")
    clock.now = NOW + 60
    await accepted(store, "CCCC")  # copy C accepted, never bounces
    clock.now = NOW + 70
    await accepted(store, "DDDD")  # the first acceptance is the one remembered
    assert await store.record_failure(ALICE, "soft", NOW + 120, "EEEE") == 1


async def test_the_accepted_copy_bouncing_itself_breaks_nothing(
    store: SuppressionStore, clock: Clock
) -> None:
    await store.record_failure(ALICE, "soft", NOW, "AAAA")
    clock.now = NOW + 60
    await accepted(store, "BBBB")
    assert await store.record_failure(ALICE, "soft", NOW + 60, "BBBB") == 2  # B itself bounced
    clock.now = NOW + 90
    await accepted(store, "CCCC")
    # a bounce for a copy sent before C's acceptance: C may still bounce, keep counting
    assert await store.record_failure(ALICE, "soft", NOW + 30, "XXXX") == 3
    assert await store.record_failure(ALICE, "soft", NOW + 90, "CCCC") == 4


async def test_unknown_send_time_never_resets(store: SuppressionStore, clock: Clock) -> None:
    await store.record_failure(ALICE, "unknown", NOW, "AAAA")
    clock.now = NOW + 60
    await accepted(store, "BBBB")
    assert await store.record_failure(ALICE, "unknown") == 2


async def test_quiet_streak_ends_after_the_confirmation_period(
    store: SuppressionStore, redis: Redis, clock: Clock
) -> None:
    await store.record_failure(ALICE, "soft", NOW, "AAAA")
    clock.now = NOW + 60
    await accepted(store, "BBBB")
    clock.now = NOW + 60 + CONFIRMED_AFTER + 1
    await accepted(store, "CCCC")
    assert await redis.hgetall(store.key(ALICE)) == {}
    assert (await store.lookup([ALICE], NEWSLETTER)).streaks == {}


async def test_lookup_reports_streaks_only_for_recipients_still_mailed(
    store: SuppressionStore,
) -> None:
    bob = "bob@example.org"
    await store.record_failure(ALICE, "soft", NOW, "AAAA")
    await store.record_failure(bob, "soft", NOW, "AAAA")
    await store.add(bob, GLOBAL, "manual", "test")
    lookup = await store.lookup([ALICE, bob, "carol@example.com"], NEWSLETTER)
    assert list(lookup.blocked) == [bob]
    assert list(lookup.streaks) == [ALICE]
    assert lookup.streaks[ALICE].ok_since is None


async def test_success_dsn_and_removal_end_the_streak(store: SuppressionStore) -> None:
    await store.record_failure(ALICE, "soft", NOW, "AAAA")
    await store.end_streak(ALICE)
    assert (await store.lookup([ALICE], NEWSLETTER)).streaks == {}
    await store.record_failure(ALICE, "hard", NOW, "AAAA")
    await store.add(ALICE, GLOBAL, "hard-bounce", "bounce")
    await store.remove(ALICE, GLOBAL, "hard-bounce", "cli")
    assert (await store.lookup([ALICE], NEWSLETTER)).streaks == {}


@pytest.fixture
def feedback(store: SuppressionStore, redis: Redis) -> Feedback:
    thresholds = BounceThresholds(hard=2, soft=3, unknown=2, policy=0)
    return Feedback(store, thresholds, DailyCounters(redis, "ocr"), Metrics())


async def test_thresholds_per_kind(feedback: Feedback, store: SuppressionStore) -> None:
    who = Attribution(ALICE, "newsletter", NOW, "AAAA", "verp")
    assert not (await feedback.failure(who, "hard", "5.1.1", "dsn")).suppressed
    outcome = await feedback.failure(who, "hard", "5.1.1", "dsn")
    assert (outcome.count, outcome.threshold, outcome.suppressed) == (2, 2, True)
    [entry] = await store.entries(ALICE)
    assert (entry.reason, entry.expires - entry.created) == ("hard-bounce", 180 * DAY)


async def test_unknown_failures_suppress_like_soft_ones(
    feedback: Feedback, store: SuppressionStore
) -> None:
    who = Attribution(ALICE)
    await feedback.failure(who, "unknown", "5.0.0", "dsn")
    assert (await feedback.failure(who, "unknown", "5.0.0", "dsn")).suppressed
    [entry] = await store.entries(ALICE)
    assert (entry.reason, entry.expires - entry.created) == ("soft-bounce", 7 * DAY)


async def test_policy_never_suppresses_by_default(
    feedback: Feedback, store: SuppressionStore
) -> None:
    for _ in range(20):
        outcome = await feedback.failure(Attribution(ALICE), "policy", "5.7.1", "dsn")
    assert (outcome.count, outcome.suppressed) == (20, False)
    assert await store.entries(ALICE) == []


async def test_complaint_is_permanent_and_protected(
    feedback: Feedback, store: SuppressionStore
) -> None:
    assert await feedback.complaint(Attribution(ALICE, "newsletter"), "arf")
    assert not await feedback.complaint(Attribution(ALICE, "newsletter"), "arf")
    [entry] = await store.entries(ALICE)
    assert (entry.reason, entry.expires) == ("complaint", 0)
    from relay.suppression.store import ProtectedEntry

    with pytest.raises(ProtectedEntry):
        await store.remove(ALICE)
