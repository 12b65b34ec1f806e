"""Fleets on one Redis: two relay processes with different upstreams never deliver each
other's deferred copies, and a relay of the same upstream takes over a dead one's items."""

from __future__ import annotations

import asyncio
import copy
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from conftest import Sink
from helpers import message, smtp_send, start_serve, write_yaml

from relay.cli.sink import CaptureHandler, start_sink
from relay.store.embedded import free_port

ALICE, BOB = "alice@example.net", "bob@example.org"


class Deferring(CaptureHandler):
    """Defers ``BOB`` while ``defer_bob`` is set, counting the attempts."""

    def __init__(self) -> None:
        super().__init__()
        self.defer_bob = True
        self.bob_attempts = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address == BOB:
            self.bob_attempts += 1
            if self.defer_bob:
                return "451 4.2.0 mailbox busy, try later"
        return await super().handle_RCPT(server, session, envelope, address, options)


@pytest.fixture
async def upstreams() -> AsyncIterator[list[tuple[Deferring, int]]]:
    started = []
    for _ in range(2):
        handler = Deferring()
        server = await start_sink(handler)
        started.append((handler, server))
    yield [(h, s.sockets[0].getsockname()[1]) for h, s in started]
    for _, server in started:
        server.close()


class Process:
    def __init__(self, proc: subprocess.Popen[str], smtp: int, log: Path) -> None:
        self.proc, self.smtp, self.log = proc, smtp, log

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def serve(config: dict[str, Any], folder: Path, upstream_port: int) -> Process:
    config = copy.deepcopy(config)
    folder.mkdir()  # noqa: ASYNC240 - a test folder, before the child starts
    smtp = free_port()
    config["smtp"]["listen"] = f"127.0.0.1:{smtp}"
    config["smtp"]["workers"] = 1
    config["http"]["listen"] = f"127.0.0.1:{free_port()}"
    config["upstream"]["port"] = upstream_port
    config["state_dir"] = str(folder / "state")
    path = write_yaml(folder / "relay.yaml", config)
    log = folder / "relay.log"
    return Process(await start_serve(path, log, smtp), smtp, log)


async def wait_for(predicate: Any, seconds: float = 20) -> None:
    for _ in range(int(seconds * 10)):
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached")


def delivered_to(handler: CaptureHandler, rcpt: str) -> int:
    return sum(m.rcpt_tos.count(rcpt) for m in handler.messages)


async def test_two_relays_with_different_upstreams_keep_their_own_items(
    config_dict: dict[str, Any],
    sink: Sink,
    upstreams: list[tuple[Deferring, int]],
    tmp_path: Path,
) -> None:
    (mx_a, port_a), (mx_b, port_b) = upstreams
    config_dict["retry"] = {"first_delay": 0.2, "max_delay": 0.5, "poll_interval": 0.1}
    relays = []
    try:
        relay_a = await serve(config_dict, tmp_path / "a", port_a)
        relays.append(relay_a)
        relay_b = await serve(config_dict, tmp_path / "b", port_b)
        relays.append(relay_b)
        # B's own deferred copy and A's, each in its own partition
        for relay in (relay_a, relay_b):
            code, text = await smtp_send(relay.smtp, "news@example.com", [ALICE, BOB], message())
            assert code == 250 and "queued 1" in text, text
        await wait_for(lambda: mx_a.bob_attempts >= 3 and mx_b.bob_attempts >= 3)

        # A dies between two attempts; A2 (same upstream) takes over, B never touches it
        relay_a.stop(signal.SIGKILL)
        relays.remove(relay_a)
        mx_a.defer_bob = False
        await asyncio.sleep(1.5)
        assert delivered_to(mx_a, BOB) == 0  # nobody delivered A's item meanwhile
        relay_a2 = await serve(config_dict, tmp_path / "a2", port_a)
        relays.append(relay_a2)
        await wait_for(lambda: delivered_to(mx_a, BOB) == 1)
        mx_b.defer_bob = False
        await wait_for(lambda: delivered_to(mx_b, BOB) == 1)
        await asyncio.sleep(1.0)  # nothing more arrives
        assert [delivered_to(mx_a, r) for r in (ALICE, BOB)] == [1, 1]
        assert [delivered_to(mx_b, r) for r in (ALICE, BOB)] == [1, 1]
        assert sink.handler.messages == []
    finally:
        for relay in relays:
            relay.stop()
