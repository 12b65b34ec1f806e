"""mailto unsubscribe as Apple Mail and iOS Mail send it, end to end.

Real SMTP into the relay → the copy the capture upstream got → its mailto URI → a
request in Apple's format (empty Subject, stock body, ``Auto-Submitted:
auto-replied``, ``X-Apple-Unsubscribe: true``) over real SMTP into the real inbound
listener → the real Redis suppression store and the next message.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import Sink
from helpers import message, smtp_send

from relay.mail.mailto import code_in
from relay.runtime.app import Relay

ALICE = "alice@example.net"
BOB = "bob@example.org"
MAILTO_DOMAIN = "unsub-mail.example.com"


@pytest.fixture
async def mrelay(make_relay: Any, config_dict: dict[str, Any]) -> Relay:
    config_dict["bounces"] = {"listen": "127.0.0.1:0"}
    config_dict["unsubscribe"] = {"mailto_domain": MAILTO_DOMAIN}
    relay: Relay = await make_relay(config_dict)
    return relay


def list_unsubscribe(data: bytes) -> list[str]:
    m = re.search(rb"List-Unsubscribe: ([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", data)
    assert m is not None, data[:400]
    return m.group(1).decode().replace("\r\n", "").split(", ")


async def newsletter(relay: Relay, sink: Sink, rcpts: list[str]) -> dict[str, str]:
    """Relay one newsletter; each recipient's mailto address (with its code)."""
    before = len(sink.handler.messages)
    code, text = await smtp_send(relay.smtp_port, "app@example.com", rcpts, message())
    assert code == 250, text
    addresses = {}
    for copy in sink.handler.messages[before:]:
        uris = list_unsubscribe(copy.data)
        assert uris[0].startswith("<https://unsub.example.com/u/")  # Gmail takes the first
        m = re.fullmatch(r"<mailto:([^?>]+)\?subject=unsubscribe%20[\w.-]+>", uris[1])
        assert m is not None, uris
        [rcpt] = copy.rcpt_tos
        addresses[rcpt] = m.group(1)
    return addresses


def apple_request(sender: str, to: str, msgid: str) -> bytes:
    """What Apple Mail sends when the person presses Unsubscribe."""
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: \r\n"
        f"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{msgid}@icloud.example>\r\n"
        "Auto-Submitted: auto-replied\r\nX-Apple-Unsubscribe: true\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        'Apple Mail sent this email to unsubscribe from the message "Hello".\r\n'
    ).encode()


async def test_apple_mail_request_unsubscribes_that_recipient_from_that_group(
    mrelay: Relay, sink: Sink, redis_url: str
) -> None:
    addresses = await newsletter(mrelay, sink, [ALICE, BOB])
    assert addresses[ALICE] != addresses[BOB]
    for address in addresses.values():
        local, _, domain = address.partition("@")
        assert domain == MAILTO_DOMAIN and local.startswith("unsubscribe+")
        assert len(local) <= 64
    # From an address that is not the recipient's (an alias, a forwarding mailbox)
    request = apple_request("a.person@icloud.example", addresses[ALICE], "apple1")
    code, text = await smtp_send(
        mrelay.inbound_port, "a.person@icloud.example", [addresses[ALICE]], request
    )
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: processed")
    assert mrelay.store is not None
    [entry] = await mrelay.store.entries(ALICE)
    assert (entry.scope, entry.reason, entry.source) == ("g:newsletter", "unsubscribe", "mailto")
    assert await mrelay.store.entries(BOB) == []
    # the next newsletter skips Alice, reaches Bob; Alice's receipts still go out
    code, text = await smtp_send(mrelay.smtp_port, "app@example.com", [ALICE, BOB], message())
    assert "delivered 1, suppressed 1" in text
    code, text = await smtp_send(
        mrelay.smtp_port, "app@example.com", [ALICE], message(sender="receipts@example.com")
    )
    assert "delivered 1" in text and "suppressed" not in text
    # the same request again is idempotent (a duplicate by Message-ID), a new one too
    code, text = await smtp_send(mrelay.inbound_port, "", [addresses[ALICE]], request)
    assert text.split(" id=")[0] == "2.0.0 Ok: duplicate"
    again = apple_request(ALICE, addresses[ALICE], "apple2")
    code, text = await smtp_send(mrelay.inbound_port, ALICE, [addresses[ALICE]], again)
    assert text.split(" id=")[0] == "2.0.0 Ok: processed"
    assert len(await mrelay.store.entries(ALICE)) == 1
    # the record behind the code lives as long as a token (tokens.max_age_days: 60)
    client = aioredis.Redis.from_url(redis_url)
    try:
        ttl = await client.ttl(f"ocr:mailto:{{{code_in(addresses[BOB])}}}")
    finally:
        await client.aclose()
    assert 60 * 86400 - 60 < ttl <= 60 * 86400


async def test_forged_and_altered_codes_change_nothing(mrelay: Relay, sink: Sink) -> None:
    addresses = await newsletter(mrelay, sink, [ALICE])
    real = code_in(addresses[ALICE])
    assert real is not None
    forged = [
        ("a" if real[0] != "a" else "b") + real[1:],  # one character altered
        "abcdefghijklmnop",  # made up
        real[::-1],
    ]
    for n, fake in enumerate(forged):
        address = f"unsubscribe+{fake}@{MAILTO_DOMAIN}"
        request = apple_request(ALICE, address, f"forged{n}")
        code, text = await smtp_send(mrelay.inbound_port, ALICE, [address], request)
        assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: invalid-token"), fake
    # a request to the plain address with Apple's empty Subject has nothing to go by
    plain = f"unsubscribe@{MAILTO_DOMAIN}"
    code, text = await smtp_send(
        mrelay.inbound_port, ALICE, [plain], apple_request(ALICE, plain, "plain")
    )
    assert text.split(" id=")[0] == "2.0.0 Ok: no-token"
    assert mrelay.store is not None
    assert await mrelay.store.entries(ALICE) == []
    rendered = mrelay.metrics.render().decode()
    assert 'oneclick_inbound_messages_total{kind="mailto",outcome="invalid-token"} 3.0' in rendered


async def test_without_redis_the_copy_keeps_a_mailto_without_code(
    mrelay: Relay, sink: Sink, config_dict: dict[str, Any]
) -> None:
    """The suppression lookup may deliver without Redis (redis.on_error); mailto then falls
    back to the token in the subject rather than holding the message."""
    assert mrelay.store is not None
    codes = mrelay.handler.pipeline._mailto if mrelay.handler else None
    assert codes is not None
    dead = aioredis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens there
    codes._records._redis = dead
    try:
        addresses = await newsletter(mrelay, sink, [ALICE])
    finally:
        await dead.aclose()
    assert addresses[ALICE] == f"unsubscribe@{MAILTO_DOMAIN}"
    rendered = mrelay.metrics.render().decode()
    assert 'oneclick_redis_errors_total{action="mailto-without-code"} 1.0' in rendered
