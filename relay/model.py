"""Domain types shared by every layer: message classes, scopes, routes, envelopes.

A leaf: imports nothing of the relay, so config, mail, store and the front ends
can all name these without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

MessageClass = Literal["marketing", "transactional"]
UnsubscribeScope = Literal["group", "sender", "all_marketing"]
BounceKind = Literal["hard", "soft", "policy", "unknown"]
BOUNCE_KINDS: tuple[BounceKind, ...] = ("hard", "soft", "policy", "unknown")
Reason = Literal[
    "user-unknown",
    "host-unknown",
    "mailbox-full",
    "too-big",
    "filtered",
    "blocked",
    "policy",
    "suspended",
    "expired",
    "rate-limited",
    "system-error",
    "network-error",
    "auto-reply",
    "complaint",
    "unknown",
]
REASONS: tuple[Reason, ...] = get_args(Reason)
"""Why a delivery failed (``relay.feedback.reasons`` decides; thresholds count kinds)."""
NOT_FAILURES: tuple[Reason, ...] = ("auto-reply", "complaint")


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
