"""The suppression list in Redis.

Data model (one key per address, so the layout shards on Redis Cluster and a
per-message lookup is one pipelined round trip, O(recipients))::

    {prefix}:sup:{<address>}   HASH   field "<scope>|<reason>"
                                      value "<created>|<expires>|<source>"
    {prefix}:events            STREAM one entry per change, for applications

``<address>`` is ``normalize_address()``; the braces are a Cluster hash tag.
``<scope>`` is ``*`` (every marketing group), ``g:<group>`` or ``s:<sender>``
(one From address). ``<reason>`` is one of ``REASONS``. ``<created>`` and
``<expires>`` are Unix seconds, ``<expires>`` 0 for never; expiry is decided when
the entry is read, so an expired entry never blocks mail even before it is
swept. ``<source>`` says who wrote it (``post``, ``cli``, ``bounce`` …).
New scopes, reasons or fields are new hash fields or value parts: no migration.

Who is blocked: marketing mail by any live entry in ``*``, its group or its
sender scope; transactional mail only by a live ``*`` entry with a hard reason
(hard bounce, complaint, manual block) — never by an unsubscribe.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.errors import StoreUnavailable
from relay.model import Route, normalize_address

REASONS = ("unsubscribe", "hard-bounce", "soft-bounce", "complaint", "manual", "pattern")
HARD_REASONS = frozenset({"hard-bounce", "complaint", "manual"})
GLOBAL = "*"
EVENTS_MAXLEN = 1_000_000

# Sets the field unless a live entry is already there; answers 1 when it wrote.
_ADD_SCRIPT = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local expires = tonumber(string.match(old, '^[^|]*|([^|]*)|'))
  if expires == 0 or expires > tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def group_scope(group: str) -> str:
    return f"g:{group}"


def sender_scope(sender: str) -> str:
    return f"s:{normalize_address(sender)}"


@dataclass(frozen=True, slots=True)
class Suppression:
    address: str
    scope: str
    reason: str
    created: int
    expires: int
    source: str

    def live(self, now: float) -> bool:
        return self.expires == 0 or self.expires > now

    def blocks(self, route: Route) -> bool:
        if route.is_marketing:
            return self.scope in _route_scopes(route)
        return self.scope == GLOBAL and self.reason in HARD_REASONS


def _route_scopes(route: Route) -> tuple[str, ...]:
    scopes = [GLOBAL, sender_scope(route.sender)]
    if route.group:
        scopes.append(group_scope(route.group))
    return tuple(scopes)


def _decode(address: str, field: bytes, value: bytes) -> Suppression | None:
    try:
        scope, _, reason = field.decode().rpartition("|")
        created, expires, source = value.decode().split("|", 2)
        return Suppression(address, scope, reason, int(created), int(expires), source)
    except (UnicodeDecodeError, ValueError):
        return None


class SuppressionStore:
    def __init__(
        self, redis: Redis, prefix: str = "ocr", clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._clock = clock
        self._add = redis.register_script(_ADD_SCRIPT)

    def key(self, address: str) -> str:
        """The one place the per-address key is spelled."""
        return f"{self._prefix}:sup:{{{address}}}"

    @property
    def events_key(self) -> str:
        return f"{self._prefix}:events"

    async def blocked(self, recipients: Sequence[str], route: Route) -> dict[str, Suppression]:
        """Which recipients this route must not send to, with the entry that blocks each.

        One pipelined round trip for all recipients.
        """
        normalized = [normalize_address(r) for r in recipients]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for address in normalized:
                    pipe.hgetall(self.key(address))
                results = await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"suppression lookup failed: {type(exc).__name__}") from exc
        now = self._clock()
        blocked: dict[str, Suppression] = {}
        for recipient, address, fields in zip(recipients, normalized, results, strict=True):
            for field, value in fields.items():
                entry = _decode(address, field, value)
                if entry is not None and entry.live(now) and entry.blocks(route):
                    blocked[recipient] = entry
                    break
        return blocked

    async def add(
        self,
        address: str,
        scope: str,
        reason: str,
        source: str,
        ttl: float | None = None,
        detail: str = "",
    ) -> bool:
        """Record a suppression; False when a live entry for scope and reason was there."""
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        address = normalize_address(address)
        now = int(self._clock())
        expires = 0 if ttl is None else now + max(1, int(ttl))
        value = f"{now}|{expires}|{source}"
        try:
            wrote = await self._add(
                keys=[self.key(address)], args=[f"{scope}|{reason}", value, now]
            )
            if wrote:
                await self._event("add", address, scope, reason, source, detail)
        except RedisError as exc:
            raise StoreUnavailable(f"suppression write failed: {type(exc).__name__}") from exc
        return bool(wrote)

    async def remove(
        self, address: str, scope: str | None = None, reason: str | None = None, source: str = ""
    ) -> list[Suppression]:
        """Delete matching entries (every one when scope and reason are None)."""
        address = normalize_address(address)
        entries = await self.entries(address)
        doomed = [
            e
            for e in entries
            if (scope is None or e.scope == scope) and (reason is None or e.reason == reason)
        ]
        if not doomed:
            return []
        try:
            await self._redis.hdel(self.key(address), *[f"{e.scope}|{e.reason}" for e in doomed])
            for e in doomed:
                await self._event("remove", address, e.scope, e.reason, source, "")
        except RedisError as exc:
            raise StoreUnavailable(f"suppression write failed: {type(exc).__name__}") from exc
        return doomed

    async def entries(self, address: str) -> list[Suppression]:
        """Every entry for one address, expired ones included (the caller decides)."""
        address = normalize_address(address)
        try:
            fields = cast(dict[bytes, bytes], await self._redis.hgetall(self.key(address)))
        except RedisError as exc:
            raise StoreUnavailable(f"suppression read failed: {type(exc).__name__}") from exc
        decoded = (_decode(address, f, v) for f, v in fields.items())
        return sorted((e for e in decoded if e is not None), key=lambda e: e.created)

    async def scan(self, batch: int = 500) -> AsyncIterator[Suppression]:
        """Every entry in the store, streamed (SCAN), never all loaded at once."""
        pattern = self.key("*").replace("{*}", "*")
        start = len(self.key(""))
        try:
            async for keys in _batched(self._redis.scan_iter(match=pattern, count=batch), batch):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.hgetall(key)
                    results = await pipe.execute()
                for key, fields in zip(keys, results, strict=True):
                    address = key.decode()[start - 1 : -1]
                    for field, value in fields.items():
                        entry = _decode(address, field, value)
                        if entry is not None:
                            yield entry
        except RedisError as exc:
            raise StoreUnavailable(f"suppression scan failed: {type(exc).__name__}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def _event(
        self, kind: str, address: str, scope: str, reason: str, source: str, detail: str
    ) -> None:
        await self._redis.xadd(
            self.events_key,
            {
                "type": kind,
                "address": address,
                "scope": scope,
                "reason": reason,
                "source": source,
                "detail": detail,
                "time": str(int(self._clock())),
            },
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )


async def _batched(items: AsyncIterator[bytes], size: int) -> AsyncIterator[list[bytes]]:
    chunk: list[bytes] = []
    async for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def scopes_for_unsubscribe(route_scope: str, group: str, sender: str | None) -> str:
    """Where a one-click unsubscribe is written, by the route's ``unsubscribe_scope``."""
    if route_scope == "all_marketing":
        return GLOBAL
    if route_scope == "sender" and sender:
        return sender_scope(sender)
    return group_scope(group)


def parse_scope(group: str | None, sender: str | None) -> str:
    """CLI flags → scope string."""
    if group and sender:
        raise ValueError("give --group or --sender, not both")
    if group:
        return group_scope(group)
    if sender:
        return sender_scope(sender)
    return GLOBAL


def describe_scope(scope: str) -> str:
    if scope == GLOBAL:
        return "global"
    kind, _, name = scope.partition(":")
    return {"g": "group", "s": "sender"}.get(kind, kind) + ":" + name


def live_only(entries: Iterable[Suppression], now: float) -> list[Suppression]:
    return [e for e in entries if e.live(now)]
