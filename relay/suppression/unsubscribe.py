"""Honouring an unsubscribe: verify the token, write the suppression, count and log it.

Shared by every channel (the one-click POST, the confirmation page, and mail to
the mailto address) so they behave the same. The request is answered only once it
is durable: in Redis or, while Redis is unreachable, in the local journal
(``relay.store.journal``), which ``JournalReplayer`` drains into Redis when it is
back. ``StoreUnavailable`` reaches the caller only when neither could take it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from relay.config import PolicyConfig
from relay.errors import StoreUnavailable
from relay.eventlog import EventLog
from relay.mail.tokens import MalformedToken, TokenClaims, TokenCodec
from relay.metrics import Metrics
from relay.store.journal import Journal, JournalError, Record
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
    journaled: bool = False
    """True when Redis was unreachable and the request waits in the local journal."""


class Unsubscriber:
    def __init__(
        self,
        tokens: TokenCodec,
        store: SuppressionStore,
        policy: PolicyConfig,
        metrics: Metrics,
        counters: DailyCounters,
        *,
        journal: Journal | None = None,
        mailto: MailtoCodes | None = None,
    ) -> None:
        """``journal``: where a request goes while Redis is unreachable (None: nowhere)."""
        self._journal = journal
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
        journaled = False
        try:
            new = await self._store.add(
                claims.recipient, scope, "unsubscribe", source=channel, detail=detail
            )
        except StoreUnavailable as exc:
            record = {
                "id": uuid.uuid4().hex,
                "time": time.time(),
                "address": claims.recipient,
                "scope": scope,
                "group": claims.group,
                "source": channel,
                "detail": detail,
            }
            await self._write_journal(record, exc)
            new = journaled = True
        self._metrics.observe_unsubscribe(time.perf_counter() - started)
        self._metrics.unsubscribes.labels(claims.group, channel).inc()
        if new and not journaled:
            self._counters.add("unsubscribe", claims.group)
        log.info(
            "unsubscribe",
            rcpt=claims.recipient,
            scope=scope,
            channel=channel,
            new=new,
            journaled=journaled,
            key=claims.key_id,
            issued=claims.issued,
            ua=user_agent[:120] if client else None,
            ip=self._tokens.fingerprint(client) if client else None,
        )
        return Unsubscribed(claims, self.list_name(claims), new, journaled)

    async def _write_journal(self, record: Record, cause: StoreUnavailable) -> None:
        if self._journal is None:
            raise cause
        try:
            await asyncio.to_thread(self._journal.append, record)
        except JournalError as exc:
            self._metrics.journal.labels("write-failed").inc()
            log.error("unsubscribe not kept", redis=str(cause), journal=str(exc))
            raise StoreUnavailable(f"{cause}; journal: {exc}") from exc
        self._metrics.journal.labels("written").inc()
        log.warning(
            "unsubscribe journaled",
            id=record["id"],
            rcpt=record["address"],
            scope=record["scope"],
            redis=str(cause),
        )


class JournalReplayer:
    """Drains the local journal into Redis: at start, then whenever there is something.

    Each record becomes the same ``SuppressionStore.add`` the request would have
    made; adding a suppression that is there already changes nothing, so a replay
    cut short (Redis lost again, the process killed) is simply done again.
    """

    def __init__(
        self,
        journal: Journal,
        store: SuppressionStore,
        metrics: Metrics,
        counters: DailyCounters,
        interval: float = 1.0,
    ) -> None:
        self._journal = journal
        self._store = store
        self._metrics = metrics
        self._counters = counters
        self._interval = interval
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        while not self._stopped.is_set():
            try:
                await self.replay_once()
            except StoreUnavailable as exc:
                log.info("journal replay waits for redis", error=str(exc))
            except OSError as exc:
                log.error("journal replay failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self._interval)

    async def pending(self) -> int:
        return await asyncio.to_thread(self._journal.pending)

    async def replay_once(self) -> int:
        """Replay every journal file; answers how many records went into Redis."""
        files = await asyncio.to_thread(self._journal.take)
        replayed = 0
        for path in files:
            replayed += await self._replay_file(path)
        return replayed

    async def _replay_file(self, path: Path) -> int:
        with self._journal.claim(path) as records:
            if records is None:
                return 0
            replayed = 0
            for record in records:
                new = await self._store.add(
                    str(record["address"]),
                    str(record["scope"]),
                    "unsubscribe",
                    source=str(record.get("source", "journal")),
                    detail=f"journaled={record.get('id', '-')} {record.get('detail', '')}".rstrip(),
                )
                if new:
                    self._counters.add("unsubscribe", str(record.get("group", "")) or None)
                self._metrics.journal.labels("replayed").inc()
                replayed += 1
                log.info(
                    "unsubscribe replayed",
                    id=record.get("id", "-"),
                    rcpt=record["address"],
                    scope=record["scope"],
                    new=new,
                    delay=round(time.time() - float(record.get("time", time.time()))),
                )
            self._journal.finish(path)
        log.info("journal replayed", file=path.name, records=replayed)
        return replayed
