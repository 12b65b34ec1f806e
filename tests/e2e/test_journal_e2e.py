"""The unsubscribe journal end to end: Redis stopped by the test, the request answered 200
from the local journal, the relay restarted, Redis back, the suppression there."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
from conftest import Sink
from helpers import build_config, message, smtp_send

from relay.runtime.app import Relay
from relay.store.embedded import EmbeddedRedis

ALICE, BOB = "alice@example.net", "bob@example.org"


def token_of(data: bytes) -> str:
    m = re.search(rb"List-Unsubscribe: <https://unsub\.example\.com/u/([^>]+)>", data)
    assert m, data[:400]
    return m.group(1).decode()


async def tokens_for(relay: Relay, sink: Sink, rcpts: list[str]) -> dict[str, str]:
    before = len(sink.handler.messages)
    code, text = await smtp_send(relay.smtp_port, "news@example.com", rcpts, message())
    assert code == 250, text
    return {m.rcpt_tos[0]: token_of(m.data) for m in sink.handler.messages[before:]}


async def post(relay: Relay, token: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{relay.http_port}/u/{token}",
            data="List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as resp,
    ):
        return resp.status, await resp.text()


async def health(relay: Relay) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{relay.http_port}/healthz") as resp,
    ):
        return resp.status, await resp.json()


async def until(check: Any, seconds: float = 15) -> None:
    for _ in range(int(seconds * 10)):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def test_post_while_redis_is_down_survives_a_relay_restart(
    config_dict: dict[str, Any], sink: Sink, tmp_path: Path
) -> None:
    server = EmbeddedRedis().start()
    relays: list[Relay] = []
    try:
        config_dict["redis"]["url"] = server.url
        first = Relay(build_config(config_dict))
        await first.start()
        relays.append(first)
        tokens = await tokens_for(first, sink, [ALICE, BOB])

        server.kill()
        status, text = await post(first, tokens[ALICE])
        assert (status, text.strip()) == (200, "Unsubscribed from Example News."), text
        status, body = await health(first)
        assert status == 503 and body["redis"] == "unreachable"
        assert body["journal_pending"] == 1
        journal = Path(config_dict["state_dir"]) / "unsubscribe.journal"
        assert ALICE in journal.read_text()
        rendered = first.metrics.render().decode()
        assert 'oneclick_unsubscribe_journal_total{event="written"} 1.0' in rendered

        await first.stop()  # a restart while Redis is still away: the journal is on disk
        relays.remove(first)
        second = Relay(build_config(config_dict))
        await second.start()
        relays.append(second)
        assert (await health(second))[1]["journal_pending"] == 1

        server.start()  # same port, empty: only the journal can bring the suppression back
        store = second.store
        assert store is not None

        async def suppressed() -> bool:
            try:
                return [e.scope for e in await store.entries(ALICE)] == ["g:newsletter"]
            except Exception:
                return False

        await until(suppressed)
        [entry] = await store.entries(ALICE)
        assert (entry.reason, entry.source) == ("unsubscribe", "post")
        assert await store.entries(BOB) == []
        await until(lambda: _pending_is(second, 0))
        assert not journal.exists()
        assert 'oneclick_unsubscribe_journal_total{event="replayed"} 1.0' in (
            second.metrics.render().decode()
        )
        code, text = await smtp_send(second.smtp_port, "news@example.com", [ALICE, BOB], message())
        assert code == 250 and "suppressed 1" in text, text
        # the replay is idempotent: the same request again changes nothing
        status, _ = await post(second, tokens[ALICE])
        assert status == 200
        assert len(await store.entries(ALICE)) == 1
    finally:
        for relay in relays:
            await relay.stop()
        server.stop()


async def _pending_is(relay: Relay, count: int) -> bool:
    return (await health(relay))[1].get("journal_pending") == count


async def test_503_only_when_the_journal_cannot_be_written(
    config_dict: dict[str, Any], sink: Sink, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state folder should be\n")
    config_dict["state_dir"] = str(blocker / "state")
    server = EmbeddedRedis().start()
    try:
        config_dict["redis"]["url"] = server.url
        relay = Relay(build_config(config_dict))
        await relay.start()
        try:
            tokens = await tokens_for(relay, sink, [ALICE])
            server.kill()
            status, text = await post(relay, tokens[ALICE])
            assert status == 503, text
            assert 'oneclick_unsubscribe_journal_total{event="write-failed"} 1.0' in (
                relay.metrics.render().decode()
            )
        finally:
            await relay.stop()
    finally:
        server.stop()


async def test_mailto_request_while_redis_is_down_is_journaled(
    config_dict: dict[str, Any], sink: Sink
) -> None:
    config_dict["bounces"] = {"listen": "127.0.0.1:0"}
    config_dict["unsubscribe"] = {"mailto_domain": "unsub-mail.example.com"}
    server = EmbeddedRedis().start()
    try:
        config_dict["redis"]["url"] = server.url
        relay = Relay(build_config(config_dict))
        await relay.start()
        try:
            tokens = await tokens_for(relay, sink, [ALICE])
            server.kill()
            request = (
                f"From: <{ALICE}>\r\nTo: unsubscribe@unsub-mail.example.com\r\n"
                f"Subject: unsubscribe {tokens[ALICE]}\r\nMessage-ID: <r1@example.net>\r\n\r\n"
            ).encode()
            code, text = await smtp_send(
                relay.inbound_port, ALICE, ["unsubscribe@unsub-mail.example.com"], request
            )
            assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: journaled"), text
            server.start()
            store = relay.store
            assert store is not None

            async def suppressed() -> bool:
                try:
                    return len(await store.entries(ALICE)) == 1
                except Exception:
                    return False

            await until(suppressed)
            [entry] = await store.entries(ALICE)
            assert (entry.scope, entry.source) == ("g:newsletter", "mailto")
        finally:
            await relay.stop()
    finally:
        server.stop()
