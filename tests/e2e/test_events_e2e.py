"""Events for the application: a signed webhook retried until the receiver is back (across a
relay restart), and a notification mail per unsubscribe through the upstream."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import Sink
from helpers import message, smtp_send
from redis.asyncio import Redis

from relay.runtime.app import Relay
from relay.store.embedded import free_port
from relay.suppression.store import SuppressionStore

SECRET = b"webhook-secret-0123456789abcdef"


class Receiver:
    """A real HTTP endpoint; ``up`` False answers 503 like a receiver that is down."""

    def __init__(self) -> None:
        self.up = False
        self.accepted: list[dict[str, Any]] = []
        self.attempts = 0
        self.bad_signatures = 0
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        expected = hmac.new(
            SECRET, request.headers["X-Oneclick-Timestamp"].encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        if request.headers["X-Oneclick-Signature"] != f"sha256={expected}":
            self.bad_signatures += 1
            return web.Response(status=400)
        if not self.up:
            return web.Response(status=503)
        event = json.loads(body)
        assert event["id"] == request.headers["X-Oneclick-Event-Id"]
        self.accepted.append(event)
        return web.Response(text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", r.port).start()
    yield r
    await runner.cleanup()


async def wait_for(predicate: Any, seconds: float = 10) -> None:
    for _ in range(int(seconds * 20)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_webhook_retried_after_downtime_and_restart_exactly_once(
    make_relay: Any,
    config_dict: dict[str, Any],
    receiver: Receiver,
    tmp_path: Path,
    redis: Redis,
) -> None:
    secret = tmp_path / "hook.key"
    secret.write_bytes(SECRET)
    config_dict["events"] = {
        "webhook": {"url": f"http://127.0.0.1:{receiver.port}/hook", "secret_file": str(secret)},
        "retry_first_delay": 0.2,
        "retry_max_delay": 0.5,
    }
    relay: Relay = await make_relay(config_dict)
    assert relay.store is not None
    await asyncio.sleep(0.2)  # the consumer group exists before the first event
    for address in ("a@example.net", "b@example.net"):
        await relay.store.add(address, "g:newsletter", "unsubscribe", "post")
    await wait_for(lambda: receiver.attempts >= 2)
    assert receiver.accepted == []

    await relay.stop()  # events still unacknowledged survive the restart
    # written while the relay is down (its own client is closed with it)
    await SuppressionStore(redis, "ocr").add("c@example.net", "*", "complaint", "arf")
    relay = await make_relay(config_dict)
    receiver.up = True
    await wait_for(lambda: len(receiver.accepted) == 3)
    await asyncio.sleep(1.0)  # nothing more arrives: acknowledged events are not resent
    ids = [e["id"] for e in receiver.accepted]
    assert len(ids) == len(set(ids)) == 3
    assert sorted(e["address"] for e in receiver.accepted) == [
        "a@example.net",
        "b@example.net",
        "c@example.net",
    ]
    assert receiver.bad_signatures == 0
    assert 'consumer="webhook",outcome="delivered"} 3.0' in relay.metrics.render().decode()


async def test_notify_mail_per_unsubscribe(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink
) -> None:
    config_dict["events"] = {
        "notify_email": {"to": "crm@example.com", "from": "relay@example.com"},
        "retry_first_delay": 0.2,
    }
    relay: Relay = await make_relay(config_dict)
    await asyncio.sleep(0.2)
    code, _ = await smtp_send(relay.smtp_port, "news@example.com", ["ann@example.net"], message())
    assert code == 250
    import re

    import aiohttp

    token = re.search(rb"/u/(k1\.[\w-]+)>", sink.handler.messages[-1].data)
    assert token
    url = f"http://127.0.0.1:{relay.http_port}/u/{token.group(1).decode()}"
    async with aiohttp.ClientSession() as http, http.post(url, data=b"") as resp:
        assert resp.status == 200
    assert relay.store is not None
    await relay.store.add("x@example.net", "*", "manual", "cli")  # not a notified reason
    await wait_for(lambda: any(m.rcpt_tos == ("crm@example.com",) for m in sink.handler.messages))
    await asyncio.sleep(0.5)
    notes = [m for m in sink.handler.messages if m.rcpt_tos == ("crm@example.com",)]
    assert len(notes) == 1
    assert b"Subject: unsubscribe: ann@example.net (g:newsletter)" in notes[0].data
    assert notes[0].mail_from == "relay@example.com"
