"""Delivery to the upstream MTA over a small pool of reused aiosmtplib connections.

aiosmtplib has no pool and no reconnect: a connection is one ``SMTP`` object with
a lock. ``Upstream`` keeps ``upstream.connections`` of them, connects lazily and
reconnects after a drop. aiosmtplib does connect, EHLO, STARTTLS and AUTH; the
transaction itself is written here (``_exchange``), because aiosmtplib sends one
command per round trip and runs two regexes over every body. When the upstream
offers PIPELINING (RFC 2920), MAIL, every RCPT and DATA go in one write and their
replies are read in order, then the body (dot-stuffed with two byte replaces) in
a second: two round trips per message instead of three plus one per recipient.
Without PIPELINING the same code waits for each reply before the next command.

It knows how far a failed transaction got: a drop before the body was written is
retried once on a fresh connection (nothing was handed on), a drop after is
reported as a temporary failure and never silently retried here.

All aiosmtplib and socket errors are translated into per-recipient ``SmtpReply``
values in this module; the pipeline never sees a library exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import socket
import ssl
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, cast

import aiosmtplib
from aiosmtplib.email import quote_address

from relay.config import UpstreamConfig
from relay.errors import SmtpReply, sanitize_reply_text
from relay.eventlog import EventLog
from relay.mail.message import normalize_line_endings

log = EventLog(__name__)

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s*")

UNREACHABLE = SmtpReply(451, "4.4.1", "upstream MTA unreachable, try again later")
DROPPED = SmtpReply(451, "4.4.2", "upstream MTA connection lost, try again later")
NO_SMTPUTF8 = SmtpReply(
    553, "5.6.7", "non-ASCII address, and the upstream MTA does not support SMTPUTF8"
)
"""RFC 6531 3.2: a UTF-8 address cannot be passed on to a server without SMTPUTF8."""
BAD_ADDRESS = SmtpReply(553, "5.1.3", "address cannot be written on an SMTP command line")


@dataclass(frozen=True, slots=True)
class Outbound:
    """One upstream transaction: envelope and the final bytes (already signed)."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes


def reply_from(code: int, message: str, stage: str = "") -> SmtpReply:
    """An upstream reply as ours, keeping its code, enhanced code and reason.

    A 421 (the upstream closing the connection) becomes 451: our client's
    connection stays open, only this transaction failed.
    """
    code = 451 if code == 421 else code
    m = _ENHANCED.match(message)
    if m and m.group(1) == str(code)[0]:
        enhanced, text = ".".join(m.groups()), message[m.end() :]
    else:
        enhanced, text = f"{str(code)[0]}.0.0", message
    return SmtpReply(code, enhanced, sanitize_reply_text(f"upstream: {text}"), stage)


class _Dropped(Exception):
    """The connection broke; ``sent_data`` says whether the body had been written.

    Outside the ``RelayError`` tree on purpose: control flow inside this module
    (reconnect once, or not when the body was written), always caught here and turned into
    an ``SmtpReply``; it never reaches a caller.
    """

    def __init__(self, sent_data: bool) -> None:
        self.sent_data = sent_data


