"""Every Redis error that can reach a front end arrives as the relay's own error.

The mapping class by class is in ``tests/test_store_client.py``; here the front ends
face a real outage — a
Redis killed under a running relay, a Redis URL that points at a closed port, and a
Cluster whose node is gone — each answering its protocol's "try again" with no
traceback: the admin API 503 (``/admin/report`` included), the one-click POST 503,
the SMTP listener 451 4.3.0 for marketing mail, the inbound listener 451 4.3.0.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Sink
from helpers import message, smtp_send

from relay.mail.tokens import TokenCodec
from relay.runtime.app import Relay
from relay.store.embedded import EmbeddedRedis

TOKEN = "store-errors-admin-token-0123456789"
BOUNCE_RETURN = "bounces@bounce.example.com"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def outage_config(config_dict: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    config_dict["http"]["admin_token_file"] = str(token_file)
    config_dict["bounces"] = {
        "return_path_domain": "bounce.example.com",
        "listen": "127.0.0.1:0",
        "keep_days": 3,
    }
    config_dict["redis"]["timeout"] = 0.5
    return config_dict


@pytest.fixture(params=["killed", "closed-port", "cluster-closed-port"])
async def down(
    request: pytest.FixtureRequest, make_relay: Any, outage_config: dict[str, Any]
) -> AsyncIterator[Relay]:
    """A running relay whose Redis does not answer, three ways."""
    server: EmbeddedRedis | None = None
    if request.param == "killed":
        server = EmbeddedRedis().start()
        outage_config["redis"]["url"] = server.url
    else:
        outage_config["redis"]["url"] = f"redis://127.0.0.1:{closed_port()}/0"
        outage_config["redis"]["cluster"] = request.param.startswith("cluster")
    relay: Relay = await make_relay(outage_config)
    if server is not None:
        server.kill()
    try:
        yield relay
    finally:
        if server is not None:
            server.stop()


def a_token(relay: Relay) -> str:
    return TokenCodec(relay.config.tokens).issue("alice@example.net", "newsletter")


async def http(relay: Relay, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://127.0.0.1:{relay.http_port}{path}", **kwargs) as resp,
    ):
        return resp.status, await resp.text()


ADMIN_CALLS = [
    ("GET", "/admin/report", {}),
    ("GET", "/admin/suppressions/alice@example.net", {}),
    ("POST", "/admin/suppressions", {"json": {"address": "alice@example.net"}}),
    ("DELETE", "/admin/suppressions/alice@example.net", {}),
    ("GET", "/admin/patterns", {}),
    ("POST", "/admin/patterns", {"json": {"pattern": "mailinator.com"}}),
    ("GET", "/admin/queue", {}),
    ("GET", "/admin/suppressions", {}),
    ("GET", "/admin/suppressions?format=csv", {}),
    ("POST", "/admin/suppressions/import", {"data": b"alice@example.net\n"}),
    ("GET", "/admin/stats", {}),
    ("DELETE", "/admin/patterns/mailinator.com", {}),
]


async def test_admin_api_answers_503(down: Relay) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for method, path, kwargs in ADMIN_CALLS:
        status, body = await http(down, method, path, headers=auth, **kwargs)
        assert status == 503, (method, path, status, body)
        assert "Redis unavailable" in body, (method, path, body)
        assert "Traceback" not in body


async def test_one_click_post_is_journaled(down: Relay) -> None:
    """The mapped error reaches the unsubscriber, which keeps the request in the journal."""
    status, body = await http(
        down, "POST", f"/u/{a_token(down)}", data={"List-Unsubscribe": "One-Click"}
    )
    assert (status, body) == (200, "Unsubscribed from Example News.\n")
    status, body = await http(down, "GET", "/healthz")
    assert status == 503
    assert '"journal_pending": 1' in body


async def test_smtp_marketing_gets_451(down: Relay, sink: Sink) -> None:
    code, text = await smtp_send(down.smtp_port, "news@example.com", ["bob@example.org"], message())
    assert (code, text[:5]) == (451, "4.3.0"), text
    assert sink.handler.messages == []


async def test_inbound_listener_gets_451(down: Relay) -> None:
    dsn = (
        b"From: MAILER-DAEMON@mx.example.org\r\nTo: bounces@bounce.example.com\r\n"
        b"Subject: Undelivered Mail\r\nMessage-ID: <dsn1@mx.example.org>\r\n\r\n"
        b"user unknown\r\n"
    )
    code, text = await smtp_send(down.inbound_port, "", [BOUNCE_RETURN], dsn)
    assert (code, text) == (451, "4.3.0 temporary failure, try again later")
