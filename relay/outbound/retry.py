"""The durable retry queue: the relay's only queue, in Redis.

It holds per-recipient copies that the upstream deferred (4xx) or could not take
after other recipients of the same client transaction were already accepted.
The client was answered ``250`` for them, so from then on the relay owns them.

Keys (one hash tag, so the claim script is atomic on Redis Cluster too)::

    {prefix}:{queue}              ZSET  id -> time the item is due (or its lease ends)
    {prefix}:{queue}:item:<id>    HASH  mail_from, rcpt, data, attempts, first, reply

Claiming moves an item's score forward by a lease; a relay that dies mid-delivery
leaves the item to be claimed again when the lease ends (at-least-once).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from relay.config import RetryConfig
from relay.errors import SmtpReply, StoreUnavailable
from relay.eventlog import EventLog
from relay.metrics import Metrics
from relay.outbound.backoff import backoff
from relay.outbound.upstream import Outbound, Upstream
from relay.store.client import RedisClient, unavailable

log = EventLog(__name__)

LEASE = 120.0

_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
end
return ids
"""


@dataclass(frozen=True, slots=True)
class QueuedItem:
    id: str
    mail_from: str
    rcpt: str
    data: bytes
    attempts: int
    first: float
    reply: str
    due: float = 0.0


class RetryQueue:
    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        config: RetryConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._zset = f"{prefix}:{{queue}}"
        self._config = config
        self._clock = clock
        self._claim = redis.register_script(_CLAIM)

    def _item_key(self, item_id: str) -> str:
        return f"{self._zset}:item:{item_id}"

    async def put(self, mail_from: str, rcpt: str, data: bytes, reply: str) -> str:
        item_id = uuid.uuid4().hex
        now = self._clock()
        with unavailable("retry queue write failed"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    self._item_key(item_id),
                    mapping={
                        "mail_from": mail_from,
                        "rcpt": rcpt,
                        "data": data,
                        "attempts": 0,
                        "first": now,
                        "reply": reply,
                    },
                )
                pipe.zadd(self._zset, {item_id: now + self._delay(1)})
                await pipe.execute()
        return item_id

    async def claim(self, limit: int) -> list[QueuedItem]:
        now = self._clock()
        items = []
        with unavailable("retry queue claim failed"):
            ids = await self._claim(keys=[self._zset], args=[now, now + LEASE, limit])
            for raw_id in ids:
                item = await self._load(raw_id.decode())
                if item is None:
                    await self._redis.zrem(self._zset, raw_id)
                else:
                    items.append(item)
        return items

    async def _load(self, item_id: str, due: float = 0.0) -> QueuedItem | None:
        fields = await self._redis.hgetall(self._item_key(item_id))
        if not fields:
            return None
        raw = cast(dict[bytes, bytes], fields)
        return QueuedItem(
            id=item_id,
            mail_from=raw[b"mail_from"].decode(),
            rcpt=raw[b"rcpt"].decode(),
            data=raw[b"data"],
            attempts=int(raw[b"attempts"]),
            first=float(raw[b"first"]),
            reply=raw.get(b"reply", b"").decode(),
            due=due,
        )

    def _delay(self, failures: int) -> float:
        return backoff(failures, self._config.first_delay, self._config.max_delay)

    async def done(self, item_id: str) -> None:
        with unavailable("retry queue write failed"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self._zset, item_id)
                pipe.delete(self._item_key(item_id))
                await pipe.execute()

    async def defer(self, item: QueuedItem, reply: str) -> float:
        attempts = item.attempts + 1  # retries that failed; the first failure came before
        due = self._clock() + self._delay(attempts + 1)
        with unavailable("retry queue write failed"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._item_key(item.id), mapping={"attempts": attempts, "reply": reply})
                pipe.zadd(self._zset, {item.id: due})
                await pipe.execute()
        return due

    def expired(self, item: QueuedItem) -> bool:
        return self._clock() - item.first > self._config.max_age

    async def length(self) -> int:
        with unavailable("retry queue length failed"):
            return int(await self._redis.zcard(self._zset))

    async def list(self, limit: int = 1000) -> list[QueuedItem]:
        with unavailable("retry queue read failed"):
            entries = cast(
                list[tuple[bytes, float]],
                await self._redis.zrange(self._zset, 0, limit - 1, withscores=True),
            )
            items = []
            for raw_id, score in entries:
                item = await self._load(raw_id.decode(), due=float(score))
                if item is not None:
                    items.append(item)
        return items


class RetryWorker:
    """Background task of every relay process: delivers due items, reschedules the rest."""

    def __init__(
        self, queue: RetryQueue, upstream: Upstream, metrics: Metrics, interval: float
    ) -> None:
        self._queue = queue
        self.upstream = upstream
        self._metrics = metrics
        self._interval = interval
        self._wake = asyncio.Event()
        self._stopped = False
        self.judge: Callable[[QueuedItem, SmtpReply], Awaitable[None]] | None = None
        """Told of each final failure (refused, or expired while deferred), to count it."""

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Loop until ``stop()``; a stop flag rather than cancellation ends it cleanly."""
        while not self._stopped:
            try:
                await self.run_once()
            except StoreUnavailable as exc:
                log.warning("retry queue unavailable", error=exc)
            if self._stopped:
                break
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self._interval)
            finally:
                waiter.cancel()
            self._wake.clear()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    async def run_once(self, limit: int = 100) -> int:
        items = await self._queue.claim(limit)
        for item in items:
            await self._deliver(item)
        self._metrics.retry_length.set(await self._queue.length())
        return len(items)

    async def _judge(self, item: QueuedItem, reply: SmtpReply) -> None:
        if self.judge is None:
            return
        try:
            await self.judge(item, reply)
        except StoreUnavailable as exc:
            log.warning("retry failure not counted", id=item.id, error=exc)

    async def _deliver(self, item: QueuedItem) -> None:
        replies = await self.upstream.send(Outbound(item.mail_from, (item.rcpt,), item.data))
        reply = replies[item.rcpt]
        fields = {
            "id": item.id,
            "rcpt": item.rcpt,
            "attempts": item.attempts + 1,
            "reply": reply.code,
        }
        if reply.is_success:
            await self._queue.done(item.id)
            self._metrics.retry.labels("delivered").inc()
            log.info("retry delivered", **fields)
        elif reply.is_permanent:
            await self._queue.done(item.id)
            self._metrics.retry.labels("refused").inc()
            log.error("retry refused", **fields, text=reply.text)
            await self._judge(item, reply)
        elif self._queue.expired(item):
            await self._queue.done(item.id)
            self._metrics.retry.labels("expired").inc()
            log.error("retry expired", **fields, text=reply.text)
            await self._judge(item, reply)
        else:
            await self._queue.defer(item, str(reply))
            self._metrics.retry.labels("deferred").inc()
            log.info("retry deferred", **fields)
