"""The relay end to end: real SMTP client → relay → real capture upstream, real Redis."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiosmtplib
import dkim
import pytest
from conftest import Keys, Sink
from helpers import message, smtp_send

from relay.runtime.app import Relay
from relay.suppression.store import GLOBAL, group_scope, sender_scope


def header(data: bytes, name: str) -> list[str]:
    pattern = rb"(?im)^" + name.encode() + rb":(.*(?:\r\n[ \t].*)*)"
    return [" ".join(m.decode().split()) for m in re.findall(pattern, data)]


async def test_transactional_passes_unchanged_but_traced_and_signed(
    relay: Relay, sink: Sink, keys: Keys
) -> None:
    data = message(sender="receipts@example.com", to="alice@example.net, bob@example.org")
    code, text = await smtp_send(
        relay.smtp_port, "bounce@example.com", ["alice@example.net", "bob@example.org"], data
    )
    assert code == 250, text
    assert "delivered 2" in text
    [got] = sink.handler.messages
    assert got.mail_from == "bounce@example.com"
    assert set(got.rcpt_tos) == {"alice@example.net", "bob@example.org"}
    assert header(got.data, "List-Unsubscribe") == []
    assert got.data.startswith(b"DKIM-Signature:")
    assert header(got.data, "Received")[0].startswith("from ")
    assert dkim.verify(got.data, dnsfunc=keys.dnsfunc)
    assert got.data.endswith(data.split(b"\r\n\r\n", 1)[1])


async def test_marketing_fans_out_with_distinct_urls(relay: Relay, sink: Sink, keys: Keys) -> None:
    rcpts = ["alice@example.net", "bob@example.org", "carol@example.com"]
    code, text = await smtp_send(relay.smtp_port, "news@example.com", rcpts, message())
    assert code == 250, text
    assert len(sink.handler.messages) == 3
    urls = set()
    for got in sink.handler.messages:
        assert len(got.rcpt_tos) == 1
        [lu] = header(got.data, "List-Unsubscribe")
        [post] = header(got.data, "List-Unsubscribe-Post")
        assert post == "List-Unsubscribe=One-Click"
        assert lu.startswith("<https://unsub.example.com/u/k1.")
        assert got.rcpt_tos[0] not in lu
        urls.add(lu)
        d = dkim.DKIM(got.data)
        assert d.verify(dnsfunc=keys.dnsfunc)
        signed = d.signature_fields[b"h"].decode().split(":")
        assert "list-unsubscribe" in signed
        assert "list-unsubscribe-post" in signed
    assert len(urls) == 3


async def test_app_supplied_list_headers_are_replaced(relay: Relay, sink: Sink) -> None:
    extra = "List-Unsubscribe: <https://app.example.com/unsub?u=1>\r\nList-Unsubscribe-Post: x\r\n"
    code, _ = await smtp_send(
        relay.smtp_port, "news@example.com", ["alice@example.net"], message(extra=extra)
    )
    assert code == 250
    [got] = sink.handler.messages
    [lu] = header(got.data, "List-Unsubscribe")
    assert "app.example.com" not in lu
    assert header(got.data, "List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]


async def test_keep_app_unsubscribe_switch(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink
) -> None:
    config_dict["policy"]["senders"][0]["keep_app_unsubscribe"] = True
    relay = await make_relay(config_dict)
    extra = "List-Unsubscribe: <https://app.example.com/unsub?u=1>\r\n"
    code, _ = await smtp_send(
        relay.smtp_port,
        "news@example.com",
        ["alice@example.net", "bob@example.org"],
        message(extra=extra),
    )
    assert code == 250
    [got] = sink.handler.messages  # not split: the application's URL is per message
    assert header(got.data, "List-Unsubscribe") == ["<https://app.example.com/unsub?u=1>"]
    assert header(got.data, "List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]


async def test_suppressed_recipients_dropped_others_delivered(relay: Relay, sink: Sink) -> None:
    assert relay.store is not None
    await relay.store.add("Alice@Example.NET", group_scope("newsletter"), "unsubscribe", "test")
    code, text = await smtp_send(
        relay.smtp_port,
        "news@example.com",
        ["alice@example.net", "bob@example.org"],
        message(),
    )
    assert code == 250
    assert "suppressed 1" in text
    assert [m.rcpt_tos for m in sink.handler.messages] == [("bob@example.org",)]
    metrics = relay.metrics.render().decode()
    assert 'oneclick_recipients_suppressed_total{reason="unsubscribe"} 1.0' in metrics


async def test_all_suppressed_is_250_with_count(relay: Relay, sink: Sink) -> None:
    assert relay.store is not None
    for rcpt in ("alice@example.net", "bob@example.org"):
        await relay.store.add(rcpt, GLOBAL, "hard-bounce", "test")
    code, text = await smtp_send(
        relay.smtp_port, "news@example.com", ["alice@example.net", "bob@example.org"], message()
    )
    assert code == 250
    assert "all 2 recipient(s) suppressed" in text
    assert sink.handler.messages == []


async def test_unsubscribe_never_blocks_transactional(relay: Relay, sink: Sink) -> None:
    assert relay.store is not None
    await relay.store.add("alice@example.net", GLOBAL, "unsubscribe", "test")
    await relay.store.add("alice@example.net", group_scope("newsletter"), "unsubscribe", "test")
    code, _ = await smtp_send(
        relay.smtp_port,
        "receipts@example.com",
        ["alice@example.net"],
        message(sender="receipts@example.com"),
    )
    assert code == 250
    assert len(sink.handler.messages) == 1


async def test_hard_bounce_blocks_transactional(relay: Relay, sink: Sink) -> None:
    assert relay.store is not None
    await relay.store.add("alice@example.net", GLOBAL, "complaint", "test")
    code, text = await smtp_send(
        relay.smtp_port,
        "receipts@example.com",
        ["alice@example.net"],
        message(sender="receipts@example.com"),
    )
    assert (code, sink.handler.messages) == (250, [])
    assert "suppressed" in text


async def test_group_unsubscribe_does_not_block_other_group(relay: Relay, sink: Sink) -> None:
    assert relay.store is not None
    await relay.store.add("alice@example.net", group_scope("newsletter"), "unsubscribe", "test")
    code, _ = await smtp_send(
        relay.smtp_port,
        "deals@promo.example.com",
        ["alice@example.net"],
        message(sender="deals@promo.example.com"),
    )
    assert code == 250
    assert len(sink.handler.messages) == 1


async def test_sender_scope_blocks_only_that_sender(relay: Relay, sink: Sink) -> None:
    assert relay.store is not None
    await relay.store.add("alice@example.net", sender_scope("news@example.com"), "manual", "t")
    code, _ = await smtp_send(relay.smtp_port, "x@example.com", ["alice@example.net"], message())
    assert code == 250
    assert sink.handler.messages == []
    code, _ = await smtp_send(
        relay.smtp_port,
        "x@example.com",
        ["alice@example.net"],
        message(sender="deals@promo.example.com"),
    )
    assert len(sink.handler.messages) == 1


async def test_upstream_down_is_451_and_relay_keeps_serving(relay: Relay, sink: Sink) -> None:
    await sink.stop()
    code, text = await smtp_send(
        relay.smtp_port, "news@example.com", ["alice@example.net"], message()
    )
    assert code == 451
    assert text.startswith("4.4.1")
    await sink.restart()
    code, _ = await smtp_send(relay.smtp_port, "news@example.com", ["alice@example.net"], message())
    assert code == 250
    assert len(sink.handler.messages) == 1


async def test_upstream_permanent_refusal_is_passed_on(relay: Relay, sink: Sink) -> None:
    sink.handler.rcpt_replies["alice@example.net"] = "550 5.1.1 no such user here"
    code, text = await smtp_send(
        relay.smtp_port,
        "receipts@example.com",
        ["alice@example.net"],
        message(sender="receipts@example.com"),
    )
    assert code == 550
    assert text.startswith("5.1.1")
    assert "no such user here" in text


async def test_upstream_tempfail_is_451_with_upstream_reason(relay: Relay, sink: Sink) -> None:
    sink.handler.reply = "452 4.3.1 insufficient system storage"
    code, text = await smtp_send(
        relay.smtp_port,
        "receipts@example.com",
        ["alice@example.net"],
        message(sender="receipts@example.com"),
    )
    assert code == 452
    assert text.startswith("4.3.1")


async def test_partial_refusal_transactional(relay: Relay, sink: Sink) -> None:
    sink.handler.rcpt_replies["bob@example.org"] = "550 5.1.1 unknown"
    code, text = await smtp_send(
        relay.smtp_port,
        "receipts@example.com",
        ["alice@example.net", "bob@example.org"],
        message(sender="receipts@example.com"),
    )
    assert code == 250
    assert "refused 1" in text
    [got] = sink.handler.messages
    assert got.rcpt_tos == ("alice@example.net",)


async def test_partial_tempfail_in_fanout_goes_to_retry_queue(relay: Relay, sink: Sink) -> None:
    sink.handler.rcpt_replies["bob@example.org"] = "451 4.2.0 try later"
    code, text = await smtp_send(
        relay.smtp_port, "news@example.com", ["alice@example.net", "bob@example.org"], message()
    )
    assert code == 250
    assert "queued 1" in text
    assert relay.retry is not None
    [item] = await relay.retry.list()
    assert item.rcpt == "bob@example.org"
    del sink.handler.rcpt_replies["bob@example.org"]
    for _ in range(50):
        if len(sink.handler.messages) == 2:
            break
        await asyncio.sleep(0.1)
    assert sorted(m.rcpt_tos[0] for m in sink.handler.messages) == [
        "alice@example.net",
        "bob@example.org",
    ]
    assert await relay.retry.list() == []


async def test_client_outside_allowed_networks_is_refused(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink
) -> None:
    config_dict["smtp"]["allowed_networks"] = ["10.0.0.0/8"]
    relay = await make_relay(config_dict)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_port, timeout=5)
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
        await client.connect()
    assert refused.value.code == 554
    assert "5.7.1" in refused.value.message
    assert sink.handler.messages == []


async def test_message_without_from_is_550(relay: Relay, sink: Sink) -> None:
    data = b"To: alice@example.net\r\nSubject: no from\r\n\r\nbody\r\n"
    code, text = await smtp_send(relay.smtp_port, "a@example.com", ["alice@example.net"], data)
    assert code == 550
    assert text.startswith("5.6.0")
    assert "From" in text
    assert sink.handler.messages == []


async def test_too_many_recipients_is_452(relay: Relay) -> None:
    rcpts = [f"user{i}@example.net" for i in range(51)]
    code, text = await smtp_send(relay.smtp_port, "news@example.com", rcpts, message())
    assert code == 452
    assert text.startswith("4.5.3")


async def test_oversize_is_552(relay: Relay, sink: Sink) -> None:
    big = message(body="x" * 900 + "\r\n") * 1300
    code, text = await smtp_send(relay.smtp_port, "news@example.com", ["a@example.net"], big)
    assert code == 552, text
    assert sink.handler.messages == []


async def test_ehlo_advertises_pipelining_and_enhanced_codes(relay: Relay) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_port, timeout=5)
    await client.connect()
    try:
        assert client.supports_extension("pipelining")
        assert client.supports_extension("enhancedstatuscodes")
        assert client.supports_extension("size")
        response = await client.noop()
        assert response.message.startswith("2.0.0")
    finally:
        await client.quit()


async def test_redis_down_marketing_tempfails_transactional_delivers(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink
) -> None:
    from relay.store.embedded import free_port

    config_dict["redis"]["url"] = f"redis://127.0.0.1:{free_port()}/0"
    relay = await make_relay(config_dict)
    code, text = await smtp_send(relay.smtp_port, "news@example.com", ["a@example.net"], message())
    assert code == 451
    assert text.startswith("4.3.0")
    code, _ = await smtp_send(
        relay.smtp_port, "x@example.com", ["a@example.net"], message(sender="receipts@example.com")
    )
    assert code == 250
    assert len(sink.handler.messages) == 1
