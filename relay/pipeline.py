"""The steps for one message, in order: check → modify → sign → deliver.

::

    parse header block ─ From ─ classify ─ suppression lookup      (once per message)
        ─ Received / Date / Message-ID, strip the application's List-* (once)
        ─ body hash                                                 (once)
        ─ per copy: token → List-Unsubscribe headers → DKIM sign    (marketing: per recipient)
        ─ deliver over the pool ─ one reply for the client

Signing is always the last change to a copy. The client gets ``250`` only when
the upstream accepted (or, after a partial success, when the deferred copies are
safely in the Redis retry queue); otherwise a 4xx it can retry or the upstream's
5xx. Every outcome is one log line and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from relay import headers
from relay.config import Config
from relay.errors import SmtpError, SmtpReply, StoreUnavailable, TempFail
from relay.message import Header, Message, from_address
from relay.metrics import Metrics
from relay.model import Envelope, Route, domain_of
from relay.policy import Policy
from relay.report import DailyCounters
from relay.retryqueue import RetryQueue
from relay.signing import DkimKey, Signer, body_hash
from relay.suppression import Suppression, SuppressionStore
from relay.tokens import TokenCodec
from relay.upstream import Outbound, Upstream

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Copy:
    recipients: tuple[str, ...]
    data: bytes


@dataclass(slots=True)
class Trace:
    """What the per-message log line says."""

    queue_id: str
    message_id: str = "-"
    sender: str = "-"
    route: Route | None = None
    kept: int = 0
    suppressed: int = 0
    signed: str = "-"
    replies: dict[str, SmtpReply] = field(default_factory=dict)
    queued: int = 0


class Pipeline:
    def __init__(
        self,
        *,
        config: Config,
        policy: Policy,
        store: SuppressionStore,
        tokens: TokenCodec,
        signer: Signer,
        upstream: Upstream,
        retry: RetryQueue,
        metrics: Metrics,
        counters: DailyCounters,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._policy = policy
        self._store = store
        self._tokens = tokens
        self._signer = signer
        self._upstream = upstream
        self._retry = retry
        self._metrics = metrics
        self._counters = counters
        self._clock = clock

    async def handle(self, envelope: Envelope) -> SmtpReply:
        started = time.perf_counter()
        trace = Trace(queue_id=uuid.uuid4().hex[:12].upper())
        try:
            reply = await self._run(envelope, trace)
        except SmtpError as exc:
            reply = exc.reply
        self._record(envelope, trace, reply, (time.perf_counter() - started) * 1000)
        return reply

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._metrics.stage.labels(name).observe(time.perf_counter() - started)

    async def _run(self, envelope: Envelope, trace: Trace) -> SmtpReply:
        with self._stage("parse"):
            message = Message.parse(envelope.data)
            sender = from_address(message)
            trace.sender = sender
            route = self._policy.classify(sender)
            trace.route = route

        with self._stage("suppression"):
            blocked = await self._blocked(envelope.rcpt_tos, route)
        kept = tuple(r for r in envelope.rcpt_tos if r not in blocked)
        trace.kept, trace.suppressed = len(kept), len(blocked)
        for rcpt, entry in blocked.items():
            self._metrics.dropped.labels(entry.reason).inc()
            log.info(
                "suppressed id=%s rcpt=%s scope=%s reason=%s",
                trace.queue_id,
                rcpt,
                entry.scope,
                entry.reason,
            )
        if not kept:
            return SmtpReply(
                250,
                "2.0.0",
                f"Ok: nothing sent, all {len(blocked)} recipient(s) suppressed id={trace.queue_id}",
            )

        with self._stage("modify"):
            base = self._modify(message, envelope, route, trace.queue_id)
            ids = base.get_all("Message-ID")
            trace.message_id = ids[0].value if ids else "-"
            keys = self._signer.keys_for(domain_of(sender))
            if not keys:
                self._metrics.unsigned.labels(route.message_class).inc()
                if route.is_marketing and self._config.dkim.require_for_marketing:
                    raise TempFail(
                        "4.7.5", f"no DKIM key for {domain_of(sender)}; marketing mail not sent"
                    )
            trace.signed = ",".join(f"{k.selector}/{k.algorithm}" for k in keys) or "unsigned"
            bh = body_hash(base.body) if keys else b""
            copies = self._copies(base, kept, route, keys, bh)

        with self._stage("upstream"):
            trace.replies, deferred = await self._deliver(envelope.mail_from, copies, len(kept))
        return await self._answer(envelope, deferred, trace)

    async def _blocked(self, rcpts: tuple[str, ...], route: Route) -> dict[str, Suppression]:
        try:
            return await self._store.blocked(rcpts, route)
        except StoreUnavailable as exc:
            action = self._config.redis.on_error.for_class(route.message_class)
            self._metrics.redis_errors.labels(action).inc()
            log.warning("suppression lookup failed error=%s action=%s", exc, action)
            if action == "tempfail":
                raise TempFail("4.3.0", "suppression list unavailable, try again later") from None
            return {}

    def _modify(self, message: Message, envelope: Envelope, route: Route, queue_id: str) -> Message:
        """Changes shared by every copy: trace, missing defaults, no stale List-* fields."""
        hostname = self._config.smtp.hostname
        now = self._clock()
        remove: tuple[str, ...] = ()
        if route.is_marketing:
            remove = (
                (*headers.LIST_HEADERS, "list-id") if not self._keeps_app(message, route) else ()
            )
        return message.replace(
            remove=remove,
            prepend=[headers.received(envelope.helo, envelope.client, hostname, queue_id, now)],
            append=headers.missing_defaults(message, hostname, now),
        )

    @staticmethod
    def _keeps_app(message: Message, route: Route) -> bool:
        return route.keep_app_unsubscribe and headers.app_https_unsubscribe(message) is not None

    def _copies(
        self,
        base: Message,
        rcpts: tuple[str, ...],
        route: Route,
        keys: list[DkimKey],
        bh: bytes,
    ) -> Iterator[_Copy]:
        """The signed copies to send, built one at a time as the delivery workers ask."""
        if not route.is_marketing:
            yield _Copy(rcpts, self._sign(base, keys, bh))
            return
        if self._keeps_app(base, route):
            fixed = base.replace(
                remove=("list-unsubscribe-post",),
                append=[Header.build("List-Unsubscribe-Post", headers.ONE_CLICK)],
            )
            yield _Copy(rcpts, self._sign(fixed, keys, bh))
            return
        group_name = route.group or self._policy.config.default_group
        group = self._policy.config.groups.get(group_name)
        public_url = self._config.http.public_url
        sender = route.sender if route.unsubscribe_scope == "sender" else None
        for rcpt in rcpts:
            token = self._tokens.issue(rcpt, group_name, route.unsubscribe_scope, sender)
            url = headers.unsubscribe_url(public_url, token)
            personal = base.replace(prepend=headers.one_click_headers(url, group, token))
            yield _Copy((rcpt,), self._sign(personal, keys, bh))

    def _sign(self, message: Message, keys: list[DkimKey], bh: bytes) -> bytes:
        if not keys:
            return message.to_bytes()
        with self._stage("sign"):
            signatures = self._signer.sign(message, keys, bh)
        return b"".join(h.raw for h in signatures) + message.to_bytes()

    async def _deliver(
        self, mail_from: str, copies: Iterator[_Copy], recipients: int
    ) -> tuple[dict[str, SmtpReply], dict[str, bytes]]:
        """All copies over the pool, at most ``upstream.connections`` at a time.

        Copies are built lazily, so a 1,000-recipient newsletter never holds 1,000
        signed copies in memory; only deferred copies are kept, for the retry queue.
        Answers the reply per recipient and the bytes of each deferred recipient's copy.
        """
        replies: dict[str, SmtpReply] = {}
        deferred: dict[str, bytes] = {}

        async def worker() -> None:
            for copy in copies:
                result = await self._upstream.send(Outbound(mail_from, copy.recipients, copy.data))
                replies.update(result)
                for rcpt, reply in result.items():
                    if reply.is_temporary:
                        deferred[rcpt] = copy.data

        workers = min(recipients, self._upstream.connections)
        await asyncio.gather(*(worker() for _ in range(workers)))
        for reply in replies.values():
            self._metrics.upstream_replies.labels(f"{reply.code // 100}xx").inc()
        return replies, deferred

    async def _answer(
        self, envelope: Envelope, deferred_data: dict[str, bytes], trace: Trace
    ) -> SmtpReply:
        replies = trace.replies
        accepted = [r for r, reply in replies.items() if reply.is_success]
        deferred = [r for r, reply in replies.items() if reply.is_temporary]
        refused = [r for r, reply in replies.items() if reply.is_permanent]
        if not accepted:
            return next((replies[r] for r in deferred), None) or replies[refused[0]]
        if deferred:
            try:
                for rcpt in deferred:
                    await self._retry.put(
                        envelope.mail_from, rcpt, deferred_data[rcpt], str(replies[rcpt])
                    )
                    self._metrics.retry.labels("queued").inc()
            except StoreUnavailable:
                log.error(
                    "retry queue unavailable id=%s; answering 451, %d accepted copies"
                    " may be sent again when the client retries",
                    trace.queue_id,
                    len(accepted),
                )
                return SmtpReply(451, "4.3.0", "temporary failure queuing deferred recipients")
            trace.queued = len(deferred)
        parts = [f"delivered {len(accepted)}"]
        if deferred:
            parts.append(f"queued {len(deferred)}")
        if refused:
            parts.append(f"refused {len(refused)}")
        if trace.suppressed:
            parts.append(f"suppressed {trace.suppressed}")
        return SmtpReply(250, "2.0.0", f"Ok: {', '.join(parts)} id={trace.queue_id}")

    def _record(self, envelope: Envelope, trace: Trace, reply: SmtpReply, ms: float) -> None:
        route = trace.route
        message_class = route.message_class if route else "unknown"
        replies = trace.replies
        delivered = sum(1 for r in replies.values() if r.is_success)
        refused = sum(1 for r in replies.values() if r.is_permanent)
        if not reply.is_success:
            outcome = "tempfail" if reply.is_temporary else "permfail"
            if route is None:
                outcome = "rejected"
        elif not replies:
            outcome = "suppressed"
        elif delivered == len(replies):
            outcome = "delivered"
        else:
            outcome = "partial"
        self._metrics.messages.labels(message_class, outcome).inc()
        if delivered:
            self._counters.add("sent", route.group if route else None, delivered)
        for name, count in (
            ("delivered", delivered),
            ("queued", trace.queued),
            ("refused", refused),
            ("suppressed", trace.suppressed),
        ):
            if count:
                self._metrics.recipients.labels(message_class, name).inc(count)
        for rcpt, r in replies.items():
            if not r.is_success:
                log.info("recipient id=%s rcpt=%s reply=%s", trace.queue_id, rcpt, r)
        log.info(
            "message id=%s msgid=%s from=%s class=%s group=%s rcpts=%d kept=%d suppressed=%d"
            " copies=%d dkim=%s reply=%s enhanced=%s ms=%.1f",
            trace.queue_id,
            trace.message_id,
            trace.sender,
            message_class,
            (route.group if route else None) or "-",
            len(envelope.rcpt_tos),
            trace.kept,
            trace.suppressed,
            len(replies) if route and route.is_marketing else min(1, len(replies)),
            trace.signed,
            reply.code,
            reply.enhanced,
            ms,
        )
