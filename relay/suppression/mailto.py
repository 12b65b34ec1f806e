"""Issuing and resolving mailto unsubscribe codes: the codec (``relay.mail.mailto``) and
its records in the store, so the pipeline and the intake share one implementation."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from relay.config import Config
from relay.mail.mailto import MailtoCodec
from relay.mail.tokens import MalformedToken, TokenClaims
from relay.model import UnsubscribeScope
from relay.store.client import RedisClient
from relay.store.keys import Keys
from relay.store.mailto import MailtoRecords


class MailtoCodes:
    def __init__(
        self,
        codec: MailtoCodec,
        records: MailtoRecords,
        ttl: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._codec = codec
        self._records = records
        self._ttl = ttl
        self._clock = clock

    @classmethod
    def from_config(
        cls, config: Config, redis: RedisClient, clock: Callable[[], float] = time.time
    ) -> MailtoCodes:
        """Codes live as long as the tokens they stand beside (``tokens.max_age_days``)."""
        records = MailtoRecords(redis, Keys(config.redis.key_prefix))
        ttl = config.tokens.max_age_days * 86400
        return cls(MailtoCodec(config.tokens), records, ttl, clock)

    async def issue(
        self,
        recipients: Sequence[str],
        group: str,
        scope: UnsubscribeScope,
        sender: str | None,
    ) -> dict[str, str]:
        """Each recipient's code, stored in one round trip (raises ``StoreUnavailable``)."""
        now = self._clock()
        codes: dict[str, str] = {}
        records: dict[str, bytes] = {}
        for rcpt in recipients:
            code, record = self._codec.issue(rcpt, group, scope, sender, now)
            codes[rcpt] = code
            records[code] = record
        await self._records.put(records, self._ttl)
        return codes

    async def resolve(self, code: str) -> TokenClaims:
        """What a code names (raises ``TokenError`` for an unknown, forged or revoked code)."""
        record = await self._records.get(code)
        if record is None:
            raise MalformedToken("mailto code not known (forged, altered or expired)")
        return self._codec.verify(code, record)
