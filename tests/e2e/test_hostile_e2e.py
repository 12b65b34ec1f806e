"""Hostile input against a running relay: nothing an outsider sends stalls it or fills Redis.

Each test replays one finding of the attack run (issue 15) over real sockets: the
inbound listener, the HTTP side and the SMTP port of a relay started on a real
Redis. Stalls are measured as the latency of ``/healthz`` polled from a separate
thread while the attack runs, so a blocked event loop shows as a slow answer.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import threading
import time
from typing import Any

import pytest
from conftest import Sink
from helpers import message, smtp_send

from relay.runtime.app import Relay
from relay.suppression.store import GLOBAL

ALICE = "alice@example.net"
RETURN_PATH = "bounces@bounce.example.com"
STALL = 0.25
"""The longest /healthz answer the tests accept while an attack runs (seconds)."""


class HealthPoller:
    """Polls ``/healthz`` from its own thread and keeps every answer's latency."""

    def __init__(self, port: int, interval: float = 0.02) -> None:
        self._port = port
        self._interval = interval
        self._stop = threading.Event()
        self.latencies: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=120)
            try:
                connection.request("GET", "/healthz")
                connection.getresponse().read()
            finally:
                connection.close()
            self.latencies.append(time.perf_counter() - started)
            self._stop.wait(self._interval)

    async def __aenter__(self) -> HealthPoller:
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Joined from another thread: the loop must keep serving the last poll."""
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 180)

    @property
    def worst(self) -> float:
        return max(self.latencies)


@pytest.fixture
def bounce_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    config_dict["bounces"] = {
        "return_path_domain": "bounce.example.com",
        "listen": "127.0.0.1:0",
        "keep_days": 3,
    }
    return config_dict


@pytest.fixture
async def brelay(make_relay: Any, bounce_config: dict[str, Any]) -> Relay:
    relay: Relay = await make_relay(bounce_config)
    return relay


def dsn(text: str, message_id: str = "<hostile@mta.example.org>") -> bytes:
    """A DSN whose human-readable part is ``text`` (base64, so its lines stay short)."""
    body = base64.encodebytes(text.encode()).decode().replace("\n", "\r\n")
    return (
        "From: MAILER-DAEMON@mta.example.org\r\n"
        "To: bounces@bounce.example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n'
        "\r\n--b1\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        f"{body}\r\n--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mta.example.org\r\n\r\n"
        "Final-Recipient: rfc822; nobody@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "\r\n--b1--\r\n"
    ).encode()


# ---------------------------------------------------------------------------
# finding 1: a DSN that made the return-path search quadratic


async def test_long_run_of_return_path_prefixes_does_not_stall_the_loop(brelay: Relay) -> None:
    """400 KB of ``bounces+aaaa…`` without white space: 11 s of regex on the loop before."""
    text = ("bounces+" + "a" * 24) * (400_000 // 32)
    async with HealthPoller(brelay.http_port) as poller:
        await asyncio.sleep(0.2)
        code, reply = await smtp_send(brelay.inbound_port, "", [RETURN_PATH], dsn(text))
        await asyncio.sleep(0.2)
    assert code == 250, reply
    assert "unattributed" in reply
    assert len(poller.latencies) >= 5
    assert poller.worst < STALL, f"/healthz took {poller.worst:.3f} s during the DSN"


# ---------------------------------------------------------------------------
# findings 7 and 8: one address normaliser for policy, signing and suppression


@pytest.mark.parametrize("sender", ["news@example.com.", '"news"@example.com'])
async def test_marketing_sender_spellings_get_one_click_headers(
    relay: Relay, sink: Sink, sender: str
) -> None:
    """Both were classified transactional (no List-Unsubscribe) yet signed d=example.com."""
    data = message(sender="news@example.com").replace(b"<news@example.com>", f"<{sender}>".encode())
    code, reply = await smtp_send(relay.smtp_port, "app@example.com", [ALICE], data)
    assert code == 250, reply
    [copy] = sink.handler.messages
    assert b"\r\nList-Unsubscribe: <https://unsub.example.com/u/" in copy.data
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in copy.data
    assert b"d=example.com" in copy.data


async def test_from_without_canonical_form_is_refused(relay: Relay, sink: Sink) -> None:
    data = message(sender="news@xn--zz.example.com")
    code, reply = await smtp_send(relay.smtp_port, "app@example.com", [ALICE], data)
    assert code == 550
    assert reply.startswith("5.1.7 From address cannot be normalised")
    assert sink.handler.messages == []


async def test_sharp_s_and_ss_domains_are_different_people(relay: Relay, sink: Sink) -> None:
    """IDNA 2003 folded straße.de into strasse.de: one unsubscribe stopped both."""
    assert relay.store is not None
    await relay.store.add("kai@straße.de", GLOBAL, "manual", source="test")
    code, reply = await smtp_send(
        relay.smtp_port, "app@example.com", ["kai@strasse.de"], message(to="kai@strasse.de")
    )
    assert code == 250, reply
    assert [m.rcpt_tos for m in sink.handler.messages] == [("kai@strasse.de",)]
    assert await relay.store.add("kai@strasse.de", GLOBAL, "manual", source="test")
