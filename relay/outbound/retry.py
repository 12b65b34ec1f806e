"""The durable retry queue: the relay's only queue, in Redis.

It holds per-recipient copies that the upstream deferred (4xx) or could not take
after other recipients of the same client transaction were already accepted.
The client was answered ``250`` for them, so from then on the relay owns them.

Keys (one hash tag, so the claim script is atomic on Redis Cluster too)::

    {prefix}:{queue}:up:<upstream>  ZSET  id -> time the item is due (or its lease ends)
    {prefix}:{queue}:upstreams      SET   every <upstream> with a partition
    {prefix}:{queue}:item:<id>      HASH  mail_from, rcpt, head, msg, attempts, first,
                                          reply, upstream (older items: data)
    {prefix}:{queue}:msg:<msg>      HASH  body, refs: one body per message, not per copy
    {prefix}:{queue}                ZSET  items queued before partitions (any relay takes them)

The queue is partitioned by upstream (``Upstream.identity``): a copy is delivered
only through the upstream it was accepted for, so relays with different upstreams
can share one Redis. Claiming moves an item's score forward by a lease; a relay
that dies mid-delivery leaves the item to be claimed again when the lease ends by
any relay of the same upstream (at-least-once).
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

_RELEASE = """
if redis.call('HINCRBY', KEYS[1], 'refs', -1) <= 0 then redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class RetryCopy:
    """One deferred copy as the pipeline keeps it: its own header block, not the body."""

    mail_from: str
    rcpt: str
    head: bytes
    reply: str


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
    upstream: str = ""
    msg: str = ""
    """The shared body's id ("" for an item that holds its whole copy)."""


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
        self._release = redis.register_script(_RELEASE)

    def _item_key(self, item_id: str) -> str:
        return f"{self._zset}:item:{item_id}"

    def _body_key(self, msg: str) -> str:
        return f"{self._zset}:msg:{msg}"

    async def put_message(self, copies: list[RetryCopy], body: bytes, upstream: str) -> None:
        """Queue the deferred copies of one message: the body once, each copy's header block.

        One transaction: either every copy is queued or none (``StoreUnavailable``).
        """
        msg = uuid.uuid4().hex
        now = self._clock()
        with unavailable("retry queue write failed"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._body_key(msg), mapping={"body": body, "refs": len(copies)})
                for copy in copies:
                    item_id = uuid.uuid4().hex
                    pipe.hset(
                        self._item_key(item_id),
                        mapping={
                            "mail_from": copy.mail_from,
                            "rcpt": copy.rcpt,
                            "head": copy.head,
                            "msg": msg,
                            "attempts": 0,
                            "first": now,
                            "reply": copy.reply,
                            "upstream": upstream,
                        },
                    )
                    pipe.zadd(self._partition(upstream), {item_id: now + self._delay(1)})
                if upstream:
                    pipe.sadd(self._upstreams, upstream)
                await pipe.execute()

    def _partition(self, upstream: str) -> str:
        """The due-time ZSET of one upstream's items ("": the one from before partitions)."""
        return f"{self._zset}:up:{upstream}" if upstream else self._zset

    @property
    def _upstreams(self) -> str:
        return f"{self._zset}:upstreams"

    async def put(
        self, mail_from: str, rcpt: str, data: bytes, reply: str, upstream: str = ""
    ) -> str:
        """Queue a copy for ``upstream`` (``Upstream.identity``): only it delivers the copy."""
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
                        "upstream": upstream,
                    },
                )
                pipe.zadd(self._partition(upstream), {item_id: now + self._delay(1)})
                if upstream:
                    pipe.sadd(self._upstreams, upstream)
                await pipe.execute()
        return item_id

    async def claim(self, limit: int, upstream: str = "") -> list[QueuedItem]:
        """Due items of ``upstream`` (and unpartitioned ones), leased to this relay."""
        now = self._clock()
        items: list[QueuedItem] = []
        with unavailable("retry queue claim failed"):
            for zset in dict.fromkeys((self._partition(upstream), self._zset)):
                ids = await self._claim(keys=[zset], args=[now, now + LEASE, limit - len(items)])
                for raw_id in ids:
                    item = await self._load(raw_id.decode())
                    if item is None:
                        await self._redis.zrem(zset, raw_id)
                    else:
                        items.append(item)
                if len(items) >= limit:
                    break
        return items

    async def _load(self, item_id: str, due: float = 0.0, body: bool = True) -> QueuedItem | None:
        """An item with its copy rebuilt (its header block + the message's body)."""
        fields = await self._redis.hgetall(self._item_key(item_id))
        if not fields:
            return None
        raw = cast(dict[bytes, bytes], fields)
        msg = raw.get(b"msg", b"").decode()
        data = raw.get(b"data", b"")
        if msg:
            data = raw[b"head"]
            if body:
                shared = cast(bytes | None, await self._redis.hget(self._body_key(msg), "body"))
                if shared is None:
                    log.error("retry item body missing", id=item_id, msg=msg)
                    return None
                data += shared
        return QueuedItem(
            id=item_id,
            mail_from=raw[b"mail_from"].decode(),
            rcpt=raw[b"rcpt"].decode(),
            data=data,
            attempts=int(raw[b"attempts"]),
            first=float(raw[b"first"]),
            reply=raw.get(b"reply", b"").decode(),
            due=due,
            upstream=raw.get(b"upstream", b"").decode(),
            msg=msg,
        )

    def _delay(self, failures: int) -> float:
        return backoff(failures, self._config.first_delay, self._config.max_delay)

    async def done(self, item: QueuedItem) -> None:
        with unavailable("retry queue write failed"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self._partition(item.upstream), item.id)
                pipe.zrem(self._zset, item.id)
                pipe.delete(self._item_key(item.id))
                await pipe.execute()
            if item.msg:  # the last copy of a message takes its body along
                await self._release(keys=[self._body_key(item.msg)], args=[])

    async def defer(self, item: QueuedItem, reply: str) -> float:
        attempts = item.attempts + 1  # retries that failed; the first failure came before
        due = self._clock() + self._delay(attempts + 1)
        with unavailable("retry queue write failed"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._item_key(item.id), mapping={"attempts": attempts, "reply": reply})
                pipe.zadd(self._partition(item.upstream), {item.id: due})
                await pipe.execute()
        return due

    def expired(self, item: QueuedItem) -> bool:
        return self._clock() - item.first > self._config.max_age

    async def _partitions(self) -> list[str]:
        members = cast(set[bytes], await self._redis.smembers(self._upstreams))
        return [self._zset] + [self._partition(m.decode()) for m in sorted(members)]

    async def length(self) -> int:
        """Items waiting, over every upstream's partition."""
        with unavailable("retry queue length failed"):
            return sum([int(await self._redis.zcard(z)) for z in await self._partitions()])

    async def list(self, limit: int = 1000) -> list[QueuedItem]:
        """Items of every upstream, soonest due first."""
        with unavailable("retry queue read failed"):
            entries: list[tuple[bytes, float]] = []
            for zset in await self._partitions():
                entries += cast(
                    list[tuple[bytes, float]],
                    await self._redis.zrange(zset, 0, limit - 1, withscores=True),
                )
            items = []
            for raw_id, score in sorted(entries, key=lambda e: e[1])[:limit]:
                item = await self._load(raw_id.decode(), due=float(score), body=False)
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
        items = await self._queue.claim(limit, self.upstream.identity)
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
            await self._queue.done(item)
            self._metrics.retry.labels("delivered").inc()
            log.info("retry delivered", **fields)
        elif reply.is_permanent:
            await self._queue.done(item)
            self._metrics.retry.labels("refused").inc()
            log.error("retry refused", **fields, text=reply.text)
            await self._judge(item, reply)
        elif self._queue.expired(item):
            await self._queue.done(item)
            self._metrics.retry.labels("expired").inc()
            log.error("retry expired", **fields, text=reply.text)
            await self._judge(item, reply)
        else:
            await self._queue.defer(item, str(reply))
            self._metrics.retry.labels("deferred").inc()
            log.info("retry deferred", **fields)
