"""The upstream transaction over real sockets: pipelined (RFC 2920) and step by step.

``RawUpstream`` is a scripted SMTP server written on asyncio streams: it records
each chunk the client wrote (so a test can see MAIL, every RCPT and DATA arrive
in one read), answers the commands of one chunk in one write (as Postfix does,
so several replies reach the client in one segment), and can refuse, close with
421, or drop the connection at a chosen point. ``Recorder`` is a TCP proxy that
keeps the chunks a client wrote, in front of a real Postfix (``tests/postfix.py``)
that relays to the capture sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim
import pytest
from conftest import Keys, Sink
from cryptography import x509
from helpers import self_signed_certificate, smtp_send
from postfix import Postfix, own_folder, postfix_binary

from relay.config import UpstreamConfig
from relay.outbound.upstream import DROPPED, Outbound, Upstream
from relay.runtime.app import Relay

ALICE, BOB, CAROL = "alice@example.net", "bob@example.org", "carol@example.com"
BODY = b"Line one.\r\n.leading dot\r\n..two dots\r\n.\r\n. \r\nlast line\r\n"


@dataclass
class Transaction:
    mail_from: str
    rcpts: list[str]
    body: bytes | None = None


@dataclass
class RawUpstream:
    """A scripted upstream; see the module docstring."""

    pipelining: bool = True
    mail_reply: str = "250 2.1.0 Ok"
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    no_rcpt_reply: str = "554 5.5.1 Error: no valid recipients"
    answer_354_without_recipients: bool = False
    final_reply: str | None = "250 2.0.0 Ok: queued as RAW"
    """None: read the body and never answer."""
    close_after_mail: bool = False
    """Close the connection right after answering MAIL (as some servers do after a 5xx)."""
    drop_next: str | None = None
    """``"envelope"``: close after reading MAIL..DATA, before any reply; ``"body"``:
    close after reading the body, before the final reply. Used once."""
    connections: int = 0
    chunks: list[bytes] = field(default_factory=list)
    """What each read after EHLO got, over every connection."""
    transactions: list[Transaction] = field(default_factory=list)
    unknown: list[bytes] = field(default_factory=list)
    tls: ssl.SSLContext | None = None
    """Offer STARTTLS with this server context."""
    tls_sessions: int = 0
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    @property
    def bodies(self) -> list[bytes]:
        return [t.body for t in self.transactions if t.body is not None]

    def _ehlo(self, secure: bool) -> bytes:
        lines = [
            "raw.test",
            *(["PIPELINING"] if self.pipelining else []),
            *(["STARTTLS"] if self.tls is not None and not secure else []),
            "8BITMIME",
            "SIZE 1000000",
        ]
        return b"".join(
            f"250{'-' if n < len(lines) - 1 else ' '}{line}\r\n".encode()
            for n, line in enumerate(lines)
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 raw.test ESMTP\r\n")
        buffer = b""
        tx: Transaction | None = None
        accepted: list[str] = []
        in_body = False
        greeted = secure = False
        try:
            while chunk := await reader.read(65536):
                if greeted:
                    self.chunks.append(chunk)
                buffer += chunk
                out: list[bytes] = []
                closing = upgrade = False
                while not (closing or upgrade):
                    if in_body:
                        end = -2 if buffer.startswith(b".\r\n") else buffer.find(b"\r\n.\r\n")
                        if end == -1:
                            break
                        assert tx is not None
                        size = end + 5
                        tx.body, buffer = buffer[:size], buffer[size:]
                        in_body = False
                        if self.drop_next == "body":
                            self.drop_next = None
                            writer.transport.abort()
                            return
                        if self.final_reply is not None:
                            out.append(self.final_reply.encode() + b"\r\n")
                        tx, accepted = None, []
                        continue
                    line, sep, rest = buffer.partition(b"\r\n")
                    if not sep:
                        break
                    buffer = rest
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO"):
                        greeted = True
                        out.append(self._ehlo(secure))
                        continue
                    if verb == b"STAR" and self.tls is not None:  # STARTTLS
                        out.append(b"220 2.0.0 Ready to start TLS\r\n")
                        upgrade = True
                        continue
                    if verb == b"MAIL":
                        reply = self.mail_reply
                        if reply.startswith("250"):
                            tx = Transaction(_address(line), [])
                            self.transactions.append(tx)
                        closing = self.close_after_mail
                    elif verb == b"RCPT":
                        address = _address(line)
                        reply = (
                            "503 5.5.1 Error: need MAIL command"
                            if tx is None
                            else self.rcpt_replies.get(address, "250 2.1.5 Ok")
                        )
                        if tx is not None:
                            tx.rcpts.append(address)
                            if reply.startswith("250"):
                                accepted.append(address)
                    elif verb == b"DATA":
                        if self.drop_next == "envelope":
                            self.drop_next = None
                            writer.transport.abort()
                            return
                        if tx is None and not self.answer_354_without_recipients:
                            reply = "503 5.5.1 Error: need MAIL command"
                        elif not accepted and not self.answer_354_without_recipients:
                            reply = self.no_rcpt_reply
                        else:
                            reply = "354 End data with <CR><LF>.<CR><LF>"
                            in_body = True
                            tx = tx or Transaction("", [])
                    elif verb == b"RSET":
                        tx, accepted, reply = None, [], "250 2.0.0 Ok"
                    elif verb == b"QUIT":
                        reply, closing = "221 2.0.0 Bye", True
                    else:
                        self.unknown.append(line)
                        reply = "502 5.5.2 Error: command not recognized"
                    out.append(reply.encode() + b"\r\n")
                    closing = closing or reply.startswith("421")
                writer.write(b"".join(out))
                if closing:
                    break
                if upgrade:
                    assert self.tls is not None
                    await writer.drain()
                    await writer.start_tls(self.tls)
                    self.tls_sessions += 1
                    greeted, secure = False, True
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _address(line: bytes) -> str:
    m = re.search(rb"<([^>]*)>", line)
    assert m is not None, line
    return m.group(1).decode()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    server = await RawUpstream().start()
    yield server
    await server.stop()


@pytest.fixture
async def upstream_to(raw_upstream: RawUpstream) -> AsyncIterator[Callable[..., Upstream]]:
    """``upstream_to(port=None, connections=1)``: an ``Upstream`` of ``raw_upstream``."""
    made: list[Upstream] = []

    def factory(port: int | None = None, connections: int = 1) -> Upstream:
        config = UpstreamConfig(
            port=port or raw_upstream.port, timeout=2, connections=connections, name="raw"
        )
        made.append(Upstream(config, "relay.test"))
        return made[-1]

    yield factory
    for upstream in made:
        await upstream.close()


def out(*rcpts: str, data: bytes = b"Subject: hi\r\n\r\n" + BODY) -> Outbound:
    return Outbound("bounce@example.com", rcpts, data)


def codes(replies: dict[str, Any]) -> dict[str, str]:
    return {r: f"{reply.code} {reply.enhanced}" for r, reply in replies.items()}


def envelope_chunk(server: RawUpstream) -> bytes:
    """The last chunk that starts with MAIL (pipelined, it holds the RCPTs and DATA too)."""
    return [c for c in server.chunks if c.startswith(b"MAIL FROM:")][-1]


async def test_pipelined_commands_arrive_in_one_read_and_the_body_is_dot_stuffed(
    raw_upstream: RawUpstream, upstream_to: Callable[..., Upstream]
) -> None:
    upstream = upstream_to()
    data = b".starts with a dot\r\n..two\r\n.\r\nno final line break"
    replies = await upstream.send(out(ALICE, BOB, CAROL, data=data))
    assert codes(replies) == dict.fromkeys([ALICE, BOB, CAROL], "250 2.0.0")
    assert envelope_chunk(raw_upstream) == (
        b"MAIL FROM:<bounce@example.com> SIZE=%d\r\n"
        % len(data)
        + b"RCPT TO:<alice@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
        b"RCPT TO:<carol@example.com>\r\nDATA\r\n"
    )
    assert raw_upstream.bodies == [
        b"..starts with a dot\r\n...two\r\n..\r\nno final line break\r\n.\r\n"
    ]
    assert raw_upstream.transactions[0].rcpts == [ALICE, BOB, CAROL]
    # the connection is reused for the next message
    replies = await upstream.send(out(ALICE))
    assert codes(replies) == {ALICE: "250 2.0.0"}
    assert raw_upstream.connections == 1
    assert raw_upstream.unknown == []


async def test_without_pipelining_each_command_waits_for_its_reply(
    raw_upstream: RawUpstream, upstream_to: Callable[..., Upstream]
) -> None:
    raw_upstream.pipelining = False
    raw_upstream.rcpt_replies[BOB] = "550 5.1.1 <bob@example.org>: User unknown"
    upstream = upstream_to()
    replies = await upstream.send(out(ALICE, BOB, CAROL))
    assert codes(replies) == {ALICE: "250 2.0.0", BOB: "550 5.1.1", CAROL: "250 2.0.0"}
    assert replies[BOB].stage == "rcpt"
    commands = [c for c in raw_upstream.chunks if not c.startswith(b"Subject")]
    assert commands == [
        b"MAIL FROM:<bounce@example.com> SIZE=%d\r\n" % len(out().data),
        b"RCPT TO:<alice@example.net>\r\n",
        b"RCPT TO:<bob@example.org>\r\n",
        b"RCPT TO:<carol@example.com>\r\n",
        b"DATA\r\n",
    ]
    assert raw_upstream.bodies == [
        b"Subject: hi\r\n\r\n" + BODY.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    ]
    # every RCPT refused: no DATA at all, RSET, and the connection goes on
    raw_upstream.rcpt_replies[ALICE] = "550 5.1.1 <alice@example.net>: User unknown"
    replies = await upstream.send(out(ALICE, BOB))
    assert codes(replies) == {ALICE: "550 5.1.1", BOB: "550 5.1.1"}
    assert raw_upstream.chunks[-1] == b"RSET\r\n"
    assert codes(await upstream.send(out(CAROL))) == {CAROL: "250 2.0.0"}
    assert raw_upstream.connections == 1


async def test_aiosmtpd_upstream_without_pipelining_still_delivers(sink: Sink) -> None:
    """aiosmtpd does not advertise PIPELINING: the step-by-step path, a real server."""
    sink.handler.rcpt_replies[BOB] = "550 5.1.1 no such user"
    upstream = Upstream(UpstreamConfig(port=sink.port, timeout=2, connections=1), "relay.test")
    try:
        replies = await upstream.send(out(ALICE, BOB, CAROL))
        assert codes(replies) == {ALICE: "250 2.0.0", BOB: "550 5.1.1", CAROL: "250 2.0.0"}
        (got,) = sink.handler.messages
        assert got.rcpt_tos == (ALICE, CAROL)
        assert got.data == b"Subject: hi\r\n\r\n" + BODY
    finally:
        await upstream.close()


async def test_pipelined_one_recipient_refused_others_go_on(
    raw_upstream: RawUpstream, upstream_to: Callable[..., Upstream]
) -> None:
    raw_upstream.rcpt_replies[BOB] = "550 5.1.1 <bob@example.org>: Recipient address rejected"
    replies = await upstream_to().send(out(ALICE, BOB, CAROL))
    assert codes(replies) == {ALICE: "250 2.0.0", BOB: "550 5.1.1", CAROL: "250 2.0.0"}
    assert replies[BOB].stage == "rcpt"
    assert "Recipient address rejected" in replies[BOB].text
    assert b"RCPT TO:<carol@example.com>\r\nDATA\r\n" in envelope_chunk(raw_upstream)
    assert len(raw_upstream.bodies) == 1


async def test_pipelined_mail_refused_is_every_recipients_reply_then_rset(
    raw_upstream: RawUpstream, upstream_to: Callable[..., Upstream]
) -> None:
    raw_upstream.mail_reply = "553 5.7.1 <bounce@example.com>: Sender address rejected"
    upstream = upstream_to()
    replies = await upstream.send(out(ALICE, BOB))
    assert codes(replies) == {ALICE: "553 5.7.1", BOB: "553 5.7.1"}
    assert all(r.stage == "" for r in replies.values())  # not the recipients' fault
    assert raw_upstream.chunks[-1] == b"RSET\r\n"
    assert raw_upstream.bodies == [] and raw_upstream.unknown == []
    raw_upstream.mail_reply = "250 2.1.0 Ok"
    assert codes(await upstream.send(out(ALICE))) == {ALICE: "250 2.0.0"}
    assert raw_upstream.connections == 1


async def test_mail_refused_then_closed_is_the_refusal_not_a_drop(
    raw_upstream: RawUpstream, upstream_to: Callable[..., Upstream]
) -> None:
    upstream = upstream_to()
    assert codes(await upstream.send(out(ALICE))) == {ALICE: "250 2.0.0"}
    raw_upstream.mail_reply = "554 5.7.1 Service unavailable; client host blocked"
    raw_upstream.close_after_mail = True
    replies = await upstream.send(out(ALICE, BOB))
    assert codes(replies) == {ALICE: "554 5.7.1", BOB: "554 5.7.1"}
    assert raw_upstream.connections == 1  # not retried as if the connection had been lost


@pytest.mark.parametrize("broken_354", [False, True])
async def test_pipelined_all_recipients_refused_sends_no_body(
    raw_upstream: RawUpstream, upstream_to: Callable[..., Upstream], broken_354: bool
) -> None:
    raw_upstream.rcpt_replies = {
        ALICE: "550 5.1.1 <alice@example.net>: User unknown",
        BOB: "450 4.2.0 <bob@example.org>: Greylisted",
    }
    raw_upstream.answer_354_without_recipients = broken_354
    upstream = upstream_to()
    replies = await upstream.send(out(ALICE, BOB))
    assert codes(replies) == {ALICE: "550 5.1.1", BOB: "450 4.2.0"}
    # a server that wants a body anyway gets an empty one, its reply discarded
    assert raw_upstream.bodies == ([b".\r\n"] if broken_354 else [])
    assert raw_upstream.chunks[-1] == b"RSET\r\n"
    assert raw_upstream.unknown == []  # no body line was taken for a command
    raw_upstream.rcpt_replies = {}
    assert codes(await upstream.send(out(ALICE, BOB))) == dict.fromkeys([ALICE, BOB], "250 2.0.0")
    assert raw_upstream.connections == 1
    assert raw_upstream.bodies[-1].startswith(b"Subject: hi\r\n")


async def test_drop_before_354_is_retried_once_on_a_fresh_connection(
    raw_upstream: RawUpstream, upstream_to: Callable[..., Upstream]
) -> None:
    upstream = upstream_to()
    assert codes(await upstream.send(out(ALICE))) == {ALICE: "250 2.0.0"}
    raw_upstream.drop_next = "envelope"
    replies = await upstream.send(out(ALICE, BOB))
    assert codes(replies) == dict.fromkeys([ALICE, BOB], "250 2.0.0")
    assert raw_upstream.connections == 2
    assert len(raw_upstream.bodies) == 2  # the dropped transaction never got a body


async def test_drop_after_the_body_is_451_4_4_2_and_never_retried(
    raw_upstream: RawUpstream, upstream_to: Callable[..., Upstream]
) -> None:
    upstream = upstream_to()
    assert codes(await upstream.send(out(ALICE))) == {ALICE: "250 2.0.0"}
    raw_upstream.drop_next = "body"
    replies = await upstream.send(out(ALICE, BOB))
    assert replies == dict.fromkeys([ALICE, BOB], DROPPED)
    assert raw_upstream.connections == 1  # not retried: the body may have been taken
    assert len(raw_upstream.bodies) == 2
    # the next message gets a fresh connection
    assert codes(await upstream.send(out(CAROL))) == {CAROL: "250 2.0.0"}
    assert raw_upstream.connections == 2


async def test_421_mid_pipeline_is_451_for_everyone_not_refused(
    raw_upstream: RawUpstream, upstream_to: Callable[..., Upstream]
) -> None:
    raw_upstream.rcpt_replies = {
        ALICE: "550 5.1.1 <alice@example.net>: User unknown",
        BOB: "421 4.3.2 Service shutting down",
    }
    upstream = upstream_to()
    replies = await upstream.send(out(ALICE, BOB, CAROL))
    assert codes(replies) == {ALICE: "550 5.1.1", BOB: "451 4.3.2", CAROL: "451 4.3.2"}
    assert "shutting down" in replies[CAROL].text
    assert replies[BOB].stage == ""  # the server closing says nothing about the address
    assert raw_upstream.connections == 1 and raw_upstream.bodies == []
    raw_upstream.rcpt_replies = {}
    assert codes(await upstream.send(out(CAROL))) == {CAROL: "250 2.0.0"}
    assert raw_upstream.connections == 2


async def test_reply_timeout_is_a_drop(
    raw_upstream: RawUpstream, upstream_to: Callable[..., Upstream]
) -> None:
    """A server that reads the body and never answers: upstream.timeout, then 451 4.4.2."""
    raw_upstream.final_reply = None
    upstream = upstream_to()
    started = time.monotonic()
    replies = await upstream.send(out(ALICE))
    assert replies == {ALICE: DROPPED}
    assert 1.5 < time.monotonic() - started < 4
    assert raw_upstream.connections == 1


def loopback_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for IP 127.0.0.1 (the upstream's host name)."""
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return self_signed_certificate(folder, "raw.test", san, ca=True, prefix="upstream-")


