"""Reading what comes back: bounces, complaints, auto-replies; classifying failures.

Pure functions over the bytes of one inbound message, tried in this order:

1. RFC 5965 ARF feedback report (``multipart/report; report-type=feedback-report``)
   → a complaint;
2. RFC 3464 delivery status notification (``report-type=delivery-status``) → per
   recipient Action, Status, Diagnostic-Code and Remote-MTA;
3. an auto-reply (RFC 3834 ``Auto-Submitted``, ``X-Autoreply``, ``Precedence:
   auto_reply``, "out of office" subjects) from anyone but a mailer daemon → ignored;
4. the non-standard bounces of the big providers and old MTAs, through the
   detectors of ``flufl.bounce`` (Mailman's) rather than heuristics of our own;
5. anything else → unrecognised (ignored, counted).

``Classifier`` maps an RFC 3463 enhanced status code to a kind by the longest
matching prefix of ``DEFAULT_TABLE`` overlaid with ``bounces.classify``.
"""

from __future__ import annotations

import email
import email.message
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.parser import HeaderParser
from email.utils import getaddresses, parseaddr
from typing import Literal

import flufl.bounce

from relay.model import BounceKind

ReportKind = Literal["complaint", "dsn", "bounce", "auto-reply", "unrecognised"]
Verdict = Literal["hard", "soft", "policy", "unknown", "delayed", "success"]

DEFAULT_TABLE: tuple[tuple[str, BounceKind], ...] = (
    ("5", "unknown"),
    ("5.1.1", "hard"),  # bad destination mailbox address
    ("5.1.2", "hard"),  # bad destination system address (no such domain)
    ("5.1.3", "hard"),  # bad destination mailbox address syntax
    ("5.1.6", "hard"),  # mailbox has moved, no forwarding address
    ("5.1.10", "hard"),  # recipient address has null MX (RFC 7505)
    ("5.1.7", "policy"),  # bad *sender* mailbox syntax: our problem, not the recipient's
    ("5.1.8", "policy"),  # bad *sender* system address
    ("5.2.1", "hard"),  # mailbox disabled, not accepting messages
    ("5.2.2", "soft"),  # mailbox full
    ("5.3", "soft"),  # mail system (full, not accepting, message too big)
    ("5.4", "soft"),  # network and routing (no answer, loop, expired)
    ("5.7", "policy"),  # security or policy: blocks, reputation, DMARC
    ("4", "soft"),  # persistent transient failure (the MTA gave up)
    ("4.7", "policy"),  # deferred for reputation or rate limits: our problem, not the address's
)
"""Longest prefix wins; ``5.5.x``/``5.6.x`` and the rest of ``5`` are unknown."""

_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_DAEMONS = frozenset({"mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon", "mdaemon"})
_OUT_OF_OFFICE = re.compile(
    r"out of (the )?office|automatic reply|auto(matic)?[ -]?(reply|response)|autoreply|"
    r"vacation|away from (my|the) (desk|office)|abwesen|absence|r[ée]ponse automatique|"
    r"respuesta autom[áa]tica|risposta automatica|automatisch antwoord|不在|自動応答|自动回复",
    re.IGNORECASE,
)
_TOKEN_IN_SUBJECT = re.compile(r"(?i)\bunsubscribe\s+([A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{16,})")


class Classifier:
    def __init__(self, overrides: Sequence[tuple[str, BounceKind]] = ()) -> None:
        self._table: dict[str, BounceKind] = dict(DEFAULT_TABLE)
        self._table.update(overrides)

    def kind(self, status: str) -> BounceKind:
        """The kind of failure an enhanced status code (``5.1.1``) stands for."""
        parts = status.split(".")
        for n in (3, 2, 1):
            found = self._table.get(".".join(parts[:n]))
            if found is not None:
                return found
        return "unknown"

    def verdict(self, action: str, status: str) -> Verdict:
        """A DSN recipient block's meaning: a final failure of some kind, a delay, a success."""
        if action in ("delivered", "relayed", "expanded") or status.startswith("2."):
            return "success"
        if action == "delayed":
            return "delayed"
        return self.kind(status)


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """One recipient of a DSN (or of a non-standard bounce, as far as it can be read)."""

    recipient: str
    original: str = ""
    action: str = "failed"
    status: str = "5.0.0"
    diagnostic: str = ""
    remote_mta: str = ""


