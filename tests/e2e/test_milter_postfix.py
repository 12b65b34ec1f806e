"""Milter mode inside a real, private Postfix: what a receiver gets, verified by Mail::DKIM.

Fixture ``milter_stack``: the relay with only its milter listener (``smtp.listen``
null), a private Postfix (``tests/postfix.py``) whose smtpd runs it as
``smtpd_milters`` and relays to the capture sink, and a second Postfix listener
without milters as the relay's ``upstream`` for re-injected copies.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Keys, Sink
from helpers import message, smtp_send
from postfix import Postfix, free_port, own_folder, postfix_binary
from test_signing import perl_dkim, perl_results  # noqa: F401 (fixture)

from relay.runtime.app import Relay
from relay.store.embedded import EmbeddedRedis
from relay.suppression.store import group_scope


@dataclass
class Stack:
    relay: Relay
    postfix: Postfix
    sink: Sink

    async def delivered(self, count: int, timeout: float = 20.0) -> list[Any]:
        """Wait until the sink holds ``count`` messages, then a moment for any extra."""
        deadline = time.monotonic() + timeout
        messages = self.sink.handler.messages
        # Postfix delivers on its own time: poll the sink.
        while len(messages) < count and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        return list(self.sink.handler.messages)


@pytest.fixture
async def milter_stack(
    tmp_path: Path,
    sink: Sink,
    config_dict: dict[str, Any],
    make_relay: Callable[[dict[str, Any]], Awaitable[Relay]],
) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    if postfix_binary() is None:
        pytest.fail("Postfix is required: bash tests/run installs it", pytrace=False)
    started: list[Postfix] = []
    folders: list[Path] = []

    async def factory(
        *, redis_url: str | None = None, upstream_port: int | None = None, **milter: Any
    ) -> Stack:
        raw = dict(config_dict)
        if redis_url is not None:
            raw["redis"] = {**config_dict["redis"], "url": redis_url}
        raw["smtp"] = {**config_dict["smtp"], "listen": None}
        raw["milter"] = {"listen": "127.0.0.1:0", **milter}
        folder = own_folder()
        folders.append(folder)
        # The milter's port is known only once it listens; Postfix's ports are picked first.
        postfix = Postfix(folder, sink.port, milters="")
        raw["upstream"] = {
            **config_dict["upstream"],
            "port": upstream_port or postfix.reinject_port,
        }
        relay = await make_relay(raw)
        postfix.milters = f"inet:127.0.0.1:{relay.milter_port}"
        await asyncio.to_thread(postfix.start)
        started.append(postfix)
        return Stack(relay, postfix, sink)

    yield factory
    for postfix in started:
        await asyncio.to_thread(postfix.stop)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


MakeStack = Callable[..., Awaitable[Stack]]
URL = re.compile(rb"List-Unsubscribe: <(https://unsub\.example\.com/u/[^>]+)>")


def one_click_urls(data: bytes) -> list[bytes]:
    return URL.findall(data.replace(b"\r\n ", b" "))


@pytest.mark.usefixtures("perl_dkim")
async def test_marketing_to_two_recipients_two_personal_signed_copies(
    milter_stack: MakeStack, keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    stack = await milter_stack()
    rcpts = ["alice@example.net", "bob@example.org"]
    code, text = await smtp_send(stack.postfix.smtpd_port, "news@example.com", rcpts, message())
    assert code == 250, text
    queue_id = text.rsplit(" ", 1)[-1]  # "Ok: queued as 433C820C9E6"
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("message ")]
    assert f"id={queue_id} " in line  # the relay's log line joins Postfix's
    assert "class=marketing" in line and "rcpts=2" in line and "copies=2" in line
    got = await stack.delivered(2)
    assert sorted(m.rcpt_tos for m in got) == [("alice@example.net",), ("bob@example.org",)]
    dns = keys.write_dns_file(tmp_path / "dns.txt")
    urls = []
    for captured in got:
        found = one_click_urls(captured.data)
        assert len(found) == 1, captured.data.decode()
        urls.append(found[0])
        assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in captured.data
        (verdict,) = perl_results(captured.data, dns)
        assert verdict.result == "pass", verdict
        assert {"list-unsubscribe", "list-unsubscribe-post", "from"} <= set(verdict.h)
    assert urls[0] != urls[1]  # a token per recipient
    # Postfix's own Received field is hidden from milters; the signature sits on top.
    in_place = next(m for m in got if m.rcpt_tos == ("alice@example.net",))
    assert in_place.data.startswith(b"DKIM-Signature:")
    assert stack.postfix.queued() == 0


@pytest.mark.usefixtures("perl_dkim")
async def test_suppressed_recipient_removed_and_all_suppressed_discarded(
    milter_stack: MakeStack, keys: Keys, tmp_path: Path
) -> None:
    stack = await milter_stack()
    assert stack.relay.store is not None
    await stack.relay.store.add("bob@example.org", group_scope("newsletter"), "unsubscribe", "t")
    rcpts = ["alice@example.net", "bob@example.org"]
    code, text = await smtp_send(stack.postfix.smtpd_port, "news@example.com", rcpts, message())
    assert code == 250, text
    (captured,) = await stack.delivered(1)
    assert captured.rcpt_tos == ("alice@example.net",)
    (verdict,) = perl_results(captured.data, keys.write_dns_file(tmp_path / "dns.txt"))
    assert verdict.result == "pass"

    stack.sink.handler.messages.clear()
    code, text = await smtp_send(
        stack.postfix.smtpd_port, "news@example.com", ["bob@example.org"], message()
    )
    assert code == 250, text  # discarded, as in relay mode: the client is not told
    assert await stack.delivered(1, timeout=2) == []
    assert "discard" in stack.postfix.maillog()
    metrics = stack.relay.metrics.render().decode()
    assert 'oneclick_messages_total{message_class="marketing",outcome="suppressed"} 1.0' in metrics


@pytest.mark.usefixtures("perl_dkim")
async def test_transactional_to_two_recipients_one_signed_message(
    milter_stack: MakeStack, keys: Keys, tmp_path: Path
) -> None:
    stack = await milter_stack()
    assert stack.relay.store is not None
    await stack.relay.store.add("bob@example.org", group_scope("newsletter"), "unsubscribe", "t")
    rcpts = ["alice@example.net", "bob@example.org"]
    data = message(sender="receipts@example.com")
    code, text = await smtp_send(stack.postfix.smtpd_port, "receipts@example.com", rcpts, data)
    assert code == 250, text
    (captured,) = await stack.delivered(1)
    assert sorted(captured.rcpt_tos) == rcpts  # an unsubscribe never blocks a receipt
    assert b"List-Unsubscribe" not in captured.data
    (verdict,) = perl_results(captured.data, keys.write_dns_file(tmp_path / "dns.txt"))
    assert verdict.result == "pass"
    assert captured.data.count(b"DKIM-Signature:") == 1


async def test_milter_down_tempfails_and_delivers_nothing(tmp_path: Path, sink: Sink) -> None:
    if postfix_binary() is None:
        pytest.fail("Postfix is required: bash tests/run installs it", pytrace=False)
    folder = own_folder()
    postfix = Postfix(folder, sink.port, milters=f"inet:127.0.0.1:{free_port()}")
    try:
        await asyncio.to_thread(postfix.start)
        code, text = await smtp_send(
            postfix.smtpd_port, "news@example.com", ["alice@example.net"], message()
        )
        assert 400 <= code < 500, (code, text)
        await asyncio.sleep(1)
        assert sink.handler.messages == []
        assert postfix.queued() == 0
    finally:
        await asyncio.to_thread(postfix.stop)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.usefixtures("perl_dkim")
async def test_redis_down_marketing_tempfails_transactional_signed(
    milter_stack: MakeStack, keys: Keys, tmp_path: Path
) -> None:
    server = EmbeddedRedis().start()
    try:
        stack = await milter_stack(redis_url=server.url)
        server.kill()
        port = stack.postfix.smtpd_port
        rcpts = ["alice@example.net", "bob@example.org"]
        code, text = await smtp_send(port, "news@example.com", rcpts, message())
        assert (code, text[:5]) == (451, "4.3.0"), text
        code, text = await smtp_send(
            port, "receipts@example.com", rcpts, message(sender="receipts@example.com")
        )
        assert code == 250, text
        (captured,) = await stack.delivered(1)
        assert b"List-Unsubscribe" not in captured.data
        (verdict,) = perl_results(captured.data, keys.write_dns_file(tmp_path / "dns.txt"))
        assert verdict.result == "pass"
    finally:
        server.stop()


async def test_reinjection_failure_tempfails_the_whole_message(
    milter_stack: MakeStack,
) -> None:
    stack = await milter_stack(upstream_port=free_port())  # nothing listens there
    port = stack.postfix.smtpd_port
    rcpts = ["alice@example.net", "bob@example.org"]
    code, text = await smtp_send(port, "news@example.com", rcpts, message())
    assert (code, text[:5]) == (451, "4.4.0"), text
    assert await stack.delivered(1, timeout=2) == []
    # One recipient needs no re-injection: signed in place.
    code, text = await smtp_send(port, "news@example.com", rcpts[:1], message())
    assert code == 250, text
    assert len(await stack.delivered(1)) == 1


async def test_multi_recipient_tempfail_one_marketing_recipient_per_transaction(
    milter_stack: MakeStack,
) -> None:
    stack = await milter_stack(multi_recipient="tempfail")
    port = stack.postfix.smtpd_port
    code, text = await smtp_send(
        port, "news@example.com", ["alice@example.net", "bob@example.org"], message()
    )
    assert (code, text[:5]) == (452, "4.5.3"), text
    for rcpt in ("alice@example.net", "bob@example.org"):
        code, text = await smtp_send(port, "news@example.com", [rcpt], message())
        assert code == 250, text
    got = await stack.delivered(2)
    assert sorted(m.rcpt_tos for m in got) == [("alice@example.net",), ("bob@example.org",)]
    # Transactional senders are not limited.
    stack.sink.handler.messages.clear()
    code, text = await smtp_send(
        port,
        "receipts@example.com",
        ["alice@example.net", "bob@example.org"],
        message(sender="receipts@example.com"),
    )
    assert code == 250, text
    assert len(await stack.delivered(1)) == 1