class Upstream:
    def __init__(self, config: UpstreamConfig, local_hostname: str | None = None) -> None:
        self._config = config
        self._local_hostname = config.helo_name or local_hostname
        self._idle: asyncio.LifoQueue[aiosmtplib.SMTP | None] = asyncio.LifoQueue()
        for _ in range(config.connections):
            self._idle.put_nowait(None)
        self._tls_context = ssl.create_default_context() if config.tls != "none" else None
        self.smtputf8: bool | None = None
        """Whether the upstream offered SMTPUTF8 on the last connection (None: not yet known)."""

    @property
    def connections(self) -> int:
        return self._config.connections

    @property
    def timeout(self) -> float:
        return self._config.timeout

    @property
    def identity(self) -> str:
        """Which upstream this is, for the retry queue: ``upstream.name`` or host:port.

        A loopback upstream is each host's own MTA, so its identity names the host too.
        """
        c = self._config
        if c.name:
            return c.name
        where = f"{c.host}:{c.port}"
        loopback = c.host == "localhost" or c.host.startswith("127.") or c.host == "::1"
        return f"{self._local_hostname or socket.gethostname()}/{where}" if loopback else where

    def _new_client(self) -> aiosmtplib.SMTP:
        c = self._config
        return aiosmtplib.SMTP(
            hostname=c.host,
            port=c.port,
            timeout=c.timeout,
            local_hostname=self._local_hostname,
            use_tls=c.tls == "implicit",
            start_tls=c.tls == "starttls",
            tls_context=self._tls_context,
            username=c.username,
            password=c.password.reveal().decode() if c.password else None,
        )

    async def send(self, out: Outbound) -> dict[str, SmtpReply]:
        """Hand ``out`` on; one reply per recipient, never an exception."""
        client = await self._idle.get()
        try:
            for attempt in (1, 2):
                fresh = client is None or not client.is_connected
                if fresh:
                    client, failure = await self._connect(client)
                    if failure is not None:
                        return dict.fromkeys(out.recipients, failure)
                assert client is not None
                try:
                    return await self._transaction(client, out)
                except _Dropped as dropped:
                    client.close()
                    if dropped.sent_data or fresh or attempt == 2:
                        log.warning("upstream connection lost", sent_data=dropped.sent_data)
                        return dict.fromkeys(out.recipients, DROPPED)
                    log.info("upstream reconnect", reason="idle connection was closed")
            raise AssertionError("unreachable")
        except BaseException:
            if client is not None:
                client.close()
                client = None
            raise
        finally:
            self._idle.put_nowait(client)

    async def _connect(
        self, old: aiosmtplib.SMTP | None
    ) -> tuple[aiosmtplib.SMTP | None, SmtpReply | None]:
        if old is not None:
            old.close()
        client = self._new_client()
        try:
            await client.connect()
            if not client.supports_esmtp:  # MAIL options (SMTPUTF8, SIZE) depend on EHLO
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
        except aiosmtplib.SMTPResponseException as exc:
            log.warning("upstream refused the connection", code=exc.code)
            reply = reply_from(exc.code, exc.message)
            if reply.is_success:
                reply = UNREACHABLE
            return None, reply if not reply.is_permanent else UNREACHABLE
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning("upstream unreachable", error=type(exc).__name__)
            return None, UNREACHABLE
        self.smtputf8 = client.supports_extension("smtputf8")
        return client, None

    async def _transaction(self, client: aiosmtplib.SMTP, out: Outbound) -> dict[str, SmtpReply]:
        replies: dict[str, SmtpReply] = {}
        if not client.supports_extension("smtputf8"):
            if not out.mail_from.isascii():
                return dict.fromkeys(out.recipients, NO_SMTPUTF8)
            replies = {r: NO_SMTPUTF8 for r in out.recipients if not r.isascii()}
            if replies:
                log.warning("upstream lacks SMTPUTF8", refused=len(replies), reply="553 5.6.7")
                if len(replies) == len(out.recipients):
                    return replies
                out = Outbound(
                    out.mail_from, tuple(r for r in out.recipients if r.isascii()), out.data
                )
        options = _mail_options(client, out)
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        try:
            mail = _command(b"MAIL FROM:", out.mail_from, options, encoding)
        except ValueError:
            return replies | dict.fromkeys(out.recipients, BAD_ADDRESS)
        rcpts: dict[str, bytes] = {}
        for rcpt in out.recipients:
            try:
                rcpts[rcpt] = _command(b"RCPT TO:", rcpt, (), encoding)
            except ValueError:
                replies[rcpt] = BAD_ADDRESS
        if not rcpts:
            return replies
        pipelining = client.supports_extension("pipelining")
        with _Conversation.over(client, self._config.timeout) as talk:
            return replies | await _exchange(talk, mail, rcpts, out.data, pipelining)

    async def close(self) -> None:
        """Close every idle connection politely (QUIT), bounded by the timeout."""
        clients: list[aiosmtplib.SMTP] = []
        while not self._idle.empty():
            client = self._idle.get_nowait()
            if client is not None:
                clients.append(client)
        for client in clients:
            try:
                if client.is_connected:
                    async with asyncio.timeout(2):
                        await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
        for _ in range(self._config.connections):
            self._idle.put_nowait(None)


_MAX_REPLY = 32 * 1024
"""Bytes of one unfinished reply before the stream counts as garbage (EHLO is a few KB)."""
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_ACCEPTED = (250, 251)