@dataclass(frozen=True, slots=True)
class Complaint:
    """The machine-readable part of an ARF report."""

    feedback_type: str
    original_rcpt_to: tuple[str, ...] = ()
    original_mail_from: str = ""
    user_agent: str = ""
    source_ip: str = ""


@dataclass(frozen=True, slots=True)
class Inbound:
    kind: ReportKind
    message_id: str
    sender: str
    subject: str
    detector: str = ""
    recipients: tuple[RecipientReport, ...] = ()
    complaint: Complaint | None = None
    addressed_to: tuple[str, ...] = ()
    """Delivered-To, X-Original-To, Envelope-To and To: where the message was sent."""
    text: str = field(default="", repr=False)
    """Every header and decoded text part, to look for our return paths and tokens in."""
    tokens: tuple[str, ...] = ()
    """Unsubscribe tokens quoted in ``text`` (filled by the intake, which knows the URL)."""


def enhanced_code(text: str, klass: str = "") -> str | None:
    """The first RFC 3463 code in ``text`` (of class ``klass`` when given)."""
    for m in _ENHANCED.finditer(text):
        if not klass or m.group(1) == klass:
            return ".".join(m.groups())
    return None


def status_of(status_field: str, diagnostic: str, action: str) -> str:
    """The Status field, refined by the Diagnostic-Code when Status is only ``x.0.0``."""
    status = enhanced_code(status_field)
    klass = status[0] if status else ("4" if action == "delayed" else "5")
    if status is None or status.endswith(".0.0"):
        better = enhanced_code(diagnostic, klass)
        if better is not None and not better.endswith(".0.0"):
            return better
    return status or f"{klass}.0.0"


def token_in_subject(subject: str) -> str | None:
    """The unsubscribe token in a mailto request's ``Subject: unsubscribe TOKEN``."""
    m = _TOKEN_IN_SUBJECT.search(subject)
    return m.group(1) if m else None


def parse(data: bytes) -> Inbound:
    """Read one inbound message (never raises on malformed input: it is unrecognised)."""
    msg = email.message_from_bytes(data)
    message_id = _header(msg, "Message-ID")
    sender = parseaddr(_header(msg, "From"))[1].lower()
    subject = _decoded(_header(msg, "Subject"))
    text = _all_text(msg)
    addressed = tuple(
        addr.lower()
        for name in ("Delivered-To", "X-Original-To", "Envelope-To", "To")
        for _, addr in getaddresses(msg.get_all(name) or [])
        if addr
    )

    def make(
        kind: ReportKind,
        detector: str = "",
        recipients: tuple[RecipientReport, ...] = (),
        complaint: Complaint | None = None,
    ) -> Inbound:
        return Inbound(
            kind, message_id, sender, subject, detector, recipients, complaint, addressed, text
        )

    report_type = str(msg.get_param("report-type", "") or "").lower()
    if msg.get_content_type() == "multipart/report" and report_type == "feedback-report":
        complaint = _arf(msg)
        if complaint is not None:
            return make("complaint", "rfc5965", complaint=complaint)
    recipients = tuple(_dsn(msg))
    if recipients:
        return make("dsn", "rfc3464", recipients)
    if is_auto_reply(msg, sender, subject):
        return make("auto-reply", "rfc3834")
    recipients = tuple(_flufl(msg, text))
    if recipients:
        return make("bounce", "flufl.bounce", recipients)
    return make("unrecognised")


