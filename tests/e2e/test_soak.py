"""Soak: concurrent clients while the upstream and Redis restart; nothing lost, nothing twice.

``SOAK_CLIENTS`` clients (default 8) each send ``SOAK_MESSAGES`` messages (default
25) over real SMTP, alternating marketing (2-3 recipients, so the relay fans out
one signed copy per recipient) and transactional (1-2 recipients, one copy).
Meanwhile a chaos task, driven by progress so the faults always overlap traffic,
crashes the upstream and brings it back, and kills Redis (SIGKILL) and starts it
again on the same port. Every reply is recorded, then:

- every recipient of every message answered ``250`` is at the capture upstream
  exactly once (after the retry queue has drained);
- no (message, recipient) pair is delivered twice;
- every message not answered ``250`` got a 4xx or 5xx, and none of its copies
  went out, so the client can send it again without a duplicate.

The upstream crash is an MTA going away: it first answers ``421`` to whatever
transaction reaches it (stores nothing more), then its sockets are aborted and
the port closed; a restart listens on the same port again with the same store.

The test Redis runs without persistence (``--save '' --appendonly no``), so a
kill wipes it, retry queue included: the durability of queued copies is Redis's
(AOF/replicas), not something a relay can add. Redis is therefore killed only
when the retry queue is empty; during its outage the sink is up, so no fan-out
needs the queue.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import pytest
import redis
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.cli.sink import CaptureHandler
from relay.runtime.app import Relay
from relay.store.embedded import EmbeddedRedis

pytestmark = pytest.mark.slow

CLIENTS = int(os.environ.get("SOAK_CLIENTS", "8"))
MESSAGES = int(os.environ.get("SOAK_MESSAGES", "25"))
TOKEN = re.compile(rb"^X-Soak-Token: (\S+)\r$", re.MULTILINE)
DOWN = "421 4.3.2 upstream shutting down"


@dataclass
class FlakyHandler(CaptureHandler):
    down: bool = False
    trip: bool = False
    """Go down right after accepting the next one-recipient marketing copy: mid-fan-out."""

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.down:
            return DOWN
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.down:
            return DOWN
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.down:
            return DOWN
        reply = await super().handle_DATA(server, session, envelope)
        data = envelope.original_content or b""
        if self.trip and len(envelope.rcpt_tos) == 1 and b"\nList-Unsubscribe:" in data:
            self.trip, self.down = False, True
        return reply


@dataclass
class CrashableSink:
    """A capture upstream that can crash (refuse, then drop every connection) and restart."""

    handler: FlakyHandler = field(default_factory=FlakyHandler)
    port: int = 0
    server: asyncio.Server | None = None
    sessions: list[SMTP] = field(default_factory=list)

    async def start(self) -> CrashableSink:
        def factory() -> SMTP:
            protocol = SMTP(self.handler, enable_SMTPUTF8=True, hostname="capture.local")
            self.sessions.append(protocol)
            return protocol

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(factory, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        self.handler.down = False
        return self

    async def crash(self) -> None:
        """Go down mid-fan-out if marketing mail comes soon, else at once; then drop all."""
        self.handler.trip = True
        await until(lambda: self.handler.down, timeout=2)
        self.handler.down = True
        assert self.server is not None
        self.server.close()
        await asyncio.sleep(0.1)  # replies already written reach the relay first
        for protocol in self.sessions:
            if protocol.transport is not None:
                protocol.transport.abort()
        self.sessions.clear()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for protocol in self.sessions:
            if protocol.transport is not None:
                protocol.transport.abort()


@dataclass(frozen=True)
class Sent:
    token: str
    kind: str
    rcpts: tuple[str, ...]
    code: int | None
    text: str


def soak_message(token: str, sender: str, rcpts: tuple[str, ...]) -> bytes:
    return (
        f"From: Soak <{sender}>\r\nTo: {', '.join(rcpts)}\r\nSubject: soak {token}\r\n"
        f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{token}@example.com>\r\n"
        f"X-Soak-Token: {token}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        f"Message {token}.\r\n" + "Some body text to sign and carry.\r\n" * 20
    ).encode()


async def send(
    port: int, sender: str, rcpts: tuple[str, ...], data: bytes
) -> tuple[int | None, str]:
    """The reply to DATA, or to the first refused command; ``None`` if there was no reply."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60)
    try:
        await client.connect()
        await client.mail(sender)
        for rcpt in rcpts:
            await client.rcpt(rcpt)
        response = await client.data(data)
        return response.code, response.message
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    except (aiosmtplib.SMTPException, OSError) as exc:
        return None, repr(exc)
    finally:
        try:
            if client.is_connected:
                await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            client.close()


async def client_loop(
    port: int, number: int, results: list[Sent], rng: random.Random, prefix: str
) -> None:
    for j in range(MESSAGES):
        token = f"{prefix}-c{number:02d}-m{j:05d}"
        if (number + j) % 2 == 0:
            kind, sender = "marketing", "news@example.com"
            count = rng.choice([2, 3])
        else:
            kind, sender = "transactional", "receipts@example.com"
            count = rng.choice([1, 2])
        rcpts = tuple(
            f"u{number}-{j}-{k}@example.{rng.choice(['net', 'org'])}" for k in range(count)
        )
        code, text = await send(port, sender, rcpts, soak_message(token, sender, rcpts))
        results.append(Sent(token, kind, rcpts, code, text))
        await asyncio.sleep(rng.uniform(0.05, 0.15))  # an application, not a flood


