"""The audit log of inbound messages: each kept once under its id, for ``keep_days``.

Written only if absent, so the same DSN delivered twice is processed and counted
once; ``forget`` removes a message whose processing failed so that the sender's
retry is processed. What is written first is a bounded digest (the message's first
``digest_bytes``); only a message that was attributed gets its full copy
(``keep_full``), and only while the full copies of the last ``keep_days`` stay under
``bounces.audit_max_bytes`` (counted per day in one hash, so approximate under
concurrency by at most the messages in flight). Junk costs a digest, never its size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from relay.eventlog import EventLog
from relay.store.client import RedisClient, unavailable
from relay.store.keys import Keys

log = EventLog(__name__)

_REMEMBER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'received', ARGV[2], 'source', ARGV[3],
           'message_id', ARGV[4], 'outcome', 'processing', 'kept', 'digest')
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


@dataclass(frozen=True, slots=True)
class InboundRecord:
    id: str
    received: float
    source: str
    kind: str
    outcome: str


class InboundLog:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._remember = redis.register_script(_REMEMBER)

    async def remember(
        self, inbound_id: str, data: bytes, now: float, source: str, message_id: str, keep: int
    ) -> bool:
        """Keep the message unless it is kept already; False for a duplicate."""
        with unavailable("inbound store"):
            new = await self._remember(
                keys=[self._keys.inbound(inbound_id)],
                args=[data, int(now), source, message_id[:998], keep],
            )
            if new:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.zadd(self._keys.inbound_index, {inbound_id: now})
                    pipe.zremrangebyscore(self._keys.inbound_index, "-inf", now - keep)
                    await pipe.execute()
        return bool(new)

    async def keep_full(
        self, inbound_id: str, data: bytes, now: float, keep: int, budget: int
    ) -> bool:
        """Store the full copy if the budget allows; False when only the digest stays."""
        day = int(now // 86400)
        with unavailable("inbound audit copy"):
            raw = await self._redis.hgetall(self._keys.inbound_bytes)
            used, old = 0, []
            for field, value in raw.items():
                bucket = int(field)
                if bucket <= day - keep // 86400 - 1:
                    old.append(field)
                else:
                    used += int(value)
            async with self._redis.pipeline(transaction=False) as pipe:
                if old:
                    pipe.hdel(self._keys.inbound_bytes, *old)
                if used + len(data) <= budget:
                    pipe.hset(
                        self._keys.inbound(inbound_id), mapping={"data": data, "kept": "full"}
                    )
                    pipe.hincrby(self._keys.inbound_bytes, str(day), len(data))
                await pipe.execute()
        return used + len(data) <= budget

    async def forget(self, inbound_id: str) -> None:
        with unavailable("inbound forget"):
            await self._redis.delete(self._keys.inbound(inbound_id))

    async def note_outcome(self, inbound_id: str, kind: str, outcome: str) -> None:
        with unavailable("inbound outcome"):
            await self._redis.hset(
                self._keys.inbound(inbound_id), mapping={"kind": kind, "outcome": outcome}
            )

    async def data(self, inbound_id: str) -> bytes | None:
        with unavailable("inbound show"):
            value = await self._redis.hget(self._keys.inbound(inbound_id), "data")
        return cast(bytes | None, value)

    async def record(self, inbound_id: str) -> InboundRecord | None:
        """One message's received time, source, kind and outcome (None: not kept)."""
        with unavailable("inbound show"):
            row = await self._redis.hmget(
                self._keys.inbound(inbound_id), "received", "source", "kind", "outcome"
            )
        received, source, kind, outcome = (
            v.decode("utf-8", "replace") if isinstance(v, bytes) else (v or "") for v in row
        )
        if not received:
            return None
        return InboundRecord(inbound_id, float(received), source, kind, outcome)

    async def recent(self, limit: int) -> Sequence[InboundRecord]:
        """The newest ``limit`` messages, newest first."""
        with unavailable("inbound list"):
            raw_ids = await self._redis.zrevrange(self._keys.inbound_index, 0, max(1, limit) - 1)
            ids = [i.decode() if isinstance(i, bytes) else str(i) for i in raw_ids]
            async with self._redis.pipeline(transaction=False) as pipe:
                for inbound_id in ids:
                    pipe.hmget(
                        self._keys.inbound(inbound_id), "received", "source", "kind", "outcome"
                    )
                rows = await pipe.execute()
        records = []
        for inbound_id, row in zip(ids, rows, strict=True):
            received, source, kind, outcome = (
                v.decode("utf-8", "replace") if v is not None else "" for v in row
            )
            if not received:
                continue  # expired between the index and the hash
            records.append(InboundRecord(inbound_id, float(received), source, kind, outcome))
        return records
