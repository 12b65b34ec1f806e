"""One-click unsubscribe end to end: SMTP in → captured URL → real HTTP POST → next message."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import Keys, Sink
from helpers import build_config, message, smtp_send

from relay.config import Secret, TokenKey, TokensConfig
from relay.mail.tokens import TokenCodec
from relay.runtime.app import Relay

ALICE, BOB = "alice@example.net", "bob@example.org"


def token_of(data: bytes) -> str:
    m = re.search(rb"List-Unsubscribe: <https://unsub\.example\.com/u/([^>]+)>", data)
    assert m, data[:400]
    return m.group(1).decode()


async def newsletter(relay: Relay, sink: Sink, rcpts: list[str]) -> dict[str, str]:
    """Send a newsletter; return each delivered recipient's token."""
    before = len(sink.handler.messages)
    code, text = await smtp_send(relay.smtp_port, "news@example.com", rcpts, message())
    assert code == 250, text
    return {m.rcpt_tos[0]: token_of(m.data) for m in sink.handler.messages[before:]}


def url(relay: Relay, token: str) -> str:
    return f"http://127.0.0.1:{relay.http_port}/u/{token}"


async def post(relay: Relay, token: str, **kwargs: Any) -> tuple[int, str]:
    kwargs.setdefault("data", "List-Unsubscribe=One-Click")
    kwargs.setdefault("headers", {"Content-Type": "application/x-www-form-urlencoded"})
    async with (
        aiohttp.ClientSession() as http,
        http.post(url(relay, token), allow_redirects=False, **kwargs) as resp,
    ):
        return resp.status, await resp.text()


async def store_keys(redis_url: str) -> list[bytes]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return sorted(await client.keys("*"))
    finally:
        await client.aclose()


async def test_one_click_post_stops_that_group_only(relay: Relay, sink: Sink) -> None:
    tokens = await newsletter(relay, sink, [ALICE, BOB])
    assert tokens[ALICE] != tokens[BOB]
    status, text = await post(relay, tokens[ALICE])
    assert status == 200
    assert "Unsubscribed from Example News" in text

    again = await newsletter(relay, sink, [ALICE, BOB])
    assert list(again) == [BOB]

    before = len(sink.handler.messages)
    for sender in ("deals@promo.example.com", "receipts@example.com"):
        code, _ = await smtp_send(relay.smtp_port, sender, [ALICE], message(sender=sender))
        assert code == 250
    assert [m.rcpt_tos for m in sink.handler.messages[before:]] == [(ALICE,), (ALICE,)]


async def test_multipart_post(relay: Relay, sink: Sink) -> None:
    tokens = await newsletter(relay, sink, [ALICE])
    form = aiohttp.FormData()
    form.add_field("List-Unsubscribe", "One-Click")
    status, _ = await post(relay, tokens[ALICE], data=form, headers={})
    assert status == 200
    assert await newsletter(relay, sink, [ALICE]) == {}


async def test_empty_post_is_honoured(relay: Relay, sink: Sink) -> None:
    tokens = await newsletter(relay, sink, [ALICE])
    status, _ = await post(relay, tokens[ALICE], data=b"", headers={})
    assert status == 200
    assert await newsletter(relay, sink, [ALICE]) == {}
    assert 'channel="post-empty"' in relay.metrics.render().decode()


async def test_post_is_idempotent_and_emits_one_event(
    relay: Relay, sink: Sink, redis_url: str
) -> None:
    tokens = await newsletter(relay, sink, [ALICE])
    assert (await post(relay, tokens[ALICE]))[0] == 200
    assert (await post(relay, tokens[ALICE]))[0] == 200
    client = aioredis.Redis.from_url(redis_url)
    try:
        events = await client.xrange("ocr:events")
    finally:
        await client.aclose()
    assert len(events) == 1
    fields = events[0][1]
    assert fields[b"address"] == ALICE.encode()
    assert fields[b"reason"] == b"unsubscribe"
    assert fields[b"scope"] == b"g:newsletter"
    assert fields[b"source"] == b"post"
    assert b"ua=" in fields[b"detail"]
    assert b"127.0.0.1" not in fields[b"detail"]


