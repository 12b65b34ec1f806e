"""Every Redis key the relay writes, named in one place.

All keys start with ``redis.key_prefix``. Per-address and per-message keys carry
their address or id as a Cluster hash tag (``{…}``); the retry queue's keys share
the tag ``{queue}`` so its Lua scripts touch one slot::

    {prefix}:sup:{<address>}          HASH    one field per scope and reason
    {prefix}:patterns                 SET     suppression patterns
    {prefix}:events                   STREAM  one entry per suppression change
    {prefix}:{queue}:up:<upstream>    ZSET    retry item id -> due time (or lease end)
    {prefix}:{queue}:upstreams        SET     the upstreams with a partition
    {prefix}:{queue}                  ZSET    retry items from before partitions
    {prefix}:{queue}:item:<id>        HASH    one deferred copy (and its upstream)
    {prefix}:inbound                  ZSET    inbound message id -> received time
    {prefix}:inbound:{<id>}           HASH    one inbound message, kept bounces.keep_days
    {prefix}:inbound:bytes            HASH    day -> bytes of full audit copies stored that day
    {prefix}:daily:<YYYY-MM-DD>       HASH    the day's counters, per metric and group
    {prefix}:{stats}                  HASH    live suppression entries per scope kind, reason
                                              and expiry day, kept as entries change
    {prefix}:{stats}:unsubscribe-days HASH    new unsubscribes per day (same slot: reconciled
                                              together in one MULTI)
    {prefix}:seen:<namespace>:<hash>  STRING  an id acted on once (webhook events), expiring
    {prefix}:mailto:{<code>}          STRING  what a mailto unsubscribe code names
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    def suppression(self, address: str) -> str:
        return f"{self.prefix}:sup:{{{address}}}"

    @property
    def suppression_match(self) -> str:
        """The SCAN pattern over every address's suppression hash."""
        return f"{self.prefix}:sup:*"

    @property
    def patterns(self) -> str:
        return f"{self.prefix}:patterns"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def retry_queue(self) -> str:
        return f"{self.prefix}:{{queue}}"

    def retry_item(self, item_id: str) -> str:
        return f"{self.retry_queue}:item:{item_id}"

    @property
    def inbound_index(self) -> str:
        return f"{self.prefix}:inbound"

    @property
    def inbound_bytes(self) -> str:
        return f"{self.prefix}:inbound:bytes"

    def inbound(self, inbound_id: str) -> str:
        return f"{self.prefix}:inbound:{{{inbound_id}}}"

    def daily(self, day: str) -> str:
        return f"{self.prefix}:daily:{day}"

    def seen(self, namespace: str, digest: str) -> str:
        return f"{self.prefix}:seen:{namespace}:{digest}"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:{{stats}}"

    @property
    def stats_unsubscribe_days(self) -> str:
        return f"{self.prefix}:{{stats}}:unsubscribe-days"

    def mailto(self, code: str) -> str:
        return f"{self.prefix}:mailto:{{{code}}}"
