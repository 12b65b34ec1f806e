"""Delivery to the upstream MTA over a small pool of reused aiosmtplib connections.

aiosmtplib has no pool and no reconnect: a connection is one ``SMTP`` object with
a lock. ``Upstream`` keeps ``upstream.connections`` of them, connects lazily,
reconnects after a drop, and runs each transaction command by command so it
knows how far a failed one got: a drop before DATA is retried once on a fresh
connection (nothing was handed on), a drop after DATA is reported as a
temporary failure and never silently retried here.

All aiosmtplib exceptions are translated into per-recipient ``SmtpReply`` values
in this module; the pipeline never sees a library exception.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from relay.config import UpstreamConfig
from relay.errors import SmtpReply, sanitize_reply_text
from relay.eventlog import EventLog

log = EventLog(__name__)

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s*")

UNREACHABLE = SmtpReply(451, "4.4.1", "upstream MTA unreachable, try again later")
DROPPED = SmtpReply(451, "4.4.2", "upstream MTA connection lost, try again later")
NO_SMTPUTF8 = SmtpReply(
    553, "5.6.7", "non-ASCII address, and the upstream MTA does not support SMTPUTF8"
)
"""RFC 6531 3.2: a UTF-8 address cannot be passed on to a server without SMTPUTF8."""


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
    """The connection broke; ``sent_data`` says whether DATA had been sent.

    Outside the ``RelayError`` tree on purpose: control flow inside this module
    (reconnect once, or not when DATA was sent), always caught here and turned into
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
            try:
                await client.mail(out.mail_from, options=options, encoding=encoding)
            except aiosmtplib.SMTPResponseException as exc:
                await _rset(client)
                return replies | dict.fromkeys(out.recipients, reply_from(exc.code, exc.message))
            for rcpt in out.recipients:
                try:
                    await client.rcpt(rcpt, encoding=encoding)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    replies[rcpt] = reply_from(exc.code, exc.message, "rcpt")
            accepted = [r for r in out.recipients if r not in replies]
            if not accepted:
                await _rset(client)
                return replies
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError):
            raise _Dropped(sent_data=False) from None
        try:
            response = await client.data(out.data)
        except aiosmtplib.SMTPResponseException as exc:
            reply = reply_from(exc.code, exc.message)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError):
            raise _Dropped(sent_data=True) from None
        else:
            reply = reply_from(response.code, response.message)
        for rcpt in accepted:
            replies[rcpt] = reply
        return replies

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


async def _rset(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except aiosmtplib.SMTPResponseException:
        client.close()


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