def is_auto_reply(msg: email.message.Message, sender: str, subject: str) -> bool:
    """An out-of-office or other automatic answer, not a delivery failure."""
    if sender.partition("@")[0] in _DAEMONS or not sender:
        return False
    auto = _header(msg, "Auto-Submitted").lower()
    if auto and not auto.startswith("no"):
        return True
    if any(msg.get(name) for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder")):
        return True
    if _header(msg, "Precedence").lower() == "auto_reply":
        return True
    return bool(_OUT_OF_OFFICE.search(subject))


def _header(msg: email.message.Message, name: str) -> str:
    value = msg.get(name)
    if value is None:
        return ""
    return " ".join(str(value).split())


def _decoded(value: str) -> str:
    """RFC 2047 encoded words decoded (a Japanese "自動応答" subject is base64 on the wire)."""
    try:
        return str(make_header(decode_header(value)))
    except (UnicodeError, LookupError, ValueError):
        return value


def _parts(msg: email.message.Message) -> Iterator[email.message.Message]:
    """Every part, the header blocks of ``message/*`` parts included."""
    yield msg
    payload = msg.get_payload()
    if isinstance(payload, list):
        for part in payload:
            if isinstance(part, email.message.Message):
                yield from _parts(part)


def _all_text(msg: email.message.Message) -> str:
    chunks: list[str] = []
    for part in _parts(msg):
        chunks.extend(f"{name}: {value}" for name, value in part.items())
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and part.get_content_maintype() in ("text", "message"):
            chunks.append(payload.decode(part.get_content_charset() or "utf-8", "replace"))
    return "\n".join(chunks)


def _blocks(part: email.message.Message) -> list[email.message.Message]:
    """The header blocks of a ``message/delivery-status`` or ``message/feedback-report`` part."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, email.message.Message)]
    if isinstance(payload, str):
        text = payload.replace("\r\n", "\n").strip("\n")
        return [HeaderParser().parsestr(block) for block in re.split(r"\n\s*\n", text) if block]
    return []


def _address_field(value: str) -> str:
    """``rfc822; <alice@example.net>`` → ``alice@example.net``."""
    _, _, address = value.partition(";")
    return (address or value).strip().strip("<>").strip().lower()


def _dsn(msg: email.message.Message) -> Iterator[RecipientReport]:
    for part in _parts(msg):
        if part.get_content_type() != "message/delivery-status":
            continue
        for block in _blocks(part)[1:]:
            final = _address_field(_header(block, "Final-Recipient"))
            original = _address_field(_header(block, "Original-Recipient"))
            if not (final or original):
                continue
            action = _header(block, "Action").lower().split(" ")[0]
            diagnostic = _header(block, "Diagnostic-Code")
            yield RecipientReport(
                recipient=final or original,
                original=original,
                action="failed" if action == "error" else action,
                status=status_of(_header(block, "Status"), diagnostic, action),
                diagnostic=diagnostic.partition(";")[2].strip() or diagnostic,
                remote_mta=_address_field(_header(block, "Remote-MTA")),
            )


def _arf(msg: email.message.Message) -> Complaint | None:
    for part in _parts(msg):
        if part.get_content_type() != "message/feedback-report":
            continue
        blocks = _blocks(part)
        if not blocks:
            return None
        fields = blocks[0]
        return Complaint(
            feedback_type=_header(fields, "Feedback-Type").lower() or "abuse",
            original_rcpt_to=tuple(
                _address_field(v) for v in fields.get_all("Original-Rcpt-To") or []
            ),
            original_mail_from=_address_field(_header(fields, "Original-Mail-From")),
            user_agent=_header(fields, "User-Agent"),
            source_ip=_header(fields, "Source-IP"),
        )
    return None


def _flufl(msg: email.message.Message, text: str) -> Iterator[RecipientReport]:
    """Non-standard bounces, by Mailman's detectors; the code is read near each address."""
    try:
        temporary, permanent = flufl.bounce.all_failures(msg)
    except Exception:  # a detector choking on odd input: treat as unrecognised
        return
    for addresses, action, klass in ((permanent, "failed", "5"), (temporary, "delayed", "4")):
        for raw in sorted(addresses):
            address = raw.decode("ascii", "replace").strip("<>").lower()
            code, window = None, ""
            for m in re.finditer(re.escape(address), text, re.IGNORECASE):
                window = text[m.start() : m.start() + 600]
                code = enhanced_code(window, klass)
                if code is not None:
                    break
            code = code or enhanced_code(text, klass)
            code = code or f"{klass}.0.0"
            yield RecipientReport(address, action=action, status=code, diagnostic=window[:200])
