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

import fnmatch
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from relay.config import SuppressionConfig
from relay.errors import RelayError, StoreUnavailable
from relay.mail.address import normalize_address
from relay.model import Route
from relay.store.client import RedisClient, unavailable
from relay.store.keys import Keys

REASONS = ("unsubscribe", "hard-bounce", "soft-bounce", "complaint", "manual", "pattern")
MANUAL_REASONS = ("unsubscribe", "hard-bounce", "complaint", "manual")
"""Reasons an operator or an import may set (soft bounces and patterns have their own path)."""
HARD_REASONS = frozenset({"hard-bounce", "complaint", "manual"})
PROTECTED_REASONS = frozenset({"complaint"})
GLOBAL = "*"
EVENTS_MAXLEN = 1_000_000
DAY = 86400.0

# Sets the field unless a live entry is already there; answers 0 when it did not write,
# else the expired value it replaced, or 1 (the stats move that entry's count).
_ADD_SCRIPT = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local expires = tonumber(string.match(old, '^[^|]*|([^|]*)|'))
  if expires == 0 or expires > tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return old or 1
"""

# Counts a soft bounce and (re)writes the entry with the graduated expiry; returns the count.
_SOFT_SCRIPT = """
local n = redis.call('HINCRBY', KEYS[1], '#soft-bounces', 1)
local ttls = cjson.decode(ARGV[2])
local ttl = ttls[math.min(n, #ttls)]
local now = tonumber(ARGV[1])
local old = redis.call('HGET', KEYS[1], '*|soft-bounce')
local value = now .. '|' .. (now + ttl) .. '|' .. ARGV[3]
redis.call('HSET', KEYS[1], '*|soft-bounce', value)
return {n, old or '', value}
"""


# A final delivery failure of one kind: first decide whether a copy accepted since the
# last failure (#bounce-ok "<time>|<msg>") was sent before the failed one -- then the
# run of failures was broken and every streak restarts -- then count this one.
# ARGV: counter field, sent time of the failed copy ('' if unknown), its message id.
_FAILURE_SCRIPT = """
local ok = redis.call('HGET', KEYS[1], '#bounce-ok')
if ok and ARGV[2] ~= '' then
  local t, msg = string.match(ok, '^(%d+)|(.*)$')
  t = tonumber(t)
  local sent = tonumber(ARGV[2])
  if t and (t < sent or (t == sent and msg ~= ARGV[3])) then
    redis.call('HDEL', KEYS[1], '#bounce-ok', STREAKS)
  elseif t == sent then
    redis.call('HDEL', KEYS[1], '#bounce-ok')
  end
end
return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
"""
STREAK_FIELDS = ("#bounce-hard", "#bounce-soft", "#bounce-unknown", "#bounce-policy")
"""Failures in a row per kind, kept as counters beside the entries of the address."""
OK_FIELD = "#bounce-ok"
CONFIRMED_AFTER = 7 * 86400
"""A copy accepted this long ago with no failure since: the streak is over (longer than
the usual 5-day queue lifetime, so a late bounce for that copy has arrived by then)."""
_FAILURE_SCRIPT = _FAILURE_SCRIPT.replace("STREAKS", ", ".join(f"'{f}'" for f in STREAK_FIELDS))


@dataclass(frozen=True, slots=True)
class Streak:
    """A recipient with failures counted and no success known since."""

    ok_since: int | None
    """When the first copy accepted after the last failure was relayed (None: none yet)."""


@dataclass(frozen=True, slots=True)
class Lookup:
    blocked: dict[str, Suppression]
    streaks: dict[str, Streak]
    """Recipients (not blocked) with an open failure streak, as given."""


class _Default:
    """Marker: use the policy's expiry for the reason."""


DEFAULT = _Default()


class ProtectedEntry(RelayError):
    """A complaint entry may only be removed with ``force``; the removal is logged."""


@dataclass(frozen=True, slots=True)
class SuppressionPolicy:
    """Expiry per reason (seconds, None for never) and the pattern list from the YAML."""

    hard_bounce_ttl: float | None = 180 * DAY
    soft_bounce_ttls: tuple[float, ...] = (7 * DAY, 14 * DAY, 30 * DAY, 180 * DAY)
    manual_ttl: float | None = None
    unsubscribe_ttl: float | None = None
    patterns: tuple[str, ...] = ()
    patterns_block_transactional: bool = False

    @classmethod
    def from_config(cls, config: SuppressionConfig) -> SuppressionPolicy:
        def seconds(days: float | None) -> float | None:
            return None if days is None else days * DAY

        return cls(
            hard_bounce_ttl=seconds(config.hard_bounce_days),
            soft_bounce_ttls=tuple(d * DAY for d in config.soft_bounce_days),
            manual_ttl=seconds(config.manual_days),
            unsubscribe_ttl=seconds(config.unsubscribe_days),
            patterns=config.patterns,
            patterns_block_transactional=config.patterns_block_transactional,
        )

    def default_ttl(self, reason: str) -> float | None:
        if reason == "hard-bounce":
            return self.hard_bounce_ttl
        if reason == "manual":
            return self.manual_ttl
        if reason == "soft-bounce":
            return self.soft_bounce_ttls[0]
        if reason == "unsubscribe":
            return self.unsubscribe_ttl
        return None  # complaints never expire


def group_scope(group: str) -> str:
    return f"g:{group}"


def sender_scope(sender: str) -> str:
    return f"s:{normalize_address(sender)}"


def normalize_pattern(pattern: str) -> str:
    """``mailinator.com`` and ``@mailinator.com`` mean ``*@mailinator.com``."""
    text = pattern.strip().lower()
    if "@" not in text:
        return f"*@{text}"
    if text.startswith("@"):
        return f"*{text}"
    return text


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


_STREAK_KEYS = tuple(f.encode() for f in STREAK_FIELDS)
_OK_KEY = OK_FIELD.encode()


def _ok_time(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.split(b"|", 1)[0])
    except ValueError:
        return None


def _decode(address: str, field: bytes, value: bytes) -> Suppression | None:
    """One hash field as an entry; counters (``#…``) and damaged fields give None."""
    if field.startswith(b"#"):
        return None
    try:
        scope, _, reason = field.decode().rpartition("|")
        created, expires, source = value.decode().split("|", 2)
        return Suppression(address, scope, reason, int(created), int(expires), source)
    except (UnicodeDecodeError, ValueError):
        return None


class _Patterns:
    """Compiled patterns, rebuilt only when the set of patterns changes."""

    def __init__(self) -> None:
        self._source: frozenset[str] = frozenset()
        self._compiled: list[tuple[str, re.Pattern[str]]] = []

    def match(self, patterns: frozenset[str], address: str) -> str | None:
        if patterns != self._source:
            self._compiled = [(p, re.compile(fnmatch.translate(p))) for p in sorted(patterns)]
            self._source = patterns
        for pattern, regex in self._compiled:
            if regex.match(address):
                return pattern
        return None


@dataclass(frozen=True, slots=True)
class ImportRow:
    line: int
    address: str
    scope: str
    reason: str


PATTERNS_REFRESH = 2.0
"""Seconds a lookup reuses the stored pattern set: one Redis command per 1-recipient
message instead of two; a pattern added or removed elsewhere applies within this time."""


class SuppressionStore:
    def __init__(
        self,
        redis: RedisClient,
        prefix: str = "ocr",
        clock: Callable[[], float] = time.time,
        policy: SuppressionPolicy | None = None,
        patterns_refresh: float = PATTERNS_REFRESH,
    ) -> None:
        """``patterns_refresh``: seconds a lookup reuses the stored pattern set it read."""
        self._redis = redis
        self._prefix = prefix
        self._keys = Keys(prefix)
        self._clock = clock
        self._matcher = _Patterns()
        self._patterns_refresh = patterns_refresh
        self._stored_patterns: frozenset[str] | None = None
        self._patterns_read = 0.0  # time.monotonic() of the last read
        self.set_policy(policy or SuppressionPolicy())
        self._add = redis.register_script(_ADD_SCRIPT)
        self._soft = redis.register_script(_SOFT_SCRIPT)
        self._failure = redis.register_script(_FAILURE_SCRIPT)

    def now(self) -> float:
        """The store's clock (injectable, so expiry is tested at its exact boundary)."""
        return self._clock()

    def set_policy(self, policy: SuppressionPolicy) -> None:
        """Expiry and patterns from the config (again on reload)."""
        self.policy = policy
        self._config_patterns = frozenset(normalize_pattern(p) for p in policy.patterns)

    def key(self, address: str) -> str:
        """The one place the per-address key is spelled."""
        return f"{self._prefix}:sup:{{{address}}}"

    @property
    def events_key(self) -> str:
        return f"{self._prefix}:events"

    @property
    def patterns_key(self) -> str:
        return f"{self._prefix}:patterns"

    async def blocked(self, recipients: Sequence[str], route: Route) -> dict[str, Suppression]:
        """Which recipients this route must not send to, with the entry that blocks each."""
        return (await self.lookup(recipients, route)).blocked

    async def lookup(self, recipients: Sequence[str], route: Route) -> Lookup:
        """Who is blocked, and who has an open failure streak (a success may end it).

        One round trip: a pipeline for all recipients, with the stored pattern set when
        it is older than ``patterns_refresh``; a lone HGETALL for one recipient otherwise.
        """
        normalized = [normalize_address(r) for r in recipients]
        stored = self._stored_patterns
        refresh = stored is None or time.monotonic() - self._patterns_read >= self._patterns_refresh
        results: list[Any]
        with unavailable("suppression lookup"):
            if len(normalized) == 1 and not refresh:  # most messages: one command, no pipeline
                results = [await self._redis.hgetall(self.key(normalized[0]))]
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for address in normalized:
                        pipe.hgetall(self.key(address))
                    if refresh:
                        pipe.smembers(self.patterns_key)
                    results = await pipe.execute()
        if refresh or stored is None:
            stored = self._stored_patterns = frozenset(p.decode() for p in results.pop())
            self._patterns_read = time.monotonic()
        now = self._clock()
        patterns = self._config_patterns | stored
        check_patterns = bool(patterns) and (
            route.is_marketing or self.policy.patterns_block_transactional
        )
        blocked: dict[str, Suppression] = {}
        streaks: dict[str, Streak] = {}
        for recipient, address, fields in zip(recipients, normalized, results, strict=True):
            for field, value in fields.items():
                entry = _decode(address, field, value)
                if entry is not None and entry.live(now) and entry.blocks(route):
                    blocked[recipient] = entry
                    break
            else:
                if check_patterns:
                    pattern = self._matcher.match(patterns, address)
                    if pattern is not None:
                        blocked[recipient] = Suppression(address, GLOBAL, "pattern", 0, 0, pattern)
                        continue
                if any(f in fields for f in _STREAK_KEYS):
                    streaks[recipient] = Streak(_ok_time(fields.get(_OK_KEY)))
        return Lookup(blocked, streaks)

    def _ttl(self, reason: str, ttl: float | _Default | None) -> float | None:
        return self.policy.default_ttl(reason) if isinstance(ttl, _Default) else ttl

    async def add(
        self,
        address: str,
        scope: str,
        reason: str,
        source: str,
        ttl: float | _Default | None = DEFAULT,
        detail: str = "",
    ) -> bool:
        """Record a suppression; False when a live entry for scope and reason was there.

        ``ttl`` defaults to the policy's expiry for the reason (``None``: never).
        """
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        if reason == "soft-bounce":
            await self.record_soft_bounce(address, source, detail)
            return True
        address = normalize_address(address)
        now = int(self._clock())
        value = self._value(now, self._ttl(reason, ttl), source)
        with unavailable("suppression write"):
            wrote = await self._add(
                keys=[self.key(address)], args=[f"{scope}|{reason}", value, now]
            )
            if wrote:
                async with self._redis.pipeline(transaction=False) as pipe:
                    self._queue_event(pipe, "add", address, scope, reason, source, detail)
                    self._count_write(pipe, scope, reason, value, wrote)
                    await pipe.execute()
        return bool(wrote)

    @staticmethod
    def _value(now: int, ttl: float | None, source: str) -> str:
        expires = 0 if ttl is None else now + max(1, int(ttl))
        return f"{now}|{expires}|{source.replace('|', '/')}"

    async def add_many(
        self, rows: Sequence[ImportRow], source: str, ttl: float | _Default | None = DEFAULT
    ) -> list[bool]:
        """Batched ``add`` for imports: one pipeline for the writes, one for the events."""
        now = int(self._clock())
        with unavailable("suppression import"):
            values = [self._value(now, self._ttl(row.reason, ttl), source) for row in rows]
            async with self._redis.pipeline(transaction=False) as pipe:
                for row, value in zip(rows, values, strict=True):
                    # EVAL, not the registered script: a Cluster pipeline refuses EVALSHA
                    field = f"{row.scope}|{row.reason}"
                    pipe.eval(_ADD_SCRIPT, 1, self.key(row.address), field, value, now)
                results = await pipe.execute()
            async with self._redis.pipeline(transaction=False) as pipe:
                for row, value, result in zip(rows, values, results, strict=True):
                    if result:
                        self._queue_event(
                            pipe, "add", row.address, row.scope, row.reason, source, ""
                        )
                        self._count_write(pipe, row.scope, row.reason, value, result)
                await pipe.execute()
        return [bool(r) for r in results]

    async def exists(self, rows: Sequence[ImportRow]) -> list[bool]:
        """Whether a live entry for each row's scope and reason is already stored."""
        with unavailable("suppression read"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for row in rows:
                    pipe.hget(self.key(row.address), f"{row.scope}|{row.reason}")
                values = await pipe.execute()
        now = self._clock()
        return [
            v is not None
            and (e := _decode(r.address, f"{r.scope}|{r.reason}".encode(), v)) is not None
            and e.live(now)
            for r, v in zip(rows, values, strict=True)
        ]

    async def record_soft_bounce(self, address: str, source: str, detail: str = "") -> int:
        """A soft-bounce suppression with graduated expiry (7, 14, 30, then 180 days)."""
        address = normalize_address(address)
        ttls = json.dumps([int(t) for t in self.policy.soft_bounce_ttls])
        with unavailable("suppression write"):
            raw_count, old, value = await self._soft(
                keys=[self.key(address)],
                args=[int(self._clock()), ttls, source.replace("|", "/")],
            )
            count = int(raw_count)
            async with self._redis.pipeline(transaction=False) as pipe:
                self._queue_event(
                    pipe, "add", address, GLOBAL, "soft-bounce", source, f"count={count} {detail}"
                )
                self._count_write(pipe, GLOBAL, "soft-bounce", value.decode(), old or 1)
                await pipe.execute()
        return count

    async def counter(self, address: str, name: str, delta: int = 1) -> int:
        """A per-address counter kept beside the entries (e.g. consecutive soft bounces)."""
        with unavailable("suppression write"):
            if delta == 0:
                await self._redis.hdel(self.key(normalize_address(address)), f"#{name}")
                return 0
            return int(
                await self._redis.hincrby(self.key(normalize_address(address)), f"#{name}", delta)
            )

    async def record_failure(
        self, address: str, kind: str, sent: float | None = None, message: str = ""
    ) -> int:
        """Count a final delivery failure of ``kind``; answers the failures of it in a row.

        ``sent`` and ``message`` name the failed copy: when a copy relayed before it
        was accepted and did not fail, the earlier streak is over and counting restarts.
        """
        field = f"#bounce-{kind}"
        if field not in STREAK_FIELDS:
            raise ValueError(f"unknown failure kind {kind!r}")
        sent_arg = "" if sent is None else str(int(sent))
        with unavailable("suppression write"):
            return int(
                await self._failure(
                    keys=[self.key(normalize_address(address))], args=[field, sent_arg, message]
                )
            )

    async def reset_streak(self, address: str, kind: str) -> None:
        """Start counting ``kind`` afresh (after the address was suppressed for it)."""
        await self.counter(address, f"bounce-{kind}", 0)

    async def end_streak(self, address: str) -> None:
        """A delivery is confirmed (a success DSN): every failure streak is over."""
        with unavailable("suppression write"):
            await self._redis.hdel(self.key(normalize_address(address)), OK_FIELD, *STREAK_FIELDS)

    async def note_delivered(self, streaks: dict[str, Streak], message: str) -> None:
        """Accepted copies for recipients with an open streak: one pipelined write, if any.

        The first acceptance is remembered (``HSETNX``); it ends the streak when the
        next failure is for a later copy, or on its own after ``CONFIRMED_AFTER``.
        """
        if not streaks:
            return
        now = int(self._clock())
        with unavailable("suppression write"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for recipient, streak in streaks.items():
                    key = self.key(normalize_address(recipient))
                    if streak.ok_since is None:
                        pipe.hsetnx(key, OK_FIELD, f"{now}|{message}")
                    elif now - streak.ok_since > CONFIRMED_AFTER:
                        pipe.hdel(key, OK_FIELD, *STREAK_FIELDS)
                await pipe.execute()

    async def remove(
        self,
        address: str,
        scope: str | None = None,
        reason: str | None = None,
        source: str = "",
        *,
        force: bool = False,
    ) -> list[Suppression]:
        """Delete matching entries (every one when scope and reason are None).

        Complaint entries are protected: without ``force`` nothing is removed and
        ``ProtectedEntry`` is raised; a forced removal is recorded as such.
        """
        address = normalize_address(address)
        entries = await self.entries(address)
        doomed = [
            e
            for e in entries
            if (scope is None or e.scope == scope) and (reason is None or e.reason == reason)
        ]
        protected = [e for e in doomed if e.reason in PROTECTED_REASONS]
        if protected and not force:
            raise ProtectedEntry(
                f"{address} has a {protected[0].reason} entry; removing it needs force"
            )
        if not doomed:
            return []
        with unavailable("suppression write"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hdel(self.key(address), *[f"{e.scope}|{e.reason}" for e in doomed])
                if any(e.reason == "soft-bounce" for e in doomed):
                    pipe.hdel(self.key(address), "#soft-bounces")
                if any(e.reason in ("hard-bounce", "soft-bounce") for e in doomed):
                    pipe.hdel(self.key(address), OK_FIELD, *STREAK_FIELDS)
                for e in doomed:
                    detail = "forced" if e.reason in PROTECTED_REASONS else ""
                    self._queue_event(pipe, "remove", address, e.scope, e.reason, source, detail)
                    pipe.hincrby(self._keys.stats, stats_field(e.scope, e.reason, e.expires), -1)
                await pipe.execute()
        return doomed

    async def entries(self, address: str) -> list[Suppression]:
        """Every entry for one address, expired ones included (the caller decides)."""
        address = normalize_address(address)
        with unavailable("suppression read"):
            fields = cast(dict[bytes, bytes], await self._redis.hgetall(self.key(address)))
        decoded = (_decode(address, f, v) for f, v in fields.items())
        return sorted((e for e in decoded if e is not None), key=lambda e: e.created)

    async def pattern_match(self, address: str) -> str | None:
        """The configured or stored pattern that matches ``address``, if any."""
        patterns = self._config_patterns | set(await self.patterns())
        return self._matcher.match(frozenset(patterns), normalize_address(address))

    async def patterns(self) -> list[str]:
        with unavailable("pattern read"):
            members = cast(set[bytes], await self._redis.smembers(self.patterns_key))
        return sorted(m.decode() for m in members)

    async def add_pattern(self, pattern: str, source: str) -> bool:
        pattern = normalize_pattern(pattern)
        with unavailable("pattern write"):
            new = bool(await self._redis.sadd(self.patterns_key, pattern))
            self._stored_patterns = None  # this process sees its own change at once
            if new:
                await self._event("add", pattern, GLOBAL, "pattern", source, "")
        return new

    async def remove_pattern(self, pattern: str, source: str) -> bool:
        pattern = normalize_pattern(pattern)
        with unavailable("pattern write"):
            gone = bool(await self._redis.srem(self.patterns_key, pattern))
            self._stored_patterns = None
            if gone:
                await self._event("remove", pattern, GLOBAL, "pattern", source, "")
        return gone

    async def scan(self, batch: int = 500) -> AsyncIterator[Suppression]:
        """Every entry in the store, streamed (SCAN), never all loaded at once."""
        pattern = self.key("*").replace("{*}", "*")
        start = len(self.key(""))
        with unavailable("suppression scan failed"):
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

    async def ping(self) -> bool:
        try:
            with unavailable("ping"):
                return bool(await self._redis.ping())
        except StoreUnavailable:
            return False

    def _queue_event(
        self,
        pipe: Any,
        kind: str,
        address: str,
        scope: str,
        reason: str,
        source: str,
        detail: str,
    ) -> None:
        pipe.xadd(
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

    def _count_write(self, pipe: Any, scope: str, reason: str, value: str, result: object) -> None:
        """Move the stats for a written entry; ``result``: what the add script answered."""
        created, expires = (int(v) for v in value.split("|", 2)[:2])
        pipe.hincrby(self._keys.stats, stats_field(scope, reason, expires), 1)
        if isinstance(result, bytes) and result:  # an expired entry was replaced
            old = result.decode().split("|", 2)
            if len(old) == 3 and old[1].isdigit():
                pipe.hincrby(self._keys.stats, stats_field(scope, reason, int(old[1])), -1)
        if reason == "unsubscribe":
            pipe.hincrby(self._keys.stats_unsubscribe_days, _day(created), 1)

    async def counts(self) -> Counts:
        """Live entries per scope kind and reason, from the counts kept as entries change.

        O(1) in the size of the list: one HGETALL of at most a few thousand fields
        (one per scope kind, reason and expiry day). An entry is counted until the end
        of its expiry day (UTC); buckets of past days are dropped here.
        """
        today = _day(self._clock())
        with unavailable("suppression stats"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._keys.stats)
                pipe.hgetall(self._keys.stats_unsubscribe_days)
                pipe.scard(self.patterns_key)
                fields, days, patterns = await pipe.execute()
            live: Counter[tuple[str, str]] = Counter()
            past: list[bytes] = []
            meta: dict[str, str] = {}
            for raw, raw_count in cast(dict[bytes, bytes], fields).items():
                name = raw.decode()
                if name.startswith("#"):
                    meta[name] = raw_count.decode()
                    continue
                kind, reason, day = name.split("|")
                if day != NEVER and day < today:
                    past.append(raw)
                    continue
                live[(kind, reason)] += int(raw_count)
            if past:
                await self._redis.hdel(self._keys.stats, *past)
        return Counts(
            by_scope_reason=+live,
            unsubscribes_per_day={
                k.decode(): int(v) for k, v in cast(dict[bytes, bytes], days).items()
            },
            patterns=int(patterns) + len(self.policy.patterns),
            addresses=int(meta["#addresses"]) if "#addresses" in meta else None,
            reconciled=float(meta["#reconciled"]) if "#reconciled" in meta else None,
        )

    async def reconcile(self, batch: int = 500) -> Counts:
        """Recount every entry with a full scan and replace the kept counts.

        The counts drift only where a write and its count were cut apart (a crash, a
        Redis failover between the two): run this rarely, e.g. daily
        (``oneclick-relay suppress stats --reconcile``).
        """
        buckets: Counter[str] = Counter()
        days: Counter[str] = Counter()
        addresses: set[str] = set()
        now = self._clock()
        async for entry in self.scan(batch):
            buckets[stats_field(entry.scope, entry.reason, entry.expires)] += 1
            if entry.live(now):
                addresses.add(entry.address)
            if entry.reason == "unsubscribe":
                days[_day(entry.created)] += 1
        mapping: dict[str, str | int] = dict(buckets)
        mapping["#addresses"] = len(addresses)
        mapping["#reconciled"] = int(self._clock())
        with unavailable("suppression stats"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._keys.stats, self._keys.stats_unsubscribe_days)
                pipe.hset(self._keys.stats, mapping=cast(Any, mapping))
                if days:
                    pipe.hset(self._keys.stats_unsubscribe_days, mapping=cast(Any, dict(days)))
                await pipe.execute()
        return await self.counts()

    async def _event(
        self, kind: str, address: str, scope: str, reason: str, source: str, detail: str
    ) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            self._queue_event(pipe, kind, address, scope, reason, source, detail)
            await pipe.execute()


NEVER = "-"


def _day(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).date().isoformat()


def stats_field(scope: str, reason: str, expires: int) -> str:
    """The kept count an entry is in: scope kind, reason and its expiry day (UTC)."""
    return f"{describe_scope(scope).split(':')[0]}|{reason}|{_day(expires) if expires else NEVER}"


@dataclass(frozen=True, slots=True)
class Counts:
    by_scope_reason: Counter[tuple[str, str]]
    unsubscribes_per_day: dict[str, int]
    """New unsubscribes recorded per day (UTC)."""
    patterns: int
    addresses: int | None
    """Distinct addresses with a live entry, as of the last reconcile (None: never run)."""
    reconciled: float | None


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