async def until(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return predicate()


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


@dataclass
class Chaos:
    relay: Relay
    sink: CrashableSink
    redis_server: EmbeddedRedis
    results: list[Sent]
    total: int
    sink_restarts: int = 0
    redis_restarts: int = 0
    log: list[str] = field(default_factory=list)

    async def _outage(self, replies: int, at_most: float) -> None:
        """Stay down until ``replies`` more replies were seen (or ``at_most`` seconds)."""
        seen = len(self.results)
        await asyncio.sleep(0.05)
        await until(lambda: len(self.results) >= min(seen + replies, self.total), at_most)

    async def queue_empty(self, timeout: float) -> bool:
        assert self.relay.retry is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if await self.relay.retry.length() == 0:
                    return True
            except redis.RedisError:
                pass
            await asyncio.sleep(0.05)
        return False

    async def crash_sink(self) -> None:
        await self.sink.crash()
        self.log.append(f"sink down at {len(self.results)}")
        await self._outage(replies=max(CLIENTS, min(self.total // 20, 3 * CLIENTS)), at_most=3)
        await self.sink.start()
        self.sink_restarts += 1
        self.log.append(f"sink up at {len(self.results)}")

    async def kill_redis(self) -> None:
        if not await self.queue_empty(timeout=15):
            self.log.append("retry queue did not drain; Redis kill skipped")
            return
        await asyncio.to_thread(self.redis_server.kill)
        self.log.append(f"redis killed at {len(self.results)}")
        await self._outage(replies=max(CLIENTS, min(self.total // 20, 3 * CLIENTS)), at_most=3)
        await asyncio.to_thread(self.redis_server.start)
        self.redis_restarts += 1
        self.log.append(f"redis up at {len(self.results)}")

    async def run(self) -> None:
        cycles = max(4, self.total // 50)
        marks = [0.15 + 0.7 * i / (cycles - 1) for i in range(cycles)]
        for number, mark in enumerate(marks):
            target = int(self.total * mark)
            await until(lambda t=target: len(self.results) >= t, timeout=120)
            if len(self.results) >= self.total:
                break
            await (self.crash_sink() if number % 2 == 0 else self.kill_redis())


async def test_soak_restarts_lose_nothing_and_duplicate_nothing(
    make_relay: Callable[[dict[str, Any]], Awaitable[Relay]],
    config_dict: dict[str, Any],
    redis_server: EmbeddedRedis,
) -> None:
    sink = await CrashableSink().start()
    config_dict["upstream"]["port"] = sink.port
    relay = await make_relay(config_dict)
    results: list[Sent] = []
    total = CLIENTS * MESSAGES
    chaos = Chaos(relay, sink, redis_server, results, total)
    prefix = os.urandom(3).hex()
    started = time.monotonic()
    try:
        chaos_task = asyncio.create_task(chaos.run())
        await asyncio.gather(
            *(
                client_loop(relay.smtp_port, n, results, random.Random(n), prefix)
                for n in range(CLIENTS)
            )
        )
        await asyncio.wait_for(chaos_task, timeout=60)
        sending = time.monotonic() - started
        drained = await chaos.queue_empty(timeout=30)
    finally:
        if not redis_answers(redis_server.url):
            await asyncio.to_thread(redis_server.start)
        await sink.stop()

    delivered: collections.Counter[tuple[str, str]] = collections.Counter()
    for copy in sink.handler.messages:
        m = TOKEN.search(copy.data)
        assert m is not None, copy.data[:400]
        for rcpt in copy.rcpt_tos:
            delivered[(m.group(1).decode(), rcpt)] += 1

    ok = [s for s in results if s.code == 250]
    temp = [s for s in results if s.code is not None and 400 <= s.code < 500]
    perm = [s for s in results if s.code is not None and 500 <= s.code < 600]
    other = [s for s in results if s.code is None or not (s.code == 250 or 400 <= s.code < 600)]
    lost = [(s.token, r) for s in ok for r in s.rcpts if delivered[(s.token, r)] == 0]
    twice = {pair: n for pair, n in delivered.items() if n > 1}
    leaked = [(s.token, r) for s in temp + perm for r in s.rcpts if delivered[(s.token, r)]]
    queued = sum(int(m.group(1)) for s in ok for m in [re.search(r"queued (\d+)", s.text)] if m)
    print(
        f"\nsoak: clients={CLIENTS} messages={len(results)} 250={len(ok)} 4xx={len(temp)}"
        f" 5xx={len(perm)} no-reply={len(other)} copies={len(sink.handler.messages)}"
        f" queued={queued} sink_restarts={chaos.sink_restarts}"
        f" redis_restarts={chaos.redis_restarts} lost={len(lost)} duplicated={len(twice)}"
        f" delivered_after_4xx_5xx={len(leaked)} sending={sending:.1f}s"
        f"\nchaos: {'; '.join(chaos.log)}"
        f"\nreplies: {collections.Counter(f'{s.code} {s.text[:5]}' for s in results)}"
    )
    assert len(results) == total
    assert chaos.sink_restarts >= 2 and chaos.redis_restarts >= 2, chaos.log
    assert temp, "the faults never showed: no message was deferred"
    assert drained, "the retry queue did not drain"
    assert other == [], f"messages without a 4xx/5xx/250 reply: {other[:5]}"
    assert twice == {}, f"delivered more than once: {list(twice.items())[:10]}"
    assert lost == [], f"answered 250 but never delivered: {lost[:10]}"
    assert leaked == [], f"answered 4xx/5xx but delivered (a resend duplicates): {leaked[:10]}"
    assert redis_answers(redis_server.url)