async def test_get_shows_a_page_and_changes_nothing(
    relay: Relay, sink: Sink, redis_url: str
) -> None:
    tokens = await newsletter(relay, sink, [ALICE])
    before = await store_keys(redis_url)
    async with aiohttp.ClientSession() as http, http.get(url(relay, tokens[ALICE])) as resp:
        assert resp.status == 200
        page = await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"
    assert '<form method="post">' in page
    assert 'name="List-Unsubscribe" value="One-Click"' in page
    assert "Example News" in page
    assert ALICE not in page  # masked: a***@example.net
    assert await store_keys(redis_url) == before
    assert list(await newsletter(relay, sink, [ALICE])) == [ALICE]


async def test_confirmation_page_after_button(relay: Relay, sink: Sink) -> None:
    tokens = await newsletter(relay, sink, [ALICE])
    status, page = await post(relay, tokens[ALICE], data="List-Unsubscribe=One-Click&via=page")
    assert status == 200
    assert "<h1>Unsubscribed</h1>" in page
    assert 'channel="page"' in relay.metrics.render().decode()


async def test_wrong_body_is_400_and_changes_nothing(relay: Relay, sink: Sink) -> None:
    tokens = await newsletter(relay, sink, [ALICE])
    status, text = await post(relay, tokens[ALICE], data="List-Unsubscribe=Maybe")
    assert status == 400
    assert "One-Click" in text
    assert list(await newsletter(relay, sink, [ALICE])) == [ALICE]


@pytest.mark.parametrize("flip", [0, 5, 20, -1])
async def test_tampered_token_is_400(relay: Relay, sink: Sink, flip: int) -> None:
    tokens = await newsletter(relay, sink, [ALICE])
    kid, payload = tokens[ALICE].split(".", 1)
    chars = list(payload)
    chars[flip] = "A" if chars[flip] != "A" else "B"
    status, _ = await post(relay, f"{kid}.{''.join(chars)}")
    assert status == 400
    assert list(await newsletter(relay, sink, [ALICE])) == [ALICE]


async def test_unknown_key_is_404_and_other_secret_is_400(
    relay: Relay, sink: Sink, keys: Keys
) -> None:
    other = TokenCodec(TokensConfig((TokenKey("k1", Secret(keys.token_k2.read_bytes().strip())),)))
    assert (await post(relay, other.issue(ALICE, "newsletter")))[0] == 400
    stranger = TokenCodec(
        TokensConfig((TokenKey("zz", Secret(keys.token_k1.read_bytes().strip())),))
    )
    assert (await post(relay, stranger.issue(ALICE, "newsletter")))[0] == 404
    assert (await post(relay, "k1." + "A" * 600))[0] == 400
    assert list(await newsletter(relay, sink, [ALICE])) == [ALICE]


async def test_expired_token_is_refused(relay: Relay, sink: Sink, keys: Keys) -> None:
    import time

    old = TokenCodec(
        TokensConfig((TokenKey("k1", Secret(keys.token_k1.read_bytes().strip())),)),
        clock=lambda: time.time() - 61 * 86400,
    )
    status, text = await post(relay, old.issue(ALICE, "newsletter"))
    assert status == 400
    assert "expired" in text
    assert list(await newsletter(relay, sink, [ALICE])) == [ALICE]


async def test_key_rotation_keeps_old_links_working(
    relay: Relay, sink: Sink, config_dict: dict[str, Any], keys: Keys
) -> None:
    old_tokens = await newsletter(relay, sink, [ALICE, BOB])
    config_dict["tokens"]["keys"] = [
        {"id": "k2", "secret_file": str(keys.token_k2)},
        {"id": "k1", "secret_file": str(keys.token_k1)},
    ]
    await relay.reload(build_config(config_dict))
    new_tokens = await newsletter(relay, sink, [BOB])
    assert new_tokens[BOB].startswith("k2.")
    assert (await post(relay, old_tokens[ALICE]))[0] == 200
    assert (await post(relay, new_tokens[BOB]))[0] == 200
    assert await newsletter(relay, sink, [ALICE, BOB]) == {}


