"""Small value objects shared by the pipeline steps."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from relay.config import MessageClass, UnsubscribeScope


def normalize_address(address: str) -> str:
    """The one place addresses are normalised for comparison and storage.

    Angle brackets and surrounding space go; the domain is lower-cased and
    converted to its ASCII (IDNA) form; the local part is compared
    case-insensitively, as every large mailbox provider does, so it is
    lower-cased too.
    """
    text = address.strip().strip("<>").strip()
    local, at, domain = text.rpartition("@")
    if not at:
        return text.lower()
    with contextlib.suppress(UnicodeError):
        domain = domain.encode("idna").decode("ascii")
    return f"{local.lower()}@{domain.lower()}"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass(frozen=True, slots=True)
class Route:
    """What the policy decided for one message's From address."""

    message_class: MessageClass
    group: str | None
    sender: str
    """The From header address, normalised."""
    unsubscribe_scope: UnsubscribeScope = "group"
    keep_app_unsubscribe: bool = False
    rule: str = "default"
    """The ``match`` of the sender rule that decided, for logs and check-config."""

    @property
    def is_marketing(self) -> bool:
        return self.message_class == "marketing"


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the SMTP client handed over: immutable, unlike aiosmtpd's envelope."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    client: str = ""
    helo: str = ""
    mail_options: tuple[str, ...] = ()
