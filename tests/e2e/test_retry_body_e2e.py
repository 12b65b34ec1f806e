"""A deferred fan-out keeps one body: Redis holds the message's body once and each deferred
copy's header block; the copy rebuilt at retry time is the one that was signed."""

from __future__ import annotations

import asyncio
from typing import Any

import dkim
import redis.asyncio as aioredis
from conftest import Keys, Sink
from helpers import message, smtp_send

from relay.runtime.app import Relay


async def test_deferred_copies_share_one_body_and_verify_after_retry(
    relay: Relay, sink: Sink, keys: Keys, redis_url: str
) -> None:
    rcpts = [f"user{i}@example.net" for i in range(6)]
    deferred = rcpts[1::2]
    for rcpt in deferred:
        sink.handler.rcpt_replies[rcpt] = "451 4.2.0 try later"
    body = ("A line of the newsletter body, the same for everyone.\r\n" * 2000).encode()
    code, text = await smtp_send(
        relay.smtp_port, "news@example.com", rcpts, message(body=body.decode())
    )
    assert code == 250 and "queued 3" in text, text
    client: Any = aioredis.Redis.from_url(redis_url)
    try:
        bodies = [k async for k in client.scan_iter(match="ocr:{queue}:msg:*")]
        items = [k async for k in client.scan_iter(match="ocr:{queue}:item:*")]
        assert (len(bodies), len(items)) == (1, 3)
        assert await client.hget(bodies[0], "body") == body
        for key in items:
            head = await client.hget(key, "head")
            assert body not in head and len(head) < 4096
            assert await client.hget(key, "data") is None
        for rcpt in deferred:
            del sink.handler.rcpt_replies[rcpt]
        for _ in range(100):
            if len(sink.handler.messages) == 6:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        assert sorted(m.rcpt_tos[0] for m in sink.handler.messages) == sorted(rcpts)
        for m in sink.handler.messages:
            assert m.data.endswith(body)
            assert dkim.verify(m.data, dnsfunc=keys.dnsfunc), m.rcpt_tos
        assert [k async for k in client.scan_iter(match="ocr:{queue}:msg:*")] == []
        assert [k async for k in client.scan_iter(match="ocr:{queue}:item:*")] == []
    finally:
        await client.aclose()
