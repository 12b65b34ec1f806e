"""Telling the application about suppression changes: a signed webhook and notification mail.

Both read the Redis stream ``{prefix}:events`` through their own consumer group,
so an event is acknowledged only once it was handed on, and nothing is lost when
the relay restarts or the receiver is down: unacknowledged events are claimed
again with exponential backoff (``XPENDING`` idle time against the delivery
count). Several relay processes share the work through the group.

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
from typing import Any, cast

import aiohttp

from relay.config import EventsConfig, NotifyConfig, WebhookConfig
from relay.errors import StoreUnavailable
from relay.eventlog import EventLog
from relay.metrics import Metrics
from relay.outbound.backoff import backoff
from relay.outbound.upstream import Outbound, Upstream
from relay.store.client import RedisClient, create_group, unavailable

log = EventLog(__name__)

Event = dict[str, str]
Handler = Callable[[str, Event], Awaitable[bool]]


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class StreamConsumer:
    """One consumer group on the events stream, with at-least-once delivery and backoff."""

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
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._group = group
        self._handler = handler
        self._metrics = metrics
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._block_ms = block_ms
        self._consumer = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    async def _ensure_group(self) -> None:
        await create_group(self._redis, self._stream, self._group, "$")

    async def run(self) -> None:
        while not self._stopped:
            try:
                await self._ensure_group()
                while not self._stopped:
                    with unavailable("events"):
                        await self.run_once()
            except StoreUnavailable as exc:
                log.warning("events redis unavailable", group=self._group, error=exc)
                await asyncio.sleep(1)

    async def run_once(self) -> int:
        """Retry what is due, then read new events; answers how many were handled."""
        handled = await self._retry_due()
        reply = await self._redis.xreadgroup(
            self._group, self._consumer, {self._stream: ">"}, count=50, block=self._block_ms
        )
        for _, messages in cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], reply):
            for event_id, fields in messages:
                await self._deliver(event_id.decode(), fields)
                handled += 1
        return handled

    def _backoff(self, deliveries: int) -> float:
        return backoff(deliveries, self._first_delay, self._max_delay)

    async def _retry_due(self) -> int:
        pending = cast(
            list[dict[str, Any]],
            await self._redis.xpending_range(
                self._stream,
                self._group,
                min="-",
                max="+",
                count=100,
                idle=int(self._first_delay * 1000),
            ),
        )
        due: list[bytes] = [
            p["message_id"]
            for p in pending
            if p["time_since_delivered"] >= self._backoff(int(p["times_delivered"])) * 1000
        ]
        if not due:
            return 0
        claimed = cast(
            list[tuple[bytes, dict[bytes, bytes] | None]],
            await self._redis.xclaim(
                self._stream, self._group, self._consumer, min_idle_time=0, message_ids=list(due)
            ),
        )
        for event_id, fields in claimed:
            if fields is not None:
                await self._deliver(event_id.decode(), fields)
        return len(claimed)

    async def _deliver(self, event_id: str, raw: dict[bytes, bytes]) -> None:
        event = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            ok = await self._handler(event_id, event)
        except Exception:  # the receiver's failure must not stop the consumer
            log.exception("events handler failed", group=self._group, id=event_id)
            ok = False
        if ok:
            await self._redis.xack(self._stream, self._group, event_id)
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

    def consumer(group: str, handler: Handler) -> StreamConsumer:
        return StreamConsumer(
            redis,
            stream,
            group,
            handler,
            metrics,
            first_delay=config.retry_first_delay,
            max_delay=config.retry_max_delay,
        )

    if config.webhook is not None:
        sender = WebhookSender(config.webhook)
        consumers.append(consumer("webhook", sender))
        closers.append(sender)
    if config.notify_email is not None:
        consumers.append(
            consumer("notify-mail", NotifyMailer(config.notify_email, upstream, hostname))
        )
    return consumers, closers
