"""Telling the application about suppression changes: a signed webhook and notification mail.

Both read the Redis stream ``{prefix}:events`` through their own consumer group,
so an event is acknowledged only once it was handed on, and nothing is lost when
the relay restarts or the receiver is down: unacknowledged events are claimed
again with exponential backoff (``XPENDING`` idle time against the delivery
count). Several relay processes share the work through the group, and each
retry is claimed by exactly one of them (``relay.store.stream``). A group is
created at the oldest entry kept, so events written before it existed are sent.

Webhook request::

    POST <events.webhook.url>
    Content-Type: application/json
    X-Oneclick-Event-Id: 1732500000000-0        (the stream id: deduplicate on it)
    X-Oneclick-Timestamp: 1732500000
    X-Oneclick-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>

    {"id": ..., "type": "add", "address": ..., "scope": ..., "reason": ..., ...}
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import aiohttp

from relay.config import EventsConfig, NotifyConfig, WebhookConfig
from relay.errors import StoreUnavailable
from relay.eventlog import EventLog
from relay.metrics import Metrics
from relay.outbound.backoff import backoff
from relay.outbound.upstream import Outbound, Upstream
from relay.store.client import RedisClient
from relay.store.stream import StreamGroup

log = EventLog(__name__)

Event = dict[str, str]
Handler = Callable[[str, Event], Awaitable[bool]]


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class StreamConsumer:
    """One consumer group on the events stream: at-least-once, each retry taken by one.

    A new event goes to one consumer of the group (``XREADGROUP``). An unacknowledged
    one is retried after a backoff that doubles per delivery, and never while the
    consumer that has it may still be handing it on (``lease``: its handler's
    timeout): it is claimed with that idle time as ``XCLAIM``'s minimum, so of several
    processes that see it due, exactly one gets it.
    """

    def __init__(
        self,
        redis: RedisClient,
        stream: str,
        group: str,
        handler: Handler,
        metrics: Metrics,
        *,
        first_delay: float = 5.0,
        max_delay: float = 600.0,
        block_ms: int = 250,
        lease: float = 0.0,
    ) -> None:
        self._stream = StreamGroup(redis, stream, group)
        self._group = group
        self._handler = handler
        self._metrics = metrics
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._block_ms = block_ms
        self._lease = lease
        self._consumer = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    async def run(self) -> None:
        while not self._stopped:
            try:
                await self._stream.ensure()
                while not self._stopped:
                    await self.run_once()
            except StoreUnavailable as exc:
                log.warning("events redis unavailable", group=self._group, error=exc)
                await asyncio.sleep(1)

    async def run_once(self) -> int:
        """Retry what is due, then read new events; answers how many were handled."""
        handled = await self._retry_due()
        # one at a time: an entry read in a batch would sit idle while the ones before it
        # are handed on, and could be claimed by another consumer meanwhile
        for event_id, fields in await self._stream.read_new(self._consumer, 1, self._block_ms):
            await self._deliver(event_id, fields)
            handled += 1
        return handled

    def _backoff(self, deliveries: int) -> float:
        return backoff(deliveries, self._first_delay, self._max_delay)

    def _min_idle(self, deliveries: int) -> float:
        """Seconds an entry must be idle before it is retried: backoff, at least the lease."""
        return max(self._backoff(deliveries), self._lease)

    async def _retry_due(self) -> int:
        pending = await self._stream.pending(int(self._min_idle(1) * 1000), 100)
        handled = 0
        for p in pending:
            need = int(self._min_idle(p.deliveries) * 1000)
            if p.idle_ms < need:
                continue
            # claimed just before it is handed on, so the lease covers one delivery only
            for event_id, fields in await self._stream.claim(self._consumer, need, [p.id]):
                await self._deliver(event_id, fields)
                handled += 1
        return handled

    async def _deliver(self, event_id: str, raw: dict[bytes, bytes]) -> None:
        event = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            ok = await self._handler(event_id, event)
        except Exception:  # the receiver's failure must not stop the consumer
            log.exception("events handler failed", group=self._group, id=event_id)
            ok = False
        if ok:
            await self._stream.ack(event_id)
            self._metrics.event_deliveries.labels(self._group, "delivered").inc()
        else:
            self._metrics.event_deliveries.labels(self._group, "deferred").inc()


class WebhookSender:
    def __init__(self, config: WebhookConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, event_id: str, event: Event) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._config.timeout)
            )
        body = json.dumps({"id": event_id, **event}, separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "oneclick-relay",
            "X-Oneclick-Event-Id": event_id,
            "X-Oneclick-Timestamp": timestamp,
            "X-Oneclick-Signature": sign(self._config.secret.reveal(), timestamp, body),
        }
        try:
            async with self._session.post(self._config.url, data=body, headers=headers) as resp:
                ok = 200 <= resp.status < 300
                if not ok:
                    log.warning("webhook", id=event_id, status=resp.status)
                return ok
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("webhook", id=event_id, error=type(exc).__name__)
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class NotifyMailer:
    """One short message per unsubscribe to an operator address, sent through the upstream."""

    def __init__(self, config: NotifyConfig, upstream: Upstream, hostname: str) -> None:
        self._config = config
        self._upstream = upstream
        self._hostname = hostname

    async def __call__(self, event_id: str, event: Event) -> bool:
        if event.get("reason") not in self._config.reasons or event.get("type") != "add":
            return True
        msg = EmailMessage()
        msg["From"] = self._config.sender
        msg["To"] = self._config.to
        msg["Subject"] = f"{event.get('reason')}: {event.get('address')} ({event.get('scope')})"
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = make_msgid(domain=self._hostname)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Oneclick-Event-Id"] = event_id
        when = datetime.fromtimestamp(int(event.get("time", "0")), UTC).isoformat()
        msg.set_content(
            f"Address:  {event.get('address')}\n"
            f"Reason:   {event.get('reason')}\n"
            f"Scope:    {event.get('scope')}\n"
            f"Source:   {event.get('source')}\n"
            f"When:     {when}\n"
            f"Event id: {event_id}\n"
        )
        data = msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        replies = await self._upstream.send(Outbound(self._config.sender, (self._config.to,), data))
        reply = replies[self._config.to]
        if reply.is_permanent:
            log.error("notify mail refused", id=event_id, reply=reply)
            return True  # a permanent refusal will not get better by retrying
        return reply.is_success


def build_consumers(
    redis: RedisClient,
    stream: str,
    config: EventsConfig,
    upstream: Upstream,
    hostname: str,
    metrics: Metrics,
) -> tuple[list[StreamConsumer], list[WebhookSender]]:
    """The configured consumers, and the resources to close after them."""
    consumers, closers = [], []

    def consumer(group: str, handler: Handler, timeout: float) -> StreamConsumer:
        return StreamConsumer(
            redis,
            stream,
            group,
            handler,
            metrics,
            first_delay=config.retry_first_delay,
            max_delay=config.retry_max_delay,
            lease=timeout + 1.0,
        )

    if config.webhook is not None:
        sender = WebhookSender(config.webhook)
        consumers.append(consumer("webhook", sender, config.webhook.timeout))
        closers.append(sender)
    if config.notify_email is not None:
        mailer = NotifyMailer(config.notify_email, upstream, hostname)
        consumers.append(consumer("notify-mail", mailer, upstream.timeout))
    return consumers, closers
