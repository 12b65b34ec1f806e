"""Ids seen before: each webhook event (and each Mailgun token) is acted on once.

``{prefix}:seen:{namespace}:{<sha256 of id, 32 hex>}`` STRING, written with NX and an
expiry, so the ledger forgets by itself.
"""

from __future__ import annotations

import hashlib

from relay.store.client import RedisClient, unavailable
from relay.store.keys import Keys


class Ledger:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    def _key(self, namespace: str, item: str) -> str:
        digest = hashlib.sha256(item.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return self._keys.seen(namespace, digest)

    async def first(self, namespace: str, item: str, ttl: float) -> bool:
        """Record ``item``; True when it was not seen within ``ttl`` seconds."""
        with unavailable("ledger"):
            return bool(
                await self._redis.set(
                    self._key(namespace, item), b"1", nx=True, ex=max(1, int(ttl))
                )
            )

    async def forget(self, namespace: str, item: str) -> None:
        """Undo ``first`` for an item whose processing failed, so its retry is processed."""
        with unavailable("ledger"):
            await self._redis.delete(self._key(namespace, item))