async def test_body_size_is_limited(relay: Relay, sink: Sink) -> None:
    tokens = await newsletter(relay, sink, [ALICE])
    status, _ = await post(relay, tokens[ALICE], data="List-Unsubscribe=One-Click&x=" + "y" * 20000)
    assert status == 413
    assert list(await newsletter(relay, sink, [ALICE])) == [ALICE]


@pytest.mark.parametrize(
    ("scope", "blocked_sender", "free_sender"),
    [
        ("sender", "news@example.com", "other@example.com"),
        ("all_marketing", "deals@promo.example.com", "receipts@example.com"),
    ],
)
async def test_unsubscribe_scopes(
    make_relay: Any,
    config_dict: dict[str, Any],
    sink: Sink,
    scope: str,
    blocked_sender: str,
    free_sender: str,
) -> None:
    config_dict["policy"]["senders"][0]["unsubscribe_scope"] = scope
    config_dict["policy"]["senders"].insert(
        1, {"match": "other@example.com", "class": "marketing", "group": "newsletter"}
    )
    relay = await make_relay(config_dict)
    tokens = await newsletter(relay, sink, [ALICE])
    assert (await post(relay, tokens[ALICE]))[0] == 200
    before = len(sink.handler.messages)
    for sender in (blocked_sender, free_sender):
        code, _ = await smtp_send(relay.smtp_port, sender, [ALICE], message(sender=sender))
        assert code == 250
    assert [m.data.count(free_sender.encode()) > 0 for m in sink.handler.messages[before:]] == [
        True
    ]


async def test_healthz_and_metrics(relay: Relay) -> None:
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{relay.http_port}"
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["redis"] == "ok"
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            assert "oneclick_messages_total" in await resp.text()


METRICS_TOKEN = "metrics-token-0123456789abcdef"


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("Bearer wrong-token-0123456789abcdef", 401),
        (f"Bearer {METRICS_TOKEN}x", 401),
        (f"Basic {METRICS_TOKEN}", 401),
        ("Bearer ", 401),
        (f"Bearer {METRICS_TOKEN}", 200),
        (f"bearer {METRICS_TOKEN}", 200),
    ],
)
async def test_metrics_bearer_token(
    make_relay: Any,
    config_dict: dict[str, Any],
    tmp_path: Path,
    authorization: str | None,
    status: int,
) -> None:
    token_file = tmp_path / "metrics.token"
    token_file.write_text(METRICS_TOKEN + "\n")
    config_dict["http"]["metrics_token_file"] = str(token_file)
    relay = await make_relay(config_dict)
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{relay.http_port}/metrics", headers=headers) as resp,
    ):
        text = await resp.text()
        assert resp.status == status
        if status == 401:
            assert text == "missing or wrong bearer token\n"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
            assert "oneclick_" not in text
        else:
            assert "oneclick_messages_total" in text
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{relay.http_port}/healthz") as resp,
    ):
        assert resp.status == 200  # health checks stay open


def test_metrics_token_too_short(config_dict: dict[str, Any], tmp_path: Path) -> None:
    from relay.errors import ConfigError

    short = tmp_path / "short.token"
    short.write_text("abc\n")
    config_dict["http"]["metrics_token_file"] = str(short)
    with pytest.raises(ConfigError) as raised:
        build_config(config_dict)
    assert raised.value.key == "http.metrics_token_file"


@pytest.mark.parametrize("trusted", [True, False])
async def test_client_address_behind_a_trusted_proxy(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink, redis_url: str, trusted: bool
) -> None:
    if trusted:
        config_dict["http"]["trusted_proxies"] = ["127.0.0.0/8"]
    relay = await make_relay(config_dict)
    tokens = await newsletter(relay, sink, [ALICE])
    forwarded = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
    status, _ = await post(
        relay,
        tokens[ALICE],
        data=b"",
        headers=forwarded,
    )
    assert status == 200
    client = aioredis.Redis.from_url(redis_url)
    try:
        [(_, fields)] = await client.xrange("ocr:events")
    finally:
        await client.aclose()
    codec = TokenCodec(relay.config.tokens)
    expected = codec.fingerprint("203.0.113.9" if trusted else "127.0.0.1")
    assert f"ip={expected}".encode() in fields[b"detail"]
