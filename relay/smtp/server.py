"""The SMTP front end: aiosmtpd in our own event loop, the only place reply text is made.

``RelaySMTP`` adjusts aiosmtpd where the relay needs other behaviour: clients
outside ``smtp.allowed_networks`` are refused at the greeting (``554 5.7.1``),
every reply carries an enhanced status code (RFC 2034), PIPELINING and
ENHANCEDSTATUSCODES are advertised, and lines up to 1 MiB are read so a message
with bare LF line endings reaches the pipeline to be normalised instead of being
cut. ``RelayHandler`` builds the immutable ``Envelope`` and runs the pipeline
shielded from the client's connection: a client that hangs up after the final
dot does not cancel a delivery that is already under way, and one that only shuts
its sending side (``shutdown(SHUT_WR)``) still reads the reply to that dot.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import re
import ssl
from typing import Any, AnyStr, ClassVar

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, Session
from aiosmtpd.smtp import Envelope as AioEnvelope

from relay.config import SmtpConfig
from relay.eventlog import EventLog
from relay.limits import ConnectionLimiter, RateLimiter, client_key
from relay.mail.address import address_problem
from relay.metrics import Metrics
from relay.model import Envelope
from relay.outbound.pipeline import Pipeline
from relay.outbound.shield import Shielded
from relay.smtp.auth import Users

log = EventLog(__name__)

_PLAIN_PATH = re.compile(r"^\s*<([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+|)>(.*)$")
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_DEFAULT_ENHANCED = {
    221: "2.0.0",
    421: "4.3.0",
    450: "4.0.0",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    535: "5.7.8",
    550: "5.0.0",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.0.0",
    555: "5.5.4",
}


def with_enhanced_code(status: str) -> str:
    """Add an RFC 3463 code to a reply aiosmtpd wrote without one.

    The greeting, EHLO/HELO lines, 354 and 334 are left as they are (RFC 2034).
    """
    if _HAS_ENHANCED.match(status) or len(status) < 4 or status[3] != " ":
        return status
    if status == "250 OK":
        return "250 2.0.0 OK"
    code = int(status[:3]) if status[:3].isdigit() else 0
    enhanced = _DEFAULT_ENHANCED.get(code)
    return f"{status[:4]}{enhanced} {status[4:]}" if enhanced else status


class _CrlfReader(asyncio.StreamReader):
    """Command lines end at CRLF only; DATA is framed in whole buffers, not line by line.

    aiosmtpd reads commands with ``readuntil()`` (LF); a client could then smuggle a
    second command after a bare LF inside an address. Read to CRLF instead, so the
    whole line is one (bad) command with one reply.

    aiosmtpd reads DATA one line at a time (a ``readuntil`` and a Python loop turn per
    line, about a fifth of the relay's CPU for a 4 KB message); ``read_data`` searches
    the buffer for the end of data as it arrives and takes the message in one piece.
    """

    async def readuntil(self, separator: bytes = b"\n") -> bytes:  # type: ignore[override]
        try:
            return await super().readuntil(b"\r\n" if separator == b"\n" else separator)
        except asyncio.IncompleteReadError:
            # The client's EOF (see RelaySMTP.eof_received): aiosmtpd ends the session
            # on a lost connection, the replies already written still go out.
            raise ConnectionResetError("client closed its side") from None

    async def read_data(self, max_size: int | None, max_line: int) -> bytes | str:
        """The message up to ``<CRLF>.<CRLF>``, dot-unstuffed; or the reply for a breach.

        Over ``max_size`` octets, or a line over ``max_line``, the rest is read and
        thrown away up to the end of data (RFC 5321 4.2.5: answer after the dot), keeping
        memory bounded; the reply is then aiosmtpd's ``552`` or ``500``. Raises
        ``BareLineFeedTerminator`` for ``<LF>.<LF>`` with a bare first LF, and
        ``ConnectionResetError`` when the client closes before the end of data.
        """
        buffer: bytearray = self._buffer  # type: ignore[attr-defined]
        buffer[0:0] = b"\r\n"  # the CRLF before the first line: an empty message is "."
        scan = 0  # where the next search for the end of data starts
        line_start = 2  # where the line being received starts
        problem = ""
        while True:
            end = buffer.find(b"\r\n.\r\n", scan)
            stop = end + 2 if end >= 0 else len(buffer)  # the data so far, last CRLF included
            if _bare_terminator(buffer, scan, stop):
                raise BareLineFeedTerminator
            if not problem:
                problem, line_start = _breach(buffer, stop, line_start, max_size, max_line)
            if end >= 0:
                data = b"" if problem else bytes(memoryview(buffer)[2:stop])
                del buffer[: end + 5]
                self._maybe_resume_transport()  # type: ignore[attr-defined]
                if problem:
                    return problem
                if data.startswith(b"."):
                    data = data[1:]
                return data.replace(b"\r\n.", b"\r\n")
            if problem:
                del buffer[:-4]  # nothing more is kept but what may begin the end of data
            scan = max(0, len(buffer) - 4)
            exception = self.exception()
            if exception is not None:
                raise exception
            if self._eof:  # type: ignore[attr-defined]
                raise ConnectionResetError("client closed its side during DATA")
            await self._wait_for_data("read_data")  # type: ignore[attr-defined]


TOO_MUCH = "552 Error: Too much mail data"
TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"


def _breach(
    buffer: bytearray, stop: int, line_start: int, max_size: int | None, max_line: int
) -> tuple[str, int]:
    """The reply if ``buffer[2:stop]`` breaks a limit (else ""), and where its open line starts.

    Lines are looked at one by one only when the stretch since the last line ending is
    longer than a line may be; otherwise no line in it can be too long.
    """
    if max_size is not None and stop - 2 > max_size:
        return TOO_MUCH, line_start
    if stop - line_start <= max_line:
        last = buffer.rfind(b"\r\n", line_start, stop)
        return "", line_start if last < 0 else last + 2
    at = buffer.find(b"\r\n", line_start, stop)
    while at >= 0:
        if at + 2 - line_start > max_line:
            return TOO_LONG, line_start
        line_start = at + 2
        at = buffer.find(b"\r\n", line_start, stop)
    return (TOO_LONG if stop - line_start > max_line else ""), line_start


class BareLineFeedTerminator(Exception):
    """DATA ended with <LF>.<LF>: not the end of data (smuggling), and not to be waited on."""


def _bare_terminator(data: bytes | bytearray, start: int, stop: int) -> bool:
    """Whether ``data[start:stop]`` holds <LF>.<LF> whose first LF is bare (not after a CR)."""
    at = data.find(b"\n.\n", start, stop)
    while at >= 0:
        if at == 0 or data[at - 1] != 0x0D:
            return True
        at = data.find(b"\n.\n", at + 1, stop)
    return False


class HookNames:
    """``dir()`` gives only the command and hook names, from a per-class cache.

    aiosmtpd finds the server's ``smtp_*``/``auth_*`` methods and the handler's
    ``handle_*`` hooks with ``dir()`` and ``inspect.getmembers()`` on every new
    connection: about 0.3 ms of CPU here, more than the rest of a session's set-up.
    The names are the class's and never change, so they are listed once. It also
    reads the EHLO hook's signature per connection: that is set on the function once.
    """

    _names: ClassVar[dict[type, list[str]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hook = cls.__dict__.get("handle_EHLO")
        if hook is not None:
            hook.__signature__ = inspect.signature(hook)

    def __dir__(self) -> list[str]:
        cls = type(self)
        names = HookNames._names.get(cls)
        if names is None:
            prefixes = ("smtp_", "auth_", "handle_")
            names = HookNames._names[cls] = [n for n in dir(cls) if n.startswith(prefixes)]
        return names


class LimitedConnections(HookNames):
    """Connection caps for an aiosmtpd listener: over a cap, ``421 4.7.0`` and close.

    Checked in ``connection_made``, before aiosmtpd starts a session task, so a
    refused connection costs one write. The STARTTLS handshake calls
    ``connection_made`` again on the same object: that is not a new connection.
    """

    limiter: ConnectionLimiter
    listener_name = "smtp"
    _limit_client: str | None = None
    _refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._limit_client is None and not self._refused:
            client = client_key(transport.get_extra_info("peername"))
            refusal = self.limiter.admit(client)
            if refusal is not None:
                self._refused = True
                self._metrics.connections_refused.labels(self.listener_name, refusal).inc()
                log.warning(
                    f"{self.listener_name} refused",
                    client=client,
                    reason="too-many-connections",
                    cap=refusal,
                )
                whom = "from your address" if refusal == "client" else "to this server"
                reply = f"421 4.7.0 {self.hostname} too many connections {whom}, try again later"
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(reply.encode() + b"\r\n")
                transport.close()
                return
            self._limit_client = client
        super().connection_made(transport)  # type: ignore[misc]

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._limit_client is not None:
            self.limiter.release(self._limit_client)
            self._limit_client = None
        super().connection_lost(error)  # type: ignore[misc]

    @property
    def _metrics(self) -> Metrics:
        metrics: Metrics = self.event_handler.metrics  # type: ignore[attr-defined]
        return metrics

    hostname: str


class RelaySMTP(LimitedConnections, SMTP):
    line_length_limit = 1024 * 1024

    def __init__(
        self,
        handler: RelayHandler,
        config: SmtpConfig,
        tls_context: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> None:
        implicit = config.tls is not None and config.tls.mode == "implicit"
        super().__init__(
            handler,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.hostname,
            ident="oneclick-relay",
            timeout=config.timeout,
            tls_context=None if implicit else tls_context,
            auth_require_tls=not implicit,
            **kwargs,
        )
        self.limiter = handler.limiter
        self._allowed = config.allowed_networks
        self._offered: tuple[str, LoginPassword] | None = None
        self.auth_failures = 0
        self._stream_reader.__class__ = _CrlfReader  # type: ignore[attr-defined]
        self.trusted = False
        """The client is in allowed_networks; others must authenticate before MAIL."""
        self._continued: list[str] = []
        """The lines of a multi-line reply written so far (see ``push``)."""

    def eof_received(self) -> bool | None:
        """EOF: finish what the client sent before it, answer it, then end the session.

        aiosmtpd cancels the session at once; but a client that half-closed
        (``shutdown(SHUT_WR)``) right after the final dot can still read, and without
        the reply it would resend a message that was delivered. So the EOF goes to the
        reader instead: the commands before it are answered, and at the EOF itself the
        reader raises ``ConnectionResetError``, on which aiosmtpd closes the session
        (mid-DATA too: an unterminated message is never taken as complete).
        """
        if self.session is None or self.session.ssl is not None:
            return super().eof_received()  # TLS: aiosmtpd's own handling
        asyncio.StreamReaderProtocol.eof_received(self)
        return True  # keep the transport open for the replies

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Plain ``<local@domain>`` paths directly; anything else through aiosmtpd's parser.

        aiosmtpd parses every path with the email package's header parser (about a
        sixth of the relay's CPU per message); the common case needs none of it. Its
        parser also raises on some garbage (``MAIL FROM:a b@``): that is malformed.
        """
        m = _PLAIN_PATH.match(arg)
        if m is not None:
            return m.group(1) or "<>", m.group(2)
        try:
            result: tuple[str | None, str | None] = super()._getaddr(arg)
        except Exception:  # email's header parser raises several undocumented errors
            return None, None
        return result

    def _peer_allowed(self) -> bool:
        peer = self.session.peer if self.session else None
        if not isinstance(peer, tuple) or not peer:
            return isinstance(peer, str)  # a Unix socket: local by definition
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self._allowed)

    async def _handle_client(self) -> None:
        self.trusted = self._peer_allowed()
        if not self.trusted and self.event_handler.users is None:
            peer = self.session.peer if self.session else None
            client = peer[0] if isinstance(peer, tuple) else "unknown"
            log.warning("refused", client=client, reason="not-in-allowed-networks")
            await self.push(f"554 5.7.1 {self.hostname} relay access denied for {client}")
            if self.transport is not None:
                self.transport.close()
            return
        with contextlib.suppress(ConnectionResetError):  # aiosmtpd logged it and closed
            await super()._handle_client()

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        """aiosmtpd's synchronous check: only note what was offered (see ``auth_PLAIN``)."""
        self._offered = (mechanism, auth_data)
        return AuthResult(success=False, handled=True)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """aiosmtpd's parsing, then ``RelayHandler.verify`` off the loop (scrypt in a thread)."""
        self._offered = None
        result: AuthResult = await super().auth_PLAIN(server, args)
        return await self._verify_offered(result)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        self._offered = None
        result: AuthResult = await super().auth_LOGIN(server, args)
        return await self._verify_offered(result)

    async def _verify_offered(self, parsed: AuthResult) -> AuthResult:
        offered, self._offered = self._offered, None
        if offered is None:  # aiosmtpd already answered (bad base64, '*', …)
            return parsed
        mechanism, credentials = offered
        handler: RelayHandler = self.event_handler
        return await handler.verify(self, mechanism, credentials)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA command, with the data read by ``_CrlfReader.read_data``."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader = self._reader
        assert isinstance(reader, _CrlfReader)
        try:
            data = await reader.read_data(self.data_size_limit, self.line_length_limit)
        except asyncio.CancelledError:  # the connection was lost during DATA
            self._writer.close()
            raise
        except BareLineFeedTerminator:
            # as Postfix 3.9 (smtpd_forbid_bare_newline): refuse and hang up, relay nothing
            peer = self.session.peer if self.session else None
            log.warning(
                "refused",
                client=peer[0] if isinstance(peer, tuple) else "unknown",
                reason="bare-lf-data-terminator",
            )
            await self.push(
                "521 5.5.2 bare <LF> received: end DATA with <CR><LF>.<CR><LF>; closing"
            )
            if self.transport is not None:
                self.transport.close()
            return
        if isinstance(data, str):  # over a limit: answered after the dot, nothing kept
            peer = self.session.peer if self.session else None
            log.warning(
                "refused",
                client=peer[0] if isinstance(peer, tuple) else "unknown",
                reason="message-too-big" if data == TOO_MUCH else "line-too-long",
            )
            await self.push(data)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = self.envelope.original_content = data
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def push(self, status: AnyStr) -> None:
        """One reply, one write: the lines of a multi-line reply (EHLO's) go out together.

        aiosmtpd writes each line on its own, a system call apiece; ``250-`` lines are
        held until the reply's last line, so an EHLO reply is one segment, not seven.
        """
        if isinstance(status, str):
            text = with_enhanced_code(status)
            if text[3:4] == "-":
                self._continued.append(text)
                return
            code = text[:3]
            if code[:1] in ("4", "5") and code.isdigit():
                self._metrics.rejected.labels(code, text[4:9].strip()).inc()
            if self._continued:
                text = "\r\n".join([*self._continued, text])
                self._continued.clear()
            await super().push(text)
        else:
            await super().push(status)


