"""Hostile input against a running relay: nothing an outsider sends stalls it or fills Redis.

Each test replays one finding of the attack run (issue 15) over real sockets: the
inbound listener, the HTTP side and the SMTP port of a relay started on a real
Redis. Stalls are measured as the latency of ``/healthz`` polled from a separate
thread while the attack runs, so a blocked event loop shows as a slow answer.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import redis.asyncio as aioredis
from conftest import Sink
from helpers import HealthPoller, message, smtp_send
from test_auth_tls_e2e import self_signed

from relay.runtime.app import Relay
from relay.suppression.store import GLOBAL

ALICE = "alice@example.net"
RETURN_PATH = "bounces@bounce.example.com"
STALL = 0.25
"""The longest /healthz answer the tests accept while an attack runs (seconds)."""


@pytest.fixture
def bounce_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    config_dict["bounces"] = {
        "return_path_domain": "bounce.example.com",
        "listen": "127.0.0.1:0",
        "keep_days": 3,
    }
    return config_dict


@pytest.fixture
async def brelay(make_relay: Any, bounce_config: dict[str, Any]) -> Relay:
    relay: Relay = await make_relay(bounce_config)
    return relay


def metric(relay: Relay, line: str) -> bool:
    return line in relay.metrics.render().decode()


def dsn(text: str, message_id: str = "<hostile@mta.example.org>") -> bytes:
    """A DSN whose human-readable part is ``text`` (base64, so its lines stay short)."""
    body = base64.encodebytes(text.encode()).decode().replace("\n", "\r\n")
    return (
        "From: MAILER-DAEMON@mta.example.org\r\n"
        "To: bounces@bounce.example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n'
        "\r\n--b1\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        f"{body}\r\n--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mta.example.org\r\n\r\n"
        "Final-Recipient: rfc822; nobody@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "\r\n--b1--\r\n"
    ).encode()


# ---------------------------------------------------------------------------
# finding 1: a DSN that made the return-path search quadratic


async def test_long_run_of_return_path_prefixes_does_not_stall_the_loop(brelay: Relay) -> None:
    """400 KB of ``bounces+aaaa…`` without white space: 11 s of regex on the loop before."""
    text = ("bounces+" + "a" * 24) * (400_000 // 32)
    async with HealthPoller(brelay.http_port) as poller:
        await asyncio.sleep(0.2)
        code, reply = await smtp_send(brelay.inbound_port, "", [RETURN_PATH], dsn(text))
        await asyncio.sleep(0.2)
    assert code == 250, reply
    assert "unattributed" in reply
    assert len(poller.latencies) >= 5
    assert poller.worst < STALL, f"/healthz took {poller.worst:.3f} s during the DSN"


# ---------------------------------------------------------------------------
# findings 7 and 8: one address normaliser for policy, signing and suppression


@pytest.mark.parametrize("sender", ["news@example.com.", '"news"@example.com'])
async def test_marketing_sender_spellings_get_one_click_headers(
    relay: Relay, sink: Sink, sender: str
) -> None:
    """Both were classified transactional (no List-Unsubscribe) yet signed d=example.com."""
    data = message(sender="news@example.com").replace(b"<news@example.com>", f"<{sender}>".encode())
    code, reply = await smtp_send(relay.smtp_port, "app@example.com", [ALICE], data)
    assert code == 250, reply
    [copy] = sink.handler.messages
    assert b"\r\nList-Unsubscribe: <https://unsub.example.com/u/" in copy.data
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in copy.data
    assert b"d=example.com" in copy.data


async def test_from_without_canonical_form_is_refused(relay: Relay, sink: Sink) -> None:
    data = message(sender="news@xn--zz.example.com")
    code, reply = await smtp_send(relay.smtp_port, "app@example.com", [ALICE], data)
    assert code == 550
    assert reply.startswith("5.1.7 From address cannot be normalised")
    assert sink.handler.messages == []


async def test_sharp_s_and_ss_domains_are_different_people(relay: Relay, sink: Sink) -> None:
    """IDNA 2003 folded straße.de into strasse.de: one unsubscribe stopped both."""
    assert relay.store is not None
    await relay.store.add("kai@straße.de", GLOBAL, "manual", source="test")
    code, reply = await smtp_send(
        relay.smtp_port, "app@example.com", ["kai@strasse.de"], message(to="kai@strasse.de")
    )
    assert code == 250, reply
    assert [m.rcpt_tos for m in sink.handler.messages] == [("kai@strasse.de",)]
    assert await relay.store.add("kai@strasse.de", GLOBAL, "manual", source="test")


# ---------------------------------------------------------------------------
# finding 2: junk sent to the inbound listener must not fill Redis


async def used_memory(redis_url: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        info = await client.info("memory")
    finally:
        await client.aclose()
    return int(info["used_memory"])


async def test_junk_flood_leaves_only_digests_in_redis(brelay: Relay, redis_url: str) -> None:
    """20 junk messages of 1.5 MB: +126 MB for 20 x 5 MB before (each kept whole)."""
    before = await used_memory(redis_url)
    junk = "".join(f"{os.urandom(38).hex()}\r\n" for _ in range(1_500_000 // 78))
    for i in range(20):
        data = (
            f"From: someone@spam.example\r\nTo: {RETURN_PATH}\r\nSubject: hi {i}\r\n"
            f"Message-ID: <junk{i}@spam.example>\r\n\r\n{junk}"
        ).encode()
        code, reply = await smtp_send(brelay.inbound_port, "x@spam.example", [RETURN_PATH], data)
        assert code == 250, reply
        assert any(word in reply for word in ("ignored", "unrecognised", "unattributed")), reply
    grown = await used_memory(redis_url) - before
    assert grown < 1_000_000, f"Redis grew by {grown} bytes for 20 junk messages"
    assert metric(brelay, 'oneclick_inbound_audit_total{kept="digest"} 20.0')


async def test_attributed_bounce_is_kept_whole_within_the_budget(
    make_relay: Any, bounce_config: dict[str, Any], sink: Sink, redis_url: str
) -> None:
    size = len(dsn("x" * 2500, "<dsn0@mta.example.org>"))
    bounce_config["bounces"]["audit_max_bytes"] = int(size * 2.5)
    relay = await make_relay(bounce_config)
    client = aioredis.Redis.from_url(redis_url)
    try:
        for i in range(3):
            rcpt = f"r{i}@example.net"
            code, _ = await smtp_send(relay.smtp_port, "app@example.com", [rcpt], message(to=rcpt))
            assert code == 250
            [copy] = sink.handler.messages[i:]
            data = dsn("x" * 2500, f"<dsn{i}@mta.example.org>").replace(
                b"nobody@example.net", rcpt.encode()
            )
            code, reply = await smtp_send(relay.inbound_port, "", [copy.mail_from], data)
            assert code == 250 and "processed" in reply, reply
        kept = [await client.hget(f"ocr:inbound:{{{r}}}", "kept") for r in await ids(client)]
    finally:
        await client.aclose()
    assert sorted(kept) == [b"digest", b"full", b"full"]  # the third is over the budget
    assert metric(relay, 'oneclick_inbound_audit_total{kept="over-budget"} 1.0')


async def ids(client: aioredis.Redis) -> list[str]:
    return [i.decode() for i in await client.zrange("ocr:inbound", 0, -1)]


async def test_inbound_limits_size_recipients_rate_and_networks(
    make_relay: Any, bounce_config: dict[str, Any]
) -> None:
    bounce_config["bounces"]["max_messages_per_client"] = 2
    relay = await make_relay(bounce_config)
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 2200
    code, reply = await smtp_send(relay.inbound_port, "", [RETURN_PATH], big)
    assert (code, reply[:5]) == (552, "5.3.4"), reply
    code, reply = await smtp_send(relay.inbound_port, "", [RETURN_PATH] * 21, dsn("x"))
    assert (code, reply[:5]) == (452, "4.5.3"), reply
    code, reply = await smtp_send(relay.inbound_port, "", [RETURN_PATH], dsn("x"))
    assert (code, reply[:5]) == (451, "4.7.1"), reply
    assert metric(relay, 'oneclick_connections_refused_total{cap="rate",listener="inbound"} 1.0')


async def test_inbound_outside_allowed_networks_is_refused(
    make_relay: Any, bounce_config: dict[str, Any]
) -> None:
    bounce_config["bounces"]["allowed_networks"] = ["192.0.2.0/24"]
    relay = await make_relay(bounce_config)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.inbound_port)
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert line.startswith(b"554 5.7.1 "), line


async def test_inbound_offers_starttls(
    make_relay: Any, bounce_config: dict[str, Any], tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    bounce_config["bounces"]["tls"] = {"cert_file": str(cert), "key_file": str(key)}
    relay = await make_relay(bounce_config)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.inbound_port, tls_context=context, start_tls=False
    )
    await smtp.connect()
    await smtp.ehlo()
    assert smtp.supports_extension("starttls")
    await smtp.starttls()
    await smtp.ehlo()
    await smtp.mail("")
    await smtp.rcpt(RETURN_PATH)
    response = await smtp.data(dsn("x"))
    await smtp.quit()
    assert response.code == 250


# ---------------------------------------------------------------------------
# finding 4: slow and piled-up connections


async def test_partial_http_request_is_closed_by_the_header_timeout(
    make_relay: Any, config_dict: dict[str, Any]
) -> None:
    """A request head that never ends stayed open for an hour (aiohttp's default)."""
    config_dict["http"]["header_timeout"] = 0.5
    relay = await make_relay(config_dict)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.http_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 10)
    assert data == b""
    assert time.monotonic() - started < 5
    writer.close()


