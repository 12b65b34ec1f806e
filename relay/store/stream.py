"""One consumer group on a Redis stream: the calls ``relay.outbound.events`` needs.

Claims are exclusive: an entry is taken over only when it has been idle for at
least ``min_idle_ms`` (``XCLAIM``'s own check, atomic in Redis). A claim resets the
idle time, so of several consumers that see the same overdue entry exactly one
gets it; the others' ``XCLAIM`` answers nothing for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import ResponseError

from relay.store.client import RedisClient, unavailable

Fields = dict[bytes, bytes]

START = "0"
"""Where a new group starts: at the oldest entry kept, so an event written before the
group existed (just after start, before a consumer was first configured) is delivered."""


@dataclass(frozen=True, slots=True)
class Pending:
    id: str
    idle_ms: int
    deliveries: int


class StreamGroup:
    def __init__(self, redis: RedisClient, stream: str, group: str) -> None:
        self._redis = redis
        self.stream = stream
        self.group = group

    async def ensure(self, start: str = START) -> None:
        """Create the group (and the stream) unless it exists."""
        with unavailable("events group"):
            try:
                await self._redis.xgroup_create(self.stream, self.group, id=start, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read_new(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, Fields]]:
        """Entries never delivered to any consumer of the group (each to one only)."""
        with unavailable("events read"):
            reply = await self._redis.xreadgroup(
                self.group, consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        entries = cast(list[tuple[bytes, list[tuple[bytes, Fields]]]], reply or [])
        return [(i.decode(), fields) for _, messages in entries for i, fields in messages]

    async def pending(self, min_idle_ms: int, count: int) -> list[Pending]:
        """Delivered but unacknowledged entries idle at least ``min_idle_ms``."""
        with unavailable("events pending"):
            rows = cast(
                list[dict[str, Any]],
                await self._redis.xpending_range(
                    self.stream, self.group, min="-", max="+", count=count, idle=min_idle_ms
                ),
            )
        return [
            Pending(
                r["message_id"].decode(), int(r["time_since_delivered"]), int(r["times_delivered"])
            )
            for r in rows
        ]

    async def claim(
        self, consumer: str, min_idle_ms: int, ids: list[str]
    ) -> list[tuple[str, Fields]]:
        """Take over ``ids`` still idle ``min_idle_ms``; answers those this consumer got.

        An entry trimmed from the stream meanwhile comes back without fields: it is
        acknowledged here, there is nothing left to deliver.
        """
        if not ids:
            return []
        with unavailable("events claim"):
            claimed = cast(
                list[tuple[bytes, Fields | None]],
                await self._redis.xclaim(
                    self.stream,
                    self.group,
                    consumer,
                    min_idle_time=min_idle_ms,
                    message_ids=cast(list[Any], ids),
                ),
            )
            gone = [i for i, fields in claimed if fields is None]
            if gone:
                await self._redis.xack(self.stream, self.group, *gone)
        return [(i.decode(), fields) for i, fields in claimed if fields is not None]

    async def ack(self, entry_id: str) -> None:
        with unavailable("events ack"):
            await self._redis.xack(self.stream, self.group, entry_id)