class ShieldedTransactions(HookNames, Shielded):
    """Each transaction runs as its own task, shielded from the client's connection.

    aiosmtpd cancels the session when the client hangs up; a delivery already under
    way must still finish (and be counted). Shutdown waits for these tasks.
    """

    async def handle_exception(self, error: Exception) -> str:
        log.exception("session error", server=type(self).__name__, error=type(error).__name__)
        return "451 4.3.0 internal error, try again later"


class RelayHandler(ShieldedTransactions):
    """aiosmtpd hooks; each returns the literal reply line."""

    def __init__(
        self,
        pipeline: Pipeline,
        config: SmtpConfig,
        metrics: Metrics,
        users: Users | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.config = config
        self.metrics = metrics
        self.users = users
        self.limiter = ConnectionLimiter(config.max_connections, config.max_connections_per_client)
        self._auth_failures = RateLimiter(config.auth_max_failures_per_client, window=600.0)
        self._hashing = asyncio.Semaphore(1)
        """scrypt runs in a thread (hashlib releases the GIL), one at a time: the event
        loop keeps a core, and a guessing flood queues behind the delay and the caps."""
        super().__init__()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: AioEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.users is None:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        return [responses[0], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", *responses[1:]]

    async def verify(
        self, server: RelaySMTP, mechanism: str, credentials: LoginPassword
    ) -> AuthResult:
        """Check a password off the event loop; slow down and cut off repeated failures.

        A failure is answered after ``smtp.auth_failure_delay``; the
        ``smtp.auth_max_failures``-th on one connection closes it, and an address with
        ``smtp.auth_max_failures_per_client`` failures in ten minutes is refused
        before its password is even checked.
        """
        session = server.session
        peer = session.peer if session is not None else None
        client = client_key(peer)
        login = credentials.login.decode("utf-8", errors="replace")
        if self._auth_failures.count(client) >= self._auth_failures.limit:
            self.metrics.auth_failures.labels("refused").inc()
            log.warning("auth refused", client=client, reason="too-many-failures")
            await self._close(server, "421 4.7.0 too many failed authentications, try again later")
            return AuthResult(success=False, handled=True)
        ok = False
        if self.users is not None:
            password = credentials.password.decode("utf-8", errors="replace")
            async with self._hashing:
                ok = await asyncio.to_thread(self.users.verify, login, password)
        log.info("auth", user=login[:64], mechanism=mechanism, client=client, ok=ok)
        if ok:
            return AuthResult(success=True, handled=False, auth_data=login)
        self._auth_failures.add(client)
        server.auth_failures += 1
        self.metrics.auth_failures.labels("failed").inc()
        self.metrics.rejected.labels("535", "5.7.8").inc()
        await asyncio.sleep(self.config.auth_failure_delay)
        if server.auth_failures >= self.config.auth_max_failures:
            self.metrics.auth_failures.labels("disconnected").inc()
            await self._close(server, "421 4.7.0 too many failed authentications, closing")
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False)

    @staticmethod
    async def _close(server: RelaySMTP, reply: str) -> None:
        await server.push(reply)
        if server.transport is not None:
            server.transport.close()

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: AioEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not getattr(server, "trusted", False) and not session.authenticated:
            return "530 5.7.0 authentication required"
        if address != "<>":  # "<>" is the null reverse-path of bounces (RFC 5321 4.5.5)
            problem = address_problem(address, "SMTPUTF8" in (o.upper() for o in mail_options))
            if problem is not None:
                enhanced = "5.6.7" if "SMTPUTF8" in problem else "5.1.7"
                return f"553 {enhanced} sender rejected: {problem}"
            refusal = self.pipeline.refusal(address)
            if refusal is not None:
                return f"{refusal.code} {refusal.enhanced} sender rejected: {refusal.text}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: AioEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return f"452 4.5.3 too many recipients (at most {self.config.max_recipients})"
        problem = address_problem(address, envelope.smtp_utf8)
        if problem is not None:
            enhanced = "5.6.7" if "SMTPUTF8" in problem else "5.1.3"
            return f"553 {enhanced} recipient rejected: {problem}"
        refusal = self.pipeline.refusal(address)
        if refusal is not None:
            return f"{refusal.code} {refusal.enhanced} recipient rejected: {refusal.text}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: AioEnvelope) -> str:
        peer = session.peer if isinstance(session.peer, tuple) else ("127.0.0.1", 0)
        message = Envelope(
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            client=str(peer[0]),
            helo=session.host_name or "",
            mail_options=tuple(envelope.mail_options),
        )
        return str(await self.run_shielded(self.pipeline.handle(message)))