class _Reply(NamedTuple):
    code: int
    text: str


def _take_reply(buffer: bytearray) -> _Reply | None:
    """Cut one complete reply off the front of ``buffer`` (text lines joined by LF, as
    aiosmtplib joins them); ``None`` while it is incomplete, ``ValueError`` if malformed."""
    texts: list[bytes] = []
    offset = 0
    while True:
        end = buffer.find(b"\n", offset)
        if end == -1:
            return None
        line = bytes(buffer[offset : end + 1])
        offset = end + 1
        code = line[:3]
        if not code.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
            raise ValueError("not an SMTP reply line")
        texts.append(line[4:].strip(b" \t\r\n"))
        if line[3:4] != b"-":
            del buffer[:offset]
            return _Reply(int(code), b"\n".join(texts).decode("utf-8", "surrogateescape"))


class _Conversation(asyncio.Protocol):
    """One transaction's side of a connection: write commands, read their replies in order.

    aiosmtplib's protocol object cannot read pipelined replies: it parses one reply per
    ``data_received`` call (a second reply in the same segment stays in its buffer until
    more bytes come) and drops bytes that arrive while a parsed reply waits to be picked
    up. So for one transaction this object takes over the transport (``set_protocol``)
    and gives it back after; connection loss and flow control are passed on, so the
    aiosmtplib client sees a drop as it would have. A reply that cannot be read (closed,
    timed out, garbled) raises ``_Dropped``, saying whether the body had been written;
    a connection left out of step is closed, never reused.
    """

    def __init__(
        self, inner: asyncio.BaseProtocol, transport: asyncio.WriteTransport, timeout: float
    ) -> None:
        self._inner = inner
        self._transport = transport
        self._timeout = timeout
        self._buffer = bytearray()
        self._replies: deque[_Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._broken = False
        self.body_sent = False

    @classmethod
    @contextlib.contextmanager
    def over(cls, client: aiosmtplib.SMTP, timeout: float) -> Iterator[_Conversation]:
        inner = client.protocol
        transport = inner.transport if inner is not None else None
        if inner is None or transport is None or transport.is_closing():
            raise _Dropped(sent_data=False)
        talk = cls(inner, cast(asyncio.WriteTransport, transport), timeout)
        transport.set_protocol(talk)
        try:
            yield talk
        finally:
            if not transport.is_closing():
                transport.set_protocol(inner)
            if talk._broken or talk._buffer or talk._replies:
                client.close()

    def write(self, data: bytes, *, body: bool = False) -> None:
        if self._broken or self._transport.is_closing():
            raise _Dropped(sent_data=self.body_sent)
        self._transport.write(data)
        self.body_sent = self.body_sent or body

    async def read(self) -> _Reply:
        """The next reply, waiting at most ``upstream.timeout`` for it."""
        if not self._replies and not self._broken:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._waiter
            except TimeoutError:
                log.warning("upstream reply timed out", timeout=self._timeout)
                self._broken = True
            finally:
                self._waiter = None
        if self._replies:
            return self._replies.popleft()
        self._broken = True
        raise _Dropped(sent_data=self.body_sent)

    def give_up(self) -> None:
        """The server is closing (421) or out of step: close the connection after this."""
        self._broken = True

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        self._buffer += data
        try:
            while (reply := _take_reply(self._buffer)) is not None:
                self._replies.append(reply)
        except ValueError:
            log.warning("upstream sent a malformed reply")
            self._broken = True
        if len(self._buffer) > _MAX_REPLY:
            log.warning("upstream reply too long")
            self._broken = True
        self._wake()

    def eof_received(self) -> bool:
        self._broken = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._broken = True
        self._wake()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


async def _exchange(
    talk: _Conversation, mail: bytes, rcpts: dict[str, bytes], data: bytes, pipelining: bool
) -> dict[str, SmtpReply]:
    """MAIL, each RCPT and DATA, then the body if DATA got 354; a reply per recipient.

    Pipelining, the commands go in one write and every reply is read, in order.
    Without it each command waits for the one before and stops where the server
    refused: no RCPT after a refused MAIL, no DATA when every RCPT was refused.
    """
    recipients = list(rcpts)
    commands = [mail, *rcpts.values(), b"DATA\r\n"]
    if pipelining:
        talk.write(b"".join(commands))
    got: list[_Reply] = []
    for n, command in enumerate(commands):
        if not pipelining:
            if n > 0 and got[0].code != 250:
                break
            if n == len(commands) - 1 and not any(r.code in _ACCEPTED for r in got[1:]):
                break
            talk.write(command)
        try:
            got.append(await talk.read())
        except _Dropped:
            if not got or got[0].code == 250:
                raise
            talk.give_up()  # a server that closes after refusing MAIL: the refusal stands
            break
        if got[-1].code == 421:  # the server is closing: no more replies will come
            talk.give_up()
            break
    data_reply = got[-1] if len(got) == len(commands) else None
    if got[0].code != 250:
        await _reset(talk, data_reply)
        return dict.fromkeys(recipients, reply_from(got[0].code, got[0].text))
    replies = {
        rcpt: reply_from(r.code, r.text, "rcpt")
        for rcpt, r in zip(recipients, got[1 : 1 + len(recipients)], strict=False)
        if r.code not in (*_ACCEPTED, 421)
    }
    accepted = [r for r in recipients if r not in replies]
    if got[-1].code == 421:  # not about a recipient: for all not refused, answered or not
        return replies | dict.fromkeys(accepted, reply_from(got[-1].code, got[-1].text))
    if not accepted or data_reply is None or data_reply.code != 354:
        if accepted and data_reply is not None:
            replies |= dict.fromkeys(accepted, reply_from(data_reply.code, data_reply.text))
        await _reset(talk, data_reply)
        return replies
    talk.write(_dot_stuffed(data), body=True)
    final = await talk.read()
    if final.code == 421:
        talk.give_up()
    return replies | dict.fromkeys(accepted, reply_from(final.code, final.text))


async def _reset(talk: _Conversation, data_reply: _Reply | None) -> None:
    """RSET after a transaction that sent no body; the replies already stand, so a
    failure here only closes the connection."""
    try:
        if data_reply is not None and data_reply.code == 354:
            # A server that wants a body without an accepted recipient: an empty one,
            # its reply discarded.
            talk.write(b".\r\n")
            await talk.read()
        talk.write(b"RSET\r\n")
        if (await talk.read()).code != 250:
            talk.give_up()
    except _Dropped:
        talk.give_up()


def _command(verb: bytes, address: str, options: Sequence[str], encoding: str) -> bytes:
    """``MAIL FROM:<a> SIZE=9`` as aiosmtplib's ``mail()``/``rcpt()`` write it, with its
    checks: ``ValueError`` for an address that is unsafe on a command line."""
    line = b" ".join([verb + _quoted(address, encoding), *map(str.encode, options)])
    if _CONTROL.search(line):
        raise ValueError("control character in an address")
    return line + b"\r\n"


@functools.lru_cache(maxsize=1024)
def _quoted(address: str, encoding: str) -> bytes:
    """``<address>`` (``email.utils.parseaddr`` inside: a tenth of the transaction's CPU,
    so a sender used for every message is parsed once)."""
    return quote_address(address).encode(encoding)


def _dot_stuffed(data: bytes) -> bytes:
    """The body as it goes after 354: CRLF line endings, leading dots doubled, ``.`` line.

    The relay's messages are already CRLF (``relay.mail.message``), so normalizing is
    one scan; the rest is two C-level byte operations instead of aiosmtplib's two
    regex passes over the whole message.
    """
    data = normalize_line_endings(data).replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def _mail_options(client: aiosmtplib.SMTP, out: Outbound) -> list[str]:
    options = []
    if client.supports_extension("8bitmime") and not out.data.isascii():
        options.append("BODY=8BITMIME")
    if client.supports_extension("smtputf8") and not all(
        a.isascii() for a in (out.mail_from, *out.recipients)
    ):
        options.append("SMTPUTF8")
    if client.supports_extension("size"):
        options.append(f"SIZE={len(out.data)}")
    return options


def summarize(replies: Sequence[SmtpReply]) -> str:
    """``250:3 451:1`` for a log line."""
    counts: dict[int, int] = {}
    for reply in replies:
        counts[reply.code] = counts.get(reply.code, 0) + 1
    return " ".join(f"{code}:{n}" for code, n in sorted(counts.items()))
