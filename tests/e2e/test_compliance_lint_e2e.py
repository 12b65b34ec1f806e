"""The body-link lint end to end: marketing mail with neither the placeholder nor an https
link is counted (/metrics, the daily report) and, with ``compliance.require_body_link``,
refused ``550 5.7.0`` over real SMTP before anything is sent."""

from __future__ import annotations

import base64
from typing import Any

import redis.asyncio as aioredis
from conftest import Sink
from helpers import message, smtp_send

from relay.runtime.app import Relay
from relay.suppression.report import daily_report

ALICE = "alice@example.net"
FINDING = 'oneclick_compliance_findings_total{finding="no-body-link"}'


def b64_html(html: str) -> bytes:
    return (
        b"From: Example <news@example.com>\r\nTo: alice@example.net\r\nSubject: s\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(html.encode())
    )


def found(relay: Relay) -> float:
    for line in relay.metrics.render().decode().splitlines():
        if line.startswith(FINDING):
            return float(line.split()[-1])
    return 0.0


async def test_counted_by_default(relay: Relay, sink: Sink, redis_url: str) -> None:
    cases = [
        (message(body="No link at all.\r\n"), 1),
        (message(body="Read more at https://example.com/news\r\n"), 0),
        (message(body="Leave: %unsubscribe_url%\r\n"), 0),
        (b64_html('<a href="https://example.com/leave">leave</a>'), 0),  # only when decoded
        (b64_html("<p>nothing here</p>"), 1),
        (message(sender="receipts@example.com", body="Your receipt.\r\n"), 0),
    ]
    expected = 0
    for data, counted in cases:
        code, text = await smtp_send(relay.smtp_port, "app@example.com", [ALICE], data)
        assert code == 250, text  # counted, not refused
        expected += counted
        assert found(relay) == expected, data[-80:]
    await relay.counters.flush()
    client = aioredis.Redis.from_url(redis_url)
    try:
        rows = await daily_report(client, "ocr", 1)
    finally:
        await client.aclose()
    [row] = [r for r in rows if r.group == "newsletter"]
    assert row.as_dict()["no-body-link"] == 2


async def test_refused_when_required(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink
) -> None:
    config_dict["compliance"] = {"require_body_link": True}
    relay = await make_relay(config_dict)
    code, text = await smtp_send(
        relay.smtp_port, "app@example.com", [ALICE, "bob@example.org"], message(body="Hi.\r\n")
    )
    assert code == 550
    assert text.startswith("5.7.0 marketing mail needs a visible unsubscribe link:")
    assert "%unsubscribe_url%" in text and "unsubscribe.footer: true" in text
    assert sink.handler.messages == []
    assert found(relay) == 1
    code, _ = await smtp_send(
        relay.smtp_port, "app@example.com", [ALICE], message(body="Leave: %unsubscribe_url%\r\n")
    )
    assert code == 250
    code, _ = await smtp_send(
        relay.smtp_port, "app@example.com", [ALICE], message(sender="receipts@example.com")
    )
    assert code == 250  # transactional mail is not linted
    config_dict["unsubscribe"] = {"footer": True}
    footed = await make_relay(config_dict)
    code, _ = await smtp_send(footed.smtp_port, "app@example.com", [ALICE], message())
    assert code == 250  # the footer carries the link
