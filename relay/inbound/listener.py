"""The inbound listener: SMTP or LMTP for the relay's own addresses, and nothing else.

It takes mail only for the return path (``bounces@`` and every ``bounces+…@`` at
``bounces.return_path_domain``), ``bounces.feedback_addresses``, the mailto address
(``unsubscribe@`` and ``unsubscribe+…@`` at ``unsubscribe.mailto_domain``) and the
groups' own mailto addresses. Any other recipient gets ``550 5.7.1``: it is never a
relay. What a message means is decided by ``relay.feedback.intake``; the same
intake serves ``oneclick-relay ingest`` for an MTA that pipes mail to a command.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.config import BouncesConfig
from relay.errors import StoreUnavailable
from relay.eventlog import EventLog
from relay.feedback.intake import Intake
from relay.smtp.server import ShieldedTransactions, with_enhanced_code

log = EventLog(__name__)


class _EnhancedReplies:
    """Every reply line carries an RFC 3463 code, as on the relay's own port."""

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            status = "\r\n".join(with_enhanced_code(line) for line in status.split("\r\n"))
        await super().push(status)  # type: ignore[misc]


class InboundSMTP(_EnhancedReplies, SMTP):
    pass


class InboundLMTP(_EnhancedReplies, LMTP):
    pass


class InboundHandler(ShieldedTransactions):
    """aiosmtpd hooks for the listener; an unknown recipient is refused at RCPT."""

    def __init__(self, intake: Intake, lmtp: bool) -> None:
        self.intake = intake
        self._lmtp = lmtp
        super().__init__()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
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
    handler: InboundHandler, config: BouncesConfig, hostname: str, *, reuse_port: bool = False
) -> asyncio.Server:
    assert config.listen is not None
    protocol = InboundLMTP if config.protocol == "lmtp" else InboundSMTP

    def factory() -> Any:
        return protocol(
            handler,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="oneclick-relay bounces",
            timeout=config.timeout,
        )

    return await asyncio.get_running_loop().create_server(
        factory, config.listen.host, config.listen.port, reuse_port=reuse_port or None
    )
