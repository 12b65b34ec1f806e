"""Honouring an unsubscribe: verify the token, write the suppression, count and log it.

Shared by every channel (the one-click POST, the confirmation page, and mail to
the mailto address) so they behave the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from relay.config import PolicyConfig
from relay.eventlog import EventLog
from relay.mail.tokens import MalformedToken, TokenClaims, TokenCodec
from relay.metrics import Metrics
from relay.suppression.mailto import MailtoCodes
from relay.suppression.report import DailyCounters
from relay.suppression.store import SuppressionStore, scopes_for_unsubscribe

log = EventLog(__name__)


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    claims: TokenClaims
    list_name: str
    new: bool
    """False when the address was already unsubscribed (the request is idempotent)."""


class Unsubscriber:
    def __init__(
        self,
        tokens: TokenCodec,
        store: SuppressionStore,
        policy: PolicyConfig,
        metrics: Metrics,
        counters: DailyCounters,
        mailto: MailtoCodes | None = None,
    ) -> None:
        self._counters = counters
        self._mailto = mailto
        self._tokens = tokens
        self._store = store
        self._policy = policy
        self._metrics = metrics

    def inspect(self, token: str) -> TokenClaims:
        """Verify without changing anything (raises ``TokenError``)."""
        return self._tokens.verify(token)

    def list_name(self, claims: TokenClaims) -> str:
        group = self._policy.groups.get(claims.group)
        if claims.scope == "all_marketing":
            return "all our marketing mail"
        if claims.scope == "sender" and claims.sender:
            return f"mail from {claims.sender}"
        return group.display_name if group else claims.group

    async def unsubscribe(
        self, token: str, channel: str, user_agent: str = "", client: str = ""
    ) -> Unsubscribed:
        """Write the suppression; the time taken is the dashboard's click-to-suppression."""
        started = time.perf_counter()
        claims = self._tokens.verify(token)
        return await self._apply(claims, channel, started, user_agent, client)

    async def unsubscribe_code(self, code: str, channel: str) -> Unsubscribed:
        """The same for a mailto code (``relay.mail.mailto``); raises ``TokenError``."""
        started = time.perf_counter()
        if self._mailto is None:
            raise MalformedToken("mailto codes are not configured")
        claims = await self._mailto.resolve(code)
        return await self._apply(claims, channel, started)

    async def _apply(
        self,
        claims: TokenClaims,
        channel: str,
        started: float,
        user_agent: str = "",
        client: str = "",
    ) -> Unsubscribed:
        scope = scopes_for_unsubscribe(claims.scope, claims.group, claims.sender)
        detail = f"ua={user_agent[:120]!r} ip={self._tokens.fingerprint(client)}" if client else ""
        new = await self._store.add(
            claims.recipient, scope, "unsubscribe", source=channel, detail=detail
        )
        self._metrics.observe_unsubscribe(time.perf_counter() - started)
        self._metrics.unsubscribes.labels(claims.group, channel).inc()
        if new:
            self._counters.add("unsubscribe", claims.group)
        log.info(
            "unsubscribe",
            rcpt=claims.recipient,
            scope=scope,
            channel=channel,
            new=new,
            key=claims.key_id,
            issued=claims.issued,
            ua=user_agent[:120] if client else None,
            ip=self._tokens.fingerprint(client) if client else None,
        )
        return Unsubscribed(claims, self.list_name(claims), new)
