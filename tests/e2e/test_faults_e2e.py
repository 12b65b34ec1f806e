"""Real faults: an upstream that drops mid fan-out, Redis killed and restarted, and what the
relay does about unsigned marketing mail; plus secrets and tokens never reaching the logs."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from conftest import Keys, Sink
from helpers import message, smtp_send

from relay.cli.sink import CaptureHandler
from relay.runtime.app import Relay
from relay.store.embedded import EmbeddedRedis


class DroppingHandler(CaptureHandler):
    """Accepts ``accept`` messages, then drops the connection on the next DATA, once."""

    def __init__(self, accept: int) -> None:
        super().__init__()
        self.accept = accept
        self.dropped = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if len(self.messages) == self.accept and not self.dropped:
            self.dropped += 1
            assert server.transport is not None
            server.transport.abort()
            return "451 4.3.0 never seen"
        return await super().handle_DATA(server, session, envelope)


async def test_drop_mid_fanout_never_duplicates_and_never_loses(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink
) -> None:
    dropping = DroppingHandler(accept=2)
    sink.handler = dropping
    await sink.stop()
    await sink.restart()
    config_dict["upstream"]["connections"] = 1
    relay = await make_relay(config_dict)
    rcpts = [f"user{i}@example.net" for i in range(5)]
    code, text = await smtp_send(relay.smtp_port, "news@example.com", rcpts, message())
    assert code == 250, text
    assert "queued 1" in text
    for _ in range(60):
        if len(dropping.messages) == 5:
            break
        await asyncio.sleep(0.1)
    delivered = [m.rcpt_tos[0] for m in dropping.messages]
    assert sorted(delivered) == rcpts  # every recipient exactly once
    assert dropping.dropped == 1
    assert relay.retry is not None
    assert await relay.retry.list() == []


async def test_redis_killed_and_restarted_without_relay_restart(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink
) -> None:
    server = EmbeddedRedis().start()
    try:
        config_dict["redis"]["url"] = server.url
        relay = await make_relay(config_dict)
        assert relay.store is not None
        await relay.store.add("alice@example.net", "g:newsletter", "unsubscribe", "test")
        server.kill()
        code, text = await smtp_send(
            relay.smtp_port, "news@example.com", ["bob@example.org"], message()
        )
        assert (code, text[:5]) == (451, "4.3.0")
        code, _ = await smtp_send(
            relay.smtp_port,
            "x@example.com",
            ["bob@example.org"],
            message(sender="receipts@example.com"),
        )
        assert code == 250
        server.start()  # same port, empty: a real restart without persistence
        await relay.store.add("alice@example.net", "g:newsletter", "unsubscribe", "test")
        code, text = await smtp_send(
            relay.smtp_port,
            "news@example.com",
            ["alice@example.net", "bob@example.org"],
            message(),
        )
        assert code == 250, text
        assert "suppressed 1" in text
        assert 'oneclick_redis_errors_total{action="tempfail"} 1.0' in (
            relay.metrics.render().decode()
        )
    finally:
        server.stop()


async def test_marketing_without_key_is_delivered_unsigned_and_counted(
    relay: Relay, sink: Sink
) -> None:
    sender = "deals@promo.other.org"  # no rule: transactional; no key for other.org
    code, _ = await smtp_send(relay.smtp_port, "x@other.org", ["a@example.net"], message(sender))
    assert code == 250
    assert b"DKIM-Signature" not in sink.handler.messages[-1].data
    assert 'oneclick_unsigned_messages_total{message_class="transactional"} 1.0' in (
        relay.metrics.render().decode()
    )


async def test_require_for_marketing_turns_unsigned_into_451(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink
) -> None:
    config_dict["dkim"] = {"require_for_marketing": True, "keys": config_dict["dkim"]}
    config_dict["policy"]["senders"].append(
        {"match": "*@other.org", "class": "marketing", "group": "other"}
    )
    relay = await make_relay(config_dict)
    sender = "news@other.org"
    code, text = await smtp_send(relay.smtp_port, sender, ["a@example.net"], message(sender))
    assert (code, text[:5]) == (451, "4.7.5")
    assert sink.handler.messages == []
    code, _ = await smtp_send(relay.smtp_port, "news@example.com", ["a@example.net"], message())
    assert code == 250


async def test_group_mailto_and_list_id(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink, keys: Keys
) -> None:
    config_dict["policy"]["groups"]["newsletter"].update(
        {"mailto": "unsubscribe@example.com", "list_id": "News <news.example.com>"}
    )
    relay = await make_relay(config_dict)
    await smtp_send(relay.smtp_port, "news@example.com", ["a@example.net"], message())
    data = sink.handler.messages[-1].data
    m = re.search(rb"List-Unsubscribe: (.*(?:\r\n[ \t].*)*)\r\n", data)
    assert m
    value = b" ".join(m.group(1).split())
    assert re.fullmatch(
        rb"<https://unsub\.example\.com/u/(k1\.[\w-]+)>, "
        rb"<mailto:unsubscribe\+[a-z2-7]{16}@example\.com\?subject=unsubscribe%20(k1\.[\w-]+)>",
        value,
    )
    assert b"List-Id: News <news.example.com>\r\n" in data
    import dkim

    assert dkim.verify(data, dnsfunc=keys.dnsfunc)


async def test_no_token_or_secret_in_logs(
    relay: Relay, sink: Sink, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="relay")
    await smtp_send(relay.smtp_port, "news@example.com", ["a@example.net"], message())
    token = re.search(rb"/u/(k1\.[\w-]+)>", sink.handler.messages[-1].data)
    assert token
    import aiohttp

    url = f"http://127.0.0.1:{relay.http_port}/u/{token.group(1).decode()}"
    async with aiohttp.ClientSession() as http, http.post(url, data=b"") as resp:
        assert resp.status == 200
    text = caplog.text
    assert "message id=" in text
    assert "unsubscribe rcpt=a@example.net" in text
    assert token.group(1).decode()[3:20] not in text
    assert keys.token_k1.read_text().strip()[:16] not in text
    assert "Hello there" not in text
    assert "Secret(***)" in repr(relay.config.tokens)


def _formatted(
    caplog: pytest.LogCaptureFixture, event: str
) -> tuple[list[str], list[dict[str, Any]]]:
    """The caplog records of ``event`` as the relay writes them, in text and in JSON."""
    from relay.runtime.logs import JsonFormatter, TextFormatter

    # chosen by their text, not by the fields' record attributes: the test reads the lines
    # as an operator's log pipeline would, whatever carries the fields
    records = [r for r in caplog.records if r.getMessage().startswith(event + " ")]
    assert records, f"no {event!r} line logged"
    text = [TextFormatter().format(r) for r in records]
    data = [json.loads(JsonFormatter().format(r)) for r in records]
    return text, data


async def test_forged_message_id_fields_stay_in_msgid(
    relay: Relay, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """A Message-ID of ``<z@z> id=0000 outcome=processed`` overwrote ``id`` in JSON logs."""
    caplog.set_level(logging.INFO, logger="relay")
    forged = "<z@z> id=0000 reply=250 \x1b[2Jclass=x"
    data = message().replace(b"Message-ID: <", f"Message-ID: {forged} <".encode(), 1)
    code, text = await smtp_send(relay.smtp_port, "news@example.com", ["a@example.net"], data)
    assert code == 250, text
    queue_id = text.rsplit("id=", 1)[1]
    lines, objects = _formatted(caplog, "message")
    (line,), (obj,) = lines, objects
    assert (obj["id"], obj["reply"], obj["class"]) == (queue_id, 250, "marketing")
    assert obj["msgid"].startswith("<z@z> id=0000 reply=250 \\x1b[2Jclass=x")
    assert f' message id={queue_id} msgid="<z@z> id=0000 reply=250 \\\\x1b[2Jclass=x' in line
    assert "\x1b" not in line + json.dumps(obj)