async def test_partial_http_body_is_answered_408(
    make_relay: Any, config_dict: dict[str, Any]
) -> None:
    config_dict["http"]["body_timeout"] = 0.5
    relay = await make_relay(config_dict)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.http_port)
    writer.write(
        b"POST /u/abc.defghijklmnopqrstuvwxyz HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nList-"
    )
    data = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]


async def test_http_connection_cap_answers_503(
    make_relay: Any, config_dict: dict[str, Any]
) -> None:
    config_dict["http"]["max_connections_per_client"] = 3
    relay = await make_relay(config_dict)
    idle = [await asyncio.open_connection("127.0.0.1", relay.http_port) for _ in range(3)]
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.http_port)
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), data
    assert data.endswith(b"Too many connections, please try again later.\r\n")
    for _, w in [*idle, (reader, writer)]:
        w.close()
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.http_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
    writer.close()
    assert metric(relay, 'oneclick_connections_refused_total{cap="client",listener="http"} 1.0')


async def test_smtp_connection_caps_answer_421(
    make_relay: Any, config_dict: dict[str, Any]
) -> None:
    config_dict["smtp"]["max_connections_per_client"] = 2
    relay = await make_relay(config_dict)
    idle = [await asyncio.open_connection("127.0.0.1", relay.smtp_port) for _ in range(2)]
    for reader, _ in idle:
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220 ")
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    line = await asyncio.wait_for(reader.readline(), 5)
    assert (
        line == b"421 4.7.0 relay.test too many connections from your address, try again later\r\n"
    )
    assert await reader.read() == b""
    for _, w in [*idle, (reader, writer)]:
        w.close()
    await asyncio.sleep(0.1)
    code, reply = await smtp_send(relay.smtp_port, "app@example.com", [ALICE], message())
    assert code == 250, reply
