"""The inbound listener: SMTP or LMTP for the relay's own addresses, and nothing else.

It takes mail only for the return path (``bounces@`` and every ``bounces+…@`` at
``bounces.return_path_domain``), ``bounces.feedback_addresses``, the mailto address
(``unsubscribe@`` and ``unsubscribe+…@`` at ``unsubscribe.mailto_domain``) and the
groups' own mailto addresses. Any other recipient gets ``550 5.7.1``: it is never a
relay. What a message means is decided by ``relay.feedback.intake``; the same
intake serves ``oneclick-relay ingest`` for an MTA that pipes mail to a command.

It can face the Internet as the MX of the return-path domain: clients outside
``bounces.allowed_networks`` get ``554 5.7.1``; ``bounces.max_connections`` and
``max_connections_per_client`` cap open connections (``421 4.7.0``);
``max_messages_per_client`` messages a minute per address (then ``451 4.7.1`` at
MAIL); at most ``MAX_RECIPIENTS`` recipients (a bounce has one); lines of 1000
octets and ``bounces.max_message_size``; STARTTLS with ``bounces.tls``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.config import BouncesConfig
from relay.errors import StoreUnavailable
from relay.eventlog import EventLog
from relay.feedback.intake import Intake
from relay.limits import ConnectionLimiter, RateLimiter, client_key
from relay.metrics import Metrics
from relay.smtp.server import LimitedConnections, ShieldedTransactions, with_enhanced_code

log = EventLog(__name__)


MAX_RECIPIENTS = 20


class _Guarded(LimitedConnections):
    """Every reply line carries an RFC 3463 code; caps and networks checked at connect."""

    listener_name = "inbound"
    line_length_limit = 1 << 20
    """Octets per line. RFC 5321 (4.5.3.1.6) allows 1,000, but some MTAs write a whole
    Diagnostic-Code or a base64 part unfolded, and refusing the bounce would lose it; the
    line buffer stays bounded (1 MiB per connection, under the connection caps) and
    ``bounces.max_message_size`` bounds the whole."""
    event_handler: InboundHandler

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            status = "\r\n".join(with_enhanced_code(line) for line in status.split("\r\n"))
        await super().push(status)  # type: ignore[misc]

    async def _handle_client(self) -> None:
        session = getattr(self, "session", None)
        peer = session.peer if session is not None else None
        if not self.event_handler.allowed(peer):
            client = client_key(peer)
            self._metrics.connections_refused.labels("inbound", "network").inc()
            log.warning("inbound refused", client=client, reason="not-in-allowed-networks")
            await self.push(f"554 5.7.1 {self.hostname} does not take mail from {client}")
            transport = getattr(self, "transport", None)
            if transport is not None:
                transport.close()
            return
        await super()._handle_client()  # type: ignore[misc]


class InboundSMTP(_Guarded, SMTP):
    pass


class InboundLMTP(_Guarded, LMTP):
    pass


class InboundHandler(ShieldedTransactions):
    """aiosmtpd hooks for the listener; an unknown recipient is refused at RCPT."""

    def __init__(self, intake: Intake, lmtp: bool, config: BouncesConfig, metrics: Metrics) -> None:
        self.intake = intake
        self._lmtp = lmtp
        self.metrics = metrics
        self._networks = config.allowed_networks
        self.limiter = ConnectionLimiter(config.max_connections, config.max_connections_per_client)
        self._rate = RateLimiter(config.max_messages_per_client)
        super().__init__()

    def allowed(self, peer: object) -> bool:
        if not isinstance(peer, tuple) or not peer:
            return True  # a Unix socket
        try:
            address = ipaddress.ip_address(str(peer[0]))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        client = client_key(session.peer)
        if not self._rate.allow(client):
            self.metrics.connections_refused.labels("inbound", "rate").inc()
            log.warning("inbound refused", client=client, reason="message-rate")
            return "451 4.7.1 too many messages from your address, try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return f"452 4.5.3 too many recipients (at most {MAX_RECIPIENTS})"
        if self.intake.addresses.role(address) is None:
            log.info("inbound refused", rcpt=address[:254], reason="not-our-address")
            return "550 5.7.1 this host only takes bounces and unsubscribe requests: relay denied"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        rcpts = tuple(envelope.rcpt_tos)
        protocol = "lmtp" if self._lmtp else "smtp"
        try:
            result = await self.run_shielded(
                self.intake.process(envelope.original_content or b"", rcpts, protocol)
            )
        except StoreUnavailable:
            reply = "451 4.3.0 temporary failure, try again later"
        else:
            reply = f"250 2.0.0 Ok: {result.outcome} id={result.id}"
        return "\r\n".join([reply] * len(rcpts)) if self._lmtp else reply


async def start_listener(
    handler: InboundHandler,
    config: BouncesConfig,
    hostname: str,
    *,
    reuse_port: bool = False,
    tls_context: ssl.SSLContext | None = None,
) -> asyncio.Server:
    assert config.listen is not None
    protocol = InboundLMTP if config.protocol == "lmtp" else InboundSMTP

    def factory() -> Any:
        server = protocol(
            handler,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="oneclick-relay bounces",
            timeout=config.timeout,
            tls_context=tls_context,
            require_starttls=False,
        )
        server.limiter = handler.limiter
        return server

    return await asyncio.get_running_loop().create_server(
        factory, config.listen.host, config.listen.port, reuse_port=reuse_port or None
    )
