"""Never a 4xx after a copy was accepted: an upstream without SMTPUTF8 (a real aiosmtpd
server that does not advertise it) and a retry queue that cannot be written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP
from conftest import Sink
from helpers import build_config, message, smtp_send

from relay.cli.sink import CaptureHandler
from relay.runtime.app import Relay
from relay.store.embedded import EmbeddedRedis

ALICE, BOB = "alice@example.net", "bob@example.org"
DOERTE = "dörte@bücher.example"


@pytest.fixture
async def ascii_sink() -> AsyncIterator[tuple[CaptureHandler, int]]:
    """An upstream like Exim, or Postfix with smtputf8_enable=no: no SMTPUTF8 in EHLO."""
    handler = CaptureHandler()
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(handler, enable_SMTPUTF8=False, hostname="ascii.local"), "127.0.0.1", 0
    )
    yield handler, server.sockets[0].getsockname()[1]
    server.close()


async def send_utf8(port: int, rcpts: list[str], data: bytes) -> tuple[int, str, dict[str, str]]:
    """A client that offers SMTPUTF8: the DATA reply and each refused RCPT's reply."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=15)
    await client.connect()
    refused: dict[str, str] = {}
    try:
        await client.mail("app@example.com", options=["SMTPUTF8"], encoding="utf-8")
        for rcpt in rcpts:
            try:
                await client.rcpt(rcpt, encoding="utf-8")
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused[rcpt] = f"{exc.code} {exc.message}"
        if len(refused) == len(rcpts):
            return 0, "", refused
        try:
            response = await client.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message, refused
        return response.code, response.message, refused
    finally:
        await client.quit()


@pytest.mark.parametrize("sender", ["news@example.com", "receipts@example.com"])
async def test_utf8_recipient_refused_5_6_7_others_delivered_once(
    make_relay: Any,
    config_dict: dict[str, Any],
    ascii_sink: tuple[CaptureHandler, int],
    sender: str,
) -> None:
    handler, port = ascii_sink
    config_dict["upstream"]["port"] = port
    relay: Relay = await make_relay(config_dict)
    rcpts = [ALICE, DOERTE, BOB]
    # first message: the upstream's capabilities are not known at RCPT yet
    code, text, refused = await send_utf8(relay.smtp_port, rcpts, message(sender))
    assert refused == {}
    assert code == 250, text
    assert "delivered 2" in text and "refused 1" in text, text
    assert sorted(r for m in handler.messages for r in m.rcpt_tos) == [ALICE, BOB]
    assert relay.retry is not None and await relay.retry.list() == []  # permanent: not retried
    # now they are: the UTF-8 recipient is refused at RCPT, the others go on
    code, text, refused = await send_utf8(relay.smtp_port, rcpts, message(sender))
    assert list(refused) == [DOERTE]
    assert refused[DOERTE].startswith("553 5.6.7"), refused
    assert code == 250 and "delivered 2" in text, text
    assert sorted(r for m in handler.messages for r in m.rcpt_tos) == [ALICE, ALICE, BOB, BOB]
    # ASCII-only mail is unaffected
    code, text = await smtp_send(relay.smtp_port, "app@example.com", [ALICE], message(sender))
    assert code == 250, text


async def test_only_utf8_recipients_get_the_permanent_refusal(
    make_relay: Any, config_dict: dict[str, Any], ascii_sink: tuple[CaptureHandler, int]
) -> None:
    handler, port = ascii_sink
    config_dict["upstream"]["port"] = port
    relay: Relay = await make_relay(config_dict)
    code, text, _ = await send_utf8(relay.smtp_port, [DOERTE], message())
    assert (code, text[:5]) == (553, "5.6.7"), text  # permanent: the client does not retry
    assert handler.messages == []


async def test_retry_queue_down_after_an_acceptance_is_250_never_451(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink
) -> None:
    """Transactional mail is delivered with Redis down; a deferred recipient cannot be
    queued, so it is refused in the reply instead of a 451 that would resend Alice's copy."""
    server = EmbeddedRedis().start()
    try:
        config_dict["redis"]["url"] = server.url
        sink.handler.rcpt_replies[BOB] = "451 4.2.0 try later"
        relay: Relay = await make_relay(config_dict)
        server.kill()
        code, text = await smtp_send(
            relay.smtp_port, "app@example.com", [ALICE, BOB], message("receipts@example.com")
        )
        assert code == 250, text
        assert "delivered 1" in text and "refused 1" in text, text
        assert [m.rcpt_tos for m in sink.handler.messages] == [(ALICE,)]
        assert 'oneclick_retry_queue_events_total{event="not-queued"} 1.0' in (
            relay.metrics.render().decode()
        )
    finally:
        server.stop()


async def test_retry_worker_refuses_a_queued_utf8_copy_permanently(
    make_relay: Any, config_dict: dict[str, Any], ascii_sink: tuple[CaptureHandler, int]
) -> None:
    handler, port = ascii_sink
    config_dict["upstream"]["port"] = port
    relay: Relay = await make_relay(config_dict)
    assert relay.retry is not None and relay.retry_worker is not None
    await relay.retry.put("app@example.com", DOERTE, message().replace(b"\n", b"\r\n"), "451")
    for _ in range(50):
        if not await relay.retry.list():
            break
        await asyncio.sleep(0.1)
    assert await relay.retry.list() == []
    assert 'oneclick_retry_queue_events_total{event="refused"} 1.0' in (
        relay.metrics.render().decode()
    )
    assert handler.messages == []
    assert build_config(config_dict).upstream.port == port
