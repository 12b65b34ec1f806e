"""The records behind mailto unsubscribe codes (``relay.mail.mailto``), kept with a TTL.

Written once per marketing message for all its recipients (one pipelined round
trip), read once per mailto request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from relay.store.client import RedisClient, unavailable
from relay.store.keys import Keys


class MailtoRecords:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def put(self, records: Mapping[str, bytes], ttl: int) -> None:
        """Store (or refresh) each code's record for ``ttl`` seconds."""
        if not records:
            return
        with unavailable("mailto codes"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for code, record in records.items():
                    pipe.set(self._keys.mailto(code), record, ex=max(1, ttl))
                await pipe.execute()

    async def get(self, code: str) -> bytes | None:
        with unavailable("mailto code"):
            value = await self._redis.get(self._keys.mailto(code))
        return cast(bytes | None, value)