async def test_pipelined_over_starttls_and_the_connection_is_reused(
    raw_upstream: RawUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transaction takes the TLS transport over and gives it back intact."""
    cert, key = loopback_certificate(tmp_path)
    raw_upstream.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    raw_upstream.tls.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the relay's default context trusts it
    raw_upstream.rcpt_replies[BOB] = "550 5.1.1 <bob@example.org>: User unknown"
    config = UpstreamConfig(port=raw_upstream.port, tls="starttls", timeout=2, connections=1)
    upstream = Upstream(config, "relay.test")
    try:
        for _ in range(3):
            replies = await upstream.send(out(ALICE, BOB, CAROL))
            assert codes(replies) == {ALICE: "250 2.0.0", BOB: "550 5.1.1", CAROL: "250 2.0.0"}
    finally:
        await upstream.close()
    assert raw_upstream.connections == 1 and raw_upstream.tls_sessions == 1
    assert len(raw_upstream.bodies) == 3
    assert (
        raw_upstream.bodies[0]
        == b"Subject: hi\r\n\r\n" + BODY.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    )
    envelope = envelope_chunk(raw_upstream)
    assert envelope.count(b"RCPT TO:") == 3 and envelope.endswith(b"DATA\r\n")


# --- a real Postfix -------------------------------------------------------------------


@dataclass
class Recorder:
    """A TCP proxy to ``target`` that keeps every chunk the client side wrote."""

    target: int
    chunks: list[bytes] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> Recorder:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            try:
                while data := await src.read(65536):
                    if record:
                        self.chunks.append(data)
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(
            pump(reader, up_writer, True), pump(up_reader, writer, False), return_exceptions=True
        )

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def recorder_to() -> AsyncIterator[Callable[[int], Awaitable[Recorder]]]:
    started: list[Recorder] = []

    async def factory(target: int) -> Recorder:
        started.append(await Recorder(target).start())
        return started[-1]

    yield factory
    for recorder in started:
        await recorder.stop()


@pytest.fixture
async def postfix(sink: Sink) -> AsyncIterator[Postfix]:
    """A private Postfix relaying everything to ``sink`` (its ``reinject_port`` listener)."""
    if postfix_binary() is None:
        pytest.fail("Postfix is required: bash tests/run installs it", pytrace=False)
    folder = own_folder()
    server = Postfix(folder, sink.port, milters="")
    try:
        await asyncio.to_thread(server.start)
        yield server
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(folder, ignore_errors=True)


async def test_through_a_real_postfix_three_recipients_pipelined_and_intact(
    make_relay: Callable[[dict[str, Any]], Awaitable[Relay]],
    config_dict: dict[str, Any],
    postfix: Postfix,
    sink: Sink,
    keys: Keys,
    recorder_to: Callable[[int], Awaitable[Recorder]],
) -> None:
    recorder = await recorder_to(postfix.reinject_port)
    config_dict["upstream"]["port"] = recorder.port
    relay = await make_relay(config_dict)
    body = b"Hello.\r\n.leading dot\r\n..two dots\r\n.\r\n.\r\n\r\n.end\r\n"
    data = (
        b"From: Receipts <receipts@example.com>\r\nTo: alice@example.net\r\n"
        b"Subject: dots\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
        b"Message-ID: <dots.1@example.com>\r\n\r\n" + body
    )
    rcpts = [ALICE, BOB, CAROL]
    code, text = await smtp_send(relay.smtp_port, "bounce@example.com", rcpts, data)
    assert code == 250 and "delivered 3" in text, text
    deadline = time.monotonic() + 20
    while not sink.handler.messages and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # Postfix delivers on its own time
    (got,) = sink.handler.messages
    assert sorted(got.rcpt_tos) == sorted(rcpts)
    assert got.data.split(b"\r\n\r\n", 1)[1] == body  # byte for byte, after two stuffings
    assert dkim.verify(got.data, dnsfunc=keys.dnsfunc)  # the relay's signature holds
    assert postfix.queued() == 0
    # what the relay wrote: MAIL, three RCPTs and DATA in one segment, then the body
    (envelope,) = [c for c in recorder.chunks if c.startswith(b"MAIL FROM:")]
    assert envelope.count(b"RCPT TO:") == 3 and envelope.endswith(b"\r\nDATA\r\n"), envelope
    assert any(b"\r\n...two dots\r\n..\r\n..\r\n\r\n..end\r\n.\r\n" in c for c in recorder.chunks)
