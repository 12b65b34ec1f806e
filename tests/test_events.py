"""The events consumer against a real Redis: several consumers (and processes) in one group
each retry an overdue event exactly once, and a group created late loses no event."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
from collections import Counter
from pathlib import Path

from relay.metrics import Metrics
from relay.outbound.events import Event, StreamConsumer
from relay.store import client as redis_client

STREAM = "ocr:events"


class FlakyReceiver:
    """Refuses each event's first delivery, takes the second; counts every call."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def __call__(self, event_id: str, event: Event) -> bool:
        self.calls[event_id] += 1
        await asyncio.sleep(0.01)  # a receiver takes a moment: claims can overlap
        return self.calls[event_id] > 1


async def run_consumers(consumers: list[StreamConsumer], until: object, seconds: float) -> None:
    tasks = [asyncio.ensure_future(c.run()) for c in consumers]
    try:
        for _ in range(int(seconds * 20)):
            if until():  # type: ignore[operator]
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.6)  # a few more rounds: nothing more may be sent
    finally:
        for c in consumers:
            c.stop()
        await asyncio.wait(tasks, timeout=5)


async def test_several_consumers_retry_each_event_exactly_once(redis_url: str) -> None:
    writer = redis_client.connect(redis_url, 2)
    clients = [redis_client.connect(redis_url, 2) for _ in range(4)]
    receiver = FlakyReceiver()
    try:
        # written before any group exists: must still be delivered
        ids = [(await writer.xadd(STREAM, {"n": str(i)})).decode() for i in range(20)]
        consumers = [
            StreamConsumer(c, STREAM, "webhook", receiver, Metrics(), first_delay=0.1, block_ms=20)
            for c in clients
        ]

        def done() -> bool:
            return all(receiver.calls[i] >= 2 for i in ids)

        await run_consumers(consumers, done, 15)
        assert {i: receiver.calls[i] for i in ids} == dict.fromkeys(ids, 2)
        assert await writer.xpending(STREAM, "webhook") == {
            "pending": 0,
            "min": None,
            "max": None,
            "consumers": [],
        }
    finally:
        for c in (writer, *clients):
            await c.aclose()


async def test_an_event_is_not_retried_while_its_lease_runs(redis_url: str) -> None:
    """A slow receiver (longer than the backoff) is not raced by another consumer."""
    clients = [redis_client.connect(redis_url, 2) for _ in range(2)]
    calls: list[str] = []

    async def slow(event_id: str, event: Event) -> bool:
        calls.append(event_id)
        await asyncio.sleep(0.8)
        return True

    try:
        await clients[0].xadd(STREAM, {"n": "1"})
        consumers = [
            StreamConsumer(c, STREAM, "webhook", slow, Metrics(), first_delay=0.1, lease=2.0)
            for c in clients
        ]
        await run_consumers(consumers, lambda: len(calls) >= 1, 5)
        await asyncio.sleep(0.5)
        assert len(calls) == 1
    finally:
        for c in clients:
            await c.aclose()


def _consume(url: str, out: str, seconds: float) -> None:
    calls: list[str] = []

    async def main() -> None:
        client = redis_client.connect(url, 2)

        async def handler(event_id: str, event: Event) -> bool:
            calls.append(event_id)
            await asyncio.sleep(0.005)
            if int(event["n"]) % 3:
                return True
            try:  # every third event is refused the first time, by whichever process
                os.close(os.open(Path(out).parent / f"seen-{event_id}", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return True
            return False

        consumer = StreamConsumer(
            client, STREAM, "notify-mail", handler, Metrics(), first_delay=0.1, block_ms=20
        )
        task = asyncio.ensure_future(consumer.run())
        await asyncio.sleep(seconds)
        consumer.stop()
        await asyncio.wait([task], timeout=5)
        await client.aclose()

    asyncio.run(main())
    Path(out).write_text(json.dumps(calls))


async def test_consumers_in_separate_processes_share_without_duplicates(
    redis_url: str, tmp_path: Path
) -> None:
    writer = redis_client.connect(redis_url, 2)
    try:
        ids = [(await writer.xadd(STREAM, {"n": str(i)})).decode() for i in range(30)]
        ctx = multiprocessing.get_context("spawn")
        outs = [tmp_path / f"calls-{n}.json" for n in range(3)]
        procs = [ctx.Process(target=_consume, args=(redis_url, str(o), 6.0)) for o in outs]
        for p in procs:
            p.start()
        await asyncio.to_thread(lambda: [p.join(30) for p in procs])
        assert [p.exitcode for p in procs] == [0, 0, 0]
        calls: Counter[str] = Counter()
        for out in outs:
            calls.update(json.loads(out.read_text()))
        assert {i: calls[i] for i in ids} == {i: 1 if n % 3 else 2 for n, i in enumerate(ids)}
        pending = await writer.xpending(STREAM, "notify-mail")
        assert pending["pending"] == 0
    finally:
        await writer.aclose()
