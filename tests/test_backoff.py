"""One backoff schedule for the retry queue and the event consumers (relay.outbound.backoff)."""

from __future__ import annotations

import pytest
from helpers import Clock, message
from redis.asyncio import Redis

from relay.config import RetryConfig
from relay.metrics import Metrics
from relay.outbound.backoff import backoff
from relay.outbound.events import StreamConsumer
from relay.outbound.retry import RetryQueue


def test_the_schedule_doubles_from_the_first_delay_up_to_the_ceiling() -> None:
    waits = [backoff(n, 60, 3600) for n in range(1, 9)]
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600]


def test_no_failure_yet_waits_the_first_delay_and_huge_counts_do_not_overflow() -> None:
    assert backoff(0, 5, 600) == 5
    assert backoff(10_000, 5, 600) == 600  # 5 * 2**9999 would overflow a float


async def _due_after_each_failure(redis: Redis, clock: Clock, config: RetryConfig) -> list[float]:
    queue = RetryQueue(redis, "ocr", config, clock=clock)
    await queue.put("a@example.com", "b@example.net", message(), "451 4.2.0 later")
    [(_, due)] = await redis.zrange("ocr:{queue}", 0, -1, withscores=True)
    waits = [due - clock.now]
    for _ in range(4):
        [item] = await queue.list()
        clock.now = item.due
        [claimed] = await queue.claim(10)
        due = await queue.defer(claimed, "451 4.2.0 still later")
        waits.append(due - clock.now)
    return waits


async def test_the_retry_queue_follows_the_schedule(redis: Redis, clock: Clock) -> None:
    """The copy failed once while the client waited; each retry that fails doubles the wait."""
    config = RetryConfig(first_delay=60, max_delay=500)
    waits = await _due_after_each_failure(redis, clock, config)
    assert waits == [backoff(n, 60, 500) for n in range(1, 6)] == [60, 120, 240, 480, 500]


@pytest.mark.parametrize("deliveries", [1, 2, 7])
async def test_the_event_consumers_follow_the_same_schedule(redis: Redis, deliveries: int) -> None:
    async def handler(event_id: str, event: dict[str, str]) -> bool:
        return True

    consumer = StreamConsumer(
        redis, "ocr:events", "g", handler, Metrics(), first_delay=5, max_delay=600
    )
    assert consumer._backoff(deliveries) == backoff(deliveries, 5, 600)
