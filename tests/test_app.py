"""The running relay (relay.runtime.app): a failed start unwinds what started, a stop is the
reverse of the start, and a reload rebuilds what changed or names what waits for a restart."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Sink
from helpers import build_config, children, message, smtp_send
from redis.asyncio import Redis

from relay.cli.sink import CaptureHandler, start_sink
from relay.errors import ConfigError
from relay.runtime.app import Relay
from relay.runtime.lifecycle import StartError
from relay.store.embedded import free_port


def _redis_children() -> set[int]:
    mine = set()
    for pid in children(os.getpid()):
        try:
            if b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                mine.add(pid)
        except OSError:
            pass
    return mine


def _can_bind(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


@pytest.mark.parametrize("taken", ["smtp", "http"])
async def test_a_failed_start_unwinds_exactly_what_started(
    config_dict: dict[str, Any], taken: str
) -> None:
    """Embedded Redis, Redis client, counters, retry worker … are all gone after the error."""
    del config_dict["redis"]  # an embedded Redis: a child process that must not outlive this
    http_port = free_port()
    config_dict["http"]["listen"] = f"127.0.0.1:{http_port}"
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    config_dict[taken]["listen"] = f"127.0.0.1:{holder.getsockname()[1]}"
    redis_before, tasks_before = _redis_children(), _other_tasks()
    with holder, pytest.raises(StartError) as caught:
        await Relay(build_config(config_dict)).start()
    assert str(caught.value).startswith(f"{taken}.listen: cannot listen on 127.0.0.1:")
    assert str(caught.value).endswith("Address already in use")
    assert _redis_children() == redis_before
    assert _other_tasks() <= tasks_before
    if taken == "smtp":
        assert _can_bind(http_port)  # HTTP had started, and was stopped again


async def test_a_bad_key_file_stops_the_start_before_anything_starts(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    del config_dict["redis"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    config_dict["dkim"][0]["private_key_file"] = str(garbage)
    redis_before = _redis_children()
    relay = Relay(build_config(config_dict))
    with pytest.raises(ConfigError, match=r"^dkim\[0\]\.private_key_file"):
        await relay.start()
    assert _redis_children() == redis_before
    assert not relay.started
    await relay.stop()  # nothing to stop: no error either


async def test_stop_is_the_reverse_of_start(
    config_dict: dict[str, Any], sink: Sink, redis: Redis
) -> None:
    """SMTP closes first and the counters flush after it: what the last message counted
    reaches Redis; then nothing listens and no task of the relay is left."""
    tasks_before = _other_tasks()
    relay = Relay(build_config(config_dict))
    await relay.start()
    assert relay.started
    code, _ = await smtp_send(relay.smtp_port, "news@example.com", ["a@example.net"], message())
    assert code == 250
    smtp_port, http_port = relay.smtp_port, relay.http_port
    await relay.stop()
    counts = {k.decode(): int(v) for k, v in (await redis.hgetall(await _daily_key(redis))).items()}
    assert counts == {"sent|newsletter": 1, "no-body-link|newsletter": 1}  # no link in it
    for port in (smtp_port, http_port):
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0)
    assert _other_tasks() <= tasks_before
    await relay.stop()


async def _daily_key(redis: Redis) -> bytes:
    [key] = await redis.keys("ocr:daily:*")
    return bytes(key)


async def test_the_drain_counts_transactions_it_cut(
    config_dict: dict[str, Any], sink: Sink
) -> None:
    config_dict["smtp"]["drain_timeout"] = 0.3
    relay = Relay(build_config(config_dict))
    await relay.start()
    sink.handler.delay = 2
    sending = asyncio.create_task(
        smtp_send(relay.smtp_port, "x@example.com", ["a@example.net"], message())
    )
    await asyncio.sleep(0.5)
    await relay.stop()
    assert relay.drained.cut == 1
    cut = set(relay.handler.inflight)
    for task in (sending, *cut):  # the cut transaction must not outlive this test's loop
        task.cancel()
    await asyncio.gather(sending, *cut, return_exceptions=True)


@pytest.fixture
async def second_sink() -> AsyncIterator[Sink]:
    handler = CaptureHandler()
    server = await start_sink(handler)
    yield Sink(handler, server, server.sockets[0].getsockname()[1])
    server.close()


async def _until(check: Any, timeout: float = 10) -> None:
    for _ in range(int(timeout * 20)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_a_reload_moves_the_pipeline_and_the_notify_mail_to_the_new_upstream(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink, second_sink: Sink
) -> None:
    config_dict["events"] = {
        "notify_email": {"to": "crm@example.com", "from": "relay@example.com"},
        "retry_first_delay": 0.2,
    }
    relay: Relay = await make_relay(config_dict)
    old_upstream = relay.upstream
    config_dict["upstream"]["port"] = second_sink.port
    await relay.reload(build_config(config_dict))
    assert relay.upstream is not old_upstream
    assert relay.retry_worker.upstream is relay.upstream

    code, _ = await smtp_send(relay.smtp_port, "news@example.com", ["ann@example.net"], message())
    assert code == 250
    assert [m.rcpt_tos for m in second_sink.handler.messages] == [("ann@example.net",)]
    token = re.search(rb"/u/(k1\.[\w-]+)>", second_sink.handler.messages[-1].data)
    assert token
    url = f"http://127.0.0.1:{relay.http_port}/u/{token.group(1).decode()}"
    async with aiohttp.ClientSession() as http, http.post(url, data=b"") as resp:
        assert resp.status == 200

    def notified() -> bool:
        return any(m.rcpt_tos == ("crm@example.com",) for m in second_sink.handler.messages)

    await _until(notified)
    assert sink.handler.messages == []  # the old upstream got nothing after the reload


async def test_a_reload_of_an_unchanged_upstream_keeps_its_connections(
    relay: Relay, config_dict: dict[str, Any]
) -> None:
    upstream = relay.upstream
    config_dict["policy"]["senders"].insert(0, {"match": "x@example.com", "class": "marketing"})
    await relay.reload(build_config(config_dict))
    assert relay.upstream is upstream
    assert relay.config.policy.senders[0].match == "x@example.com"


async def test_a_reload_names_each_restart_only_key_and_keeps_its_running_value(
    relay: Relay, config_dict: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    config_dict["smtp"]["max_recipients"] = 2
    config_dict["redis"]["key_prefix"] = "other"
    config_dict["http"]["public_url"] = "https://links.example.com"
    with caplog.at_level(logging.INFO, logger="relay.runtime.app"):
        await relay.reload(build_config(config_dict))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "reload: smtp.max_recipients changed; it applies after a restart (running value kept)",
        "reload: redis.key_prefix changed; it applies after a restart (running value kept)",
    ]
    assert "applied=http.public_url" in caplog.text
    assert relay.config.smtp.max_recipients == 50
    rcpts = [f"r{i}@example.net" for i in range(3)]
    code, _ = await smtp_send(relay.smtp_port, "x@example.com", rcpts, message())
    assert code == 250  # three recipients: the running limit (50) still holds


async def test_a_reload_with_a_bad_key_changes_nothing(
    relay: Relay, config_dict: dict[str, Any], tmp_path: Path, sink: Sink
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    before = relay.live
    config_dict["dkim"][0]["private_key_file"] = str(garbage)
    config_dict["upstream"]["port"] = free_port()
    with pytest.raises(ConfigError, match=r"^dkim\[0\]\.private_key_file"):
        await relay.reload(build_config(config_dict))
    assert relay.live is before
    code, _ = await smtp_send(relay.smtp_port, "x@example.com", ["a@example.net"], message())
    assert code == 250 and len(sink.handler.messages) == 1
