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

import base64
import email
import email.message
import html
import quopri
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from email.header import decode_header, make_header
from email.parser import HeaderParser
from email.utils import getaddresses, parseaddr
from typing import Literal

import flufl.bounce

from relay.feedback.reasons import (
    PHRASES,
    Classification,
    Classifier,
    enhanced_code,
)
from relay.model import Reason

__all__ = [
    "Classification",
    "Classifier",
    "Complaint",
    "Inbound",
    "Reason",
    "RecipientReport",
    "enhanced_code",
    "parse",
    "status_of",
    "token_in_subject",
]

ReportKind = Literal["complaint", "dsn", "bounce", "auto-reply", "unrecognised"]
Verdict = Literal["hard", "soft", "policy", "unknown", "delayed", "success"]

MAX_HUMAN_TEXT = 256 * 1024
"""Characters of a bounce's own text (not the returned original) read for failure lines."""
MAX_LINES = 4000
MAX_RECIPIENTS = 1000
MAX_DIAGNOSTIC = 2000

_DAEMONS = frozenset(
    {"mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon", "mdaemon", "mail.daemon"}
)
_OUT_OF_OFFICE = re.compile(
    r"out of (the )?office|automatic reply|auto(matic)?[ -]?(reply|response)|autoreply|"
    r"vacation|away from (my|the) (desk|office)|abwesen|absence|r[ée]ponse automatique|"
    r"respuesta autom[áa]tica|risposta automatica|automatisch antwoord|不在|自動応答|自动回复",
    re.IGNORECASE,
)
_TOKEN_IN_SUBJECT = re.compile(r"(?i)\bunsubscribe\s+([A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{16,})")

_INTROS = (
    "following address",
    "following recipient",
    "following destination",
    "could not be delivered to",
    "couldn't be delivered",
    "could not be delivered",
    "was not delivered to",
    "were not delivered to",
    "did not reach the following",
    "failed permanently",
    "delivery has failed to these",
    "delivery to the following",
    "undeliverable to the following",
    "unable to deliver",
    "wasn't able to deliver",
    "was unable to deliver",
    "could not deliver",
    "error delivering your mail to",
    "an error has occurred while attempting to deliver",
    "permanent fatal errors",
    "transient non-fatal errors",
    "list of recipients",
    "not be delivered to",
    "undeliverable due to",
    "was undeliverable",
    "delivery failed",
    "your message to",
    "recipients did not receive",
    "following recipients",
    "not yet been delivered",
    "fatal delivery errors",
    "failure reasons",
    "cannot be delivered to",
    "had delivery problems",
    "could not be reached",
    "permanent errors",
)
"""Lines that introduce a list of failed recipients, in the MTAs' own words."""

_ORIGINAL_MARKERS = (
    "original message follows",
    "original message headers",
    "----- original message",
    "original message -----",
    "copy of the message",
    "copy of the original",
    "unsent message follows",
    "message headers follow",
    "below this line is a copy",
    "returned message follows",
    "--- below this line",
    "headers of the original message",
    "the original message headers",
    "original message below",
)
"""Lines after which a bounce quotes the message it returns: no failure line follows."""
_ARROWS = (">>>", "<<<")
_LINE_PREFIXES = (
    "<<<",
    ">>>",
    "rcpt to:",
    "rcpt to",
    "recipient address:",
    "failed recipient:",
    "recipient:",
    "address:",
    "to:",
    '"',
    "'",
    "<",
    "(",
    "*",
    "-",
    "#",
)
_HEADER_START = ("received: ", "return-path: ", "dkim-signature: ", "message-id: ")
_DELAY_MARKERS = (
    "delivery delayed",
    "has been delayed",
    "not yet been delivered",
    "will continue to try",
    "will keep trying",
    "still trying",
    "will be retried",
    "will retry",
    "delivery attempts will continue",
    "transient non-fatal errors",
    "warning: message",
    "delayed mail",
    "delivery status notification (delay)",
)
_PERMANENT_MARKERS = ("permanent error", "permanent fatal", "failed permanently", "giving up")
_LOCAL = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~.-"
)
_DOMAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")
_ID_HEADERS = ("Message-ID", "In-Reply-To", "References", "Resent-Message-ID", "X-Message-ID")
_SENDER_HEADERS = ("From", "Sender", "Return-Path", "Reply-To", "Resent-From", "Errors-To")
_SENDER_FIELDS = ("x-postfix-sender", "original-mail-from", "x-original-sender")
_RECIPIENT_FIELDS = ("final-recipient", "original-recipient", "x-actual-recipient")
_FAILED_HEADERS = ("X-Failed-Recipients", "X-Failed-Recipient")


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """One recipient of a DSN (or of a non-standard bounce, as far as it can be read)."""

    recipient: str
    original: str = ""
    action: str = "failed"
    status: str = "5.0.0"
    diagnostic: str = ""
    remote_mta: str = ""
    source: str = "dsn"
    """Where the recipient was read: ``dsn`` (a delivery-status part), ``dsn-text`` (DSN
    fields in a text part or a broken MIME body), ``failed-header`` (X-Failed-Recipients),
    ``failure-line`` (the bounce's own text), ``flufl.bounce``."""

    @property
    def final(self) -> bool:
        return self.action not in ("delayed", "delivered", "relayed", "expanded")


@dataclass(frozen=True, slots=True)
class Complaint:
    """The machine-readable part of an ARF report."""

    feedback_type: str
    original_rcpt_to: tuple[str, ...] = ()
    original_mail_from: str = ""
    user_agent: str = ""
    source_ip: str = ""
    original_to: tuple[str, ...] = ()
    """The returned original's To / Delivered-To / X-Original-To: whom it was sent to."""


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
    if report_type == "feedback-report" or any(
        p.get_content_type() == "message/feedback-report" for p in _own_parts(msg)
    ):
        complaint = _arf(msg)
        if complaint is not None:
            return make("complaint", "rfc5965", complaint=complaint)
    not_recipients = _not_recipients(msg, sender, addressed)

    def keep(reports: Iterator[RecipientReport]) -> tuple[RecipientReport, ...]:
        return _merge(r for r in reports if _may_be_recipient(r.recipient, not_recipients))

    human = _human_text(msg)
    recipients = keep(_dsn(msg))
    if recipients:
        return make("dsn", "rfc3464", _with_human_words(recipients, human))
    recipients = keep(_dsn_text(human or _raw_body(msg, data)))
    if recipients:
        return make("dsn", "rfc3464-text", recipients)
    if is_auto_reply(msg, sender, subject):
        return make("auto-reply", "rfc3834")
    if not _looks_like_a_bounce(msg, sender, subject, human):
        return make("unrecognised")  # a person's reply that says "user unknown" is not one
    delayed = _is_delay(subject, human)
    recipients = keep(_failure_lines(msg, human, delayed))
    if recipients:
        return make("bounce", "failure-lines", recipients)
    recipients = keep(_flufl(_bounded(data), human, delayed))
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
    try:
        value = msg.get(name)
    except (ValueError, TypeError, LookupError):
        return ""
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


def _own_parts(msg: email.message.Message) -> Iterator[email.message.Message]:
    """The bounce's own parts: not inside the returned original (``message/rfc822``)."""
    yield msg
    if msg.get_content_type() in ("message/rfc822", "message/global", "text/rfc822-headers"):
        return
    if msg.get_content_type() in ("message/delivery-status", "message/feedback-report"):
        return
    payload = msg.get_payload()
    if isinstance(payload, list):
        for part in payload:
            if isinstance(part, email.message.Message):
                yield from _own_parts(part)


def _text_of(part: email.message.Message) -> str:
    try:
        payload = part.get_payload(decode=True)
    except (ValueError, TypeError, LookupError):
        return ""
    if not isinstance(payload, bytes):
        return ""
    try:
        return payload.decode(part.get_content_charset() or "utf-8", "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def _all_text(msg: email.message.Message) -> str:
    chunks: list[str] = []
    for part in _parts(msg):
        chunks.extend(f"{name}: {value}" for name, value in part.items())
        if part.is_multipart():
            continue
        if part.get_content_maintype() in ("text", "message"):
            chunks.append(_text_of(part))
    return "\n".join(chunks)


def _human_text(msg: email.message.Message) -> str:
    """The bounce's own text parts, decoded (HTML reduced to its text), bounded."""
    chunks: list[str] = []
    size = 0
    for part in _own_parts(msg):
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        if part.get_content_type() == "text/rfc822-headers":
            continue
        body = _text_of(part)
        if part.get_content_subtype() == "html":
            body = _strip_html(body)
        chunks.append(body)
        size += len(body)
        if size > MAX_HUMAN_TEXT:
            break
    return "\n".join(chunks)[:MAX_HUMAN_TEXT]


def _strip_html(body: str) -> str:
    """Tags dropped, block ends as line breaks: enough to read "couldn't be delivered"."""
    out: list[str] = []
    i, n = 0, min(len(body), MAX_HUMAN_TEXT)
    while i < n:
        lt = body.find("<", i, n)
        if lt < 0:
            out.append(body[i:n])
            break
        out.append(body[i:lt])
        gt = body.find(">", lt, n)
        if gt < 0:
            break
        tag = body[lt + 1 : min(gt, lt + 6)].lower().lstrip("/")
        if tag.startswith(("br", "p", "div", "tr", "li", "h")):
            out.append("\n")
        i = gt + 1
    return html.unescape("".join(out))


def _raw_body(msg: email.message.Message, data: bytes) -> str:
    """A message whose MIME structure did not parse (a broken boundary): its raw body."""
    if msg.defects or (msg.is_multipart() and not msg.get_payload()):
        _, _, body = data[: MAX_HUMAN_TEXT * 2].partition(b"\n\n")
        if not body:
            _, _, body = data[: MAX_HUMAN_TEXT * 2].partition(b"\r\n\r\n")
        return body.decode("utf-8", "replace")
    return ""


# -- DSN fields --------------------------------------------------------------------


def _field_blocks(text: str) -> Iterator[dict[str, str]]:
    """``Name: value`` blocks separated by blank lines (folded lines joined), linear."""
    fields: dict[str, str] = {}
    last = ""
    for n, line in enumerate(text.replace("\r\n", "\n").split("\n")):
        if n > MAX_LINES * 4:
            break
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, ""
            continue
        if line[:1] in (" ", "\t") and last:
            fields[last] = (fields[last] + " " + line.strip())[:MAX_DIAGNOSTIC]
            continue
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if colon and name and " " not in name and len(name) < 40:
            last = name
            fields.setdefault(name, value.strip()[:MAX_DIAGNOSTIC])
        else:
            last = ""
    if fields:
        yield fields


def _delivery_status_text(part: email.message.Message) -> str:
    """A ``message/delivery-status`` body as text, even when it was (wrongly) encoded."""
    payload = part.get_payload()
    if isinstance(payload, list):
        text = "\n\n".join(
            "\n".join(f"{k}: {v}" for k, v in p.items())
            for p in payload
            if isinstance(p, email.message.Message)
        )
    elif isinstance(payload, str):
        text = payload
    else:
        return ""
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte == "quoted-printable":
        text = quopri.decodestring(text.encode("utf-8", "replace")).decode("utf-8", "replace")
    elif cte == "base64":
        try:
            text = base64.b64decode(text, validate=False).decode("utf-8", "replace")
        except ValueError:
            return ""
    return text


def _address_field(value: str) -> str:
    """``rfc822; <alice@example.net>`` → ``alice@example.net``."""
    _, _, address = value.partition(";")
    address = (address or value).strip()
    found = _addresses_in(address)
    return found[0] if found else ""


def _recipient_blocks(blocks: Iterator[dict[str, str]], source: str) -> Iterator[RecipientReport]:
    for n, block in enumerate(blocks):
        if n > MAX_RECIPIENTS:
            return
        final = _address_field(block.get("final-recipient", ""))
        original = _address_field(block.get("original-recipient", ""))
        actual = _address_field(block.get("x-actual-recipient", ""))
        if not (final or original or actual):
            continue
        raw_status = block.get("status", "")
        action = block.get("action", "").lower().split(" ")[0].strip(";")
        if not action:
            action = "delayed" if raw_status.strip().startswith("4") else "failed"
        diagnostic = block.get("diagnostic-code", "")
        yield RecipientReport(
            recipient=final or original or actual,
            original=original,
            action="failed" if action == "error" else action,
            status=status_of(raw_status, diagnostic, action),
            diagnostic=(diagnostic.partition(";")[2].strip() or diagnostic)[:MAX_DIAGNOSTIC],
            remote_mta=_address_field(block.get("remote-mta", "")) or _mta(block),
            source=source,
        )


def _mta(block: dict[str, str]) -> str:
    value = block.get("remote-mta", "")
    return (value.partition(";")[2] or value).strip().lower()[:255]


def _dsn(msg: email.message.Message) -> Iterator[RecipientReport]:
    for part in _own_parts(msg):
        if part.get_content_type() in ("message/delivery-status", "message/global-delivery-status"):
            yield from _recipient_blocks(_field_blocks(_delivery_status_text(part)), "dsn")


def _dsn_text(text: str) -> Iterator[RecipientReport]:
    """DSN fields written into a text part (or a body whose MIME did not parse)."""
    if "recipient:" not in text.lower():
        return iter(())
    return _recipient_blocks(_field_blocks(text), "dsn-text")


def _arf(msg: email.message.Message) -> Complaint | None:
    for part in _parts(msg):
        if part.get_content_type() != "message/feedback-report":
            continue
        blocks = list(_field_blocks(_delivery_status_text(part)))
        if not blocks:
            return None
        fields = blocks[0]
        rcpt_to = tuple(
            a for p in _all_values(part, "Original-Rcpt-To") if (a := _address_field(p))
        ) or tuple(a for p in _all_values(part, "Removal-Recipient") if (a := _address_field(p)))
        return Complaint(
            feedback_type=fields.get("feedback-type", "").lower().strip() or "abuse",
            original_rcpt_to=rcpt_to,
            original_mail_from=_address_field(fields.get("original-mail-from", "")),
            user_agent=fields.get("user-agent", "")[:200],
            source_ip=fields.get("source-ip", "").strip()[:64],
            original_to=_returned_to(msg),
        )
    return None


def _all_values(part: email.message.Message, name: str) -> list[str]:
    """Every value of a field of a ``message/feedback-report`` (it may repeat)."""
    found: list[str] = []
    for line in _delivery_status_text(part).replace("\r\n", "\n").split("\n")[:MAX_LINES]:
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == name.lower():
            found.append(value.strip())
    return found


def _returned_to(msg: email.message.Message) -> tuple[str, ...]:
    """Whom the returned original (message/rfc822 or text/rfc822-headers) was sent to."""
    for part in _parts(msg):
        ctype = part.get_content_type()
        headers: email.message.Message | None = None
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if (
                isinstance(payload, list)
                and payload
                and isinstance(payload[0], email.message.Message)
            ):
                headers = payload[0]
        elif ctype == "text/rfc822-headers":
            headers = HeaderParser().parsestr(_text_of(part))
        if headers is None:
            continue
        found: list[str] = []
        for name in ("X-HmXmrOriginalRecipient", "Delivered-To", "X-Original-To", "To"):
            for _, addr in getaddresses([str(v) for v in headers.get_all(name) or []]):
                addr = addr.lower()
                if "@" in addr and addr not in found and "redacted" not in addr:
                    found.append(addr)
        return tuple(found[:10])
    return ()


# -- who is not a recipient ------------------------------------------------------


def _not_recipients(
    msg: email.message.Message, sender: str, addressed: tuple[str, ...]
) -> frozenset[str]:
    """Message-IDs, the original's sender, the bounce's own From and To."""
    found = {sender, *addressed}
    for part in _parts(msg):
        for name in _ID_HEADERS:
            for value in part.get_all(name) or []:
                found.update(_addresses_in(str(value)[:4000]))
        if part is msg:
            continue
        for name in _SENDER_HEADERS:
            for value in part.get_all(name) or []:
                found.update(_addresses_in(str(value)[:1000]))
    for part in _own_parts(msg):
        if part.get_content_type() in ("message/delivery-status", "text/plain"):
            for block in _field_blocks(_delivery_status_text(part)[:MAX_HUMAN_TEXT]):
                for name in _SENDER_FIELDS:
                    found.update(_addresses_in(block.get(name, "")))
        if part.get_content_type() == "text/rfc822-headers":
            headers = HeaderParser().parsestr(_text_of(part)[:MAX_HUMAN_TEXT])
            for name in (*_ID_HEADERS, *_SENDER_HEADERS):
                for value in headers.get_all(name) or []:
                    found.update(_addresses_in(str(value)[:1000]))
    found.discard("")
    return frozenset(found)


def _may_be_recipient(address: str, not_recipients: frozenset[str]) -> bool:
    local, _, domain = address.rpartition("@")
    if not local or "." not in domain or address in not_recipients:
        return False
    if "$" in local or ("." in local and sum(c.isdigit() for c in local) >= 10):
        return False  # the shape of a Message-ID (20250512103122.4Xk2@host), not a mailbox
    return local not in _DAEMONS


def _merge(reports: Iterable[RecipientReport]) -> tuple[RecipientReport, ...]:
    """One report per address (the first, its diagnostic completed by the rest)."""
    chosen: dict[str, RecipientReport] = {}
    for r in reports:
        old = chosen.get(r.recipient)
        if old is None:
            if len(chosen) < MAX_RECIPIENTS:
                chosen[r.recipient] = r
        elif old.source in ("failed-header", "failure-line") and r.diagnostic not in old.diagnostic:
            diagnostic = f"{old.diagnostic} {r.diagnostic}".strip()[:MAX_DIAGNOSTIC]
            status = old.status if not old.status.endswith(".0.0") else r.status
            chosen[r.recipient] = replace(old, diagnostic=diagnostic, status=status)
    return tuple(chosen.values())


# -- addresses in text, without a backtracking pattern ---------------------------


def _address_at(s: str, at: int) -> tuple[str, int, int] | None:
    """The address around the ``@`` at ``at``: (address, start, end), or None."""
    i = at
    while i > 0 and at - i < 64 and s[i - 1] in _LOCAL:
        i -= 1
    j = at + 1
    while j < len(s) and j - at <= 255 and s[j] in _DOMAIN:
        j += 1
    local = s[i:at].lstrip(".")
    domain = s[at + 1 : j].rstrip(".-")
    if not local or "." not in domain or domain.startswith((".", "-")):
        return None
    return f"{local}@{domain}".lower(), at - len(local), at + 1 + len(domain)


def _addresses_in(s: str) -> list[str]:
    found: list[str] = []
    at = s.find("@")
    while at >= 0 and len(found) < 100:
        hit = _address_at(s, at)
        if hit is not None:
            found.append(hit[0])
        at = s.find("@", at + 1)
    return found


def _strip_prefixes(line: str) -> str:
    """``<<< 550 5.1.1 RCPT To:<`` and the like before a failure line's address."""
    s = line.strip()
    for _ in range(6):
        before = s
        for p in _LINE_PREFIXES:
            if s.lower().startswith(p):
                s = s[len(p) :].lstrip()
        head, _, rest = s.partition(" ")
        if (
            head
            and ((head.isdigit() and len(head) == 3) or enhanced_code(head) == head.strip("#()"))
        ) or (len(head) == 4 and head[:3].isdigit() and head[3] in "-:"):
            s = rest.lstrip()
        if s == before:
            break
    return s


def _lead_address(line: str) -> tuple[str, str] | None:
    """A failure line's address at its start (or after ``RCPT TO:``), and the rest."""
    s = _strip_prefixes(line)
    rcpt = s.lower().find("rcpt to:")
    if rcpt >= 0:
        s = s[rcpt + 8 :].lstrip(" <")
    at = s.find("@", 0, 65)
    if at <= 0:
        return None
    hit = _address_at(s, at)
    if hit is None or hit[1] != 0:
        return None
    rest = s[hit[2] :].lstrip(">\"' \t")
    return hit[0], rest


# -- non-standard bounces: the bounce's own failure lines --------------------------


_BOUNCE_SUBJECTS = (
    "undeliver",
    "undelivered",
    "returned mail",
    "returned to sender",
    "delivery",
    "failure",
    "failed",
    "error",
    "not delivered",
    "bounce",
    "rejected",
    "warning",
    "could not",
    "notification",
)


def _looks_like_a_bounce(msg: email.message.Message, sender: str, subject: str, human: str) -> bool:
    """From a mailer (by name, subject or its failure headers), or worded as a bounce."""
    local = sender.partition("@")[0]
    if not sender or local in _DAEMONS or "daemon" in local or "postmaster" in local:
        return True
    if any(msg.get(name) for name in _FAILED_HEADERS):
        return True
    if any(m in subject.lower() for m in _BOUNCE_SUBJECTS):
        return True
    head = human[:8000].lower()
    return any(m in head for m in _INTROS)


def _is_delay(subject: str, human: str) -> bool:
    head = f"{subject}\n{human[:4000]}".lower()
    if any(m in head for m in _PERMANENT_MARKERS):
        return False
    return any(m in head for m in _DELAY_MARKERS)


def _failure_lines(
    msg: email.message.Message, human: str, delayed: bool
) -> Iterator[RecipientReport]:
    """Recipients from X-Failed-Recipients and from the lines of the bounce's own text.

    A failure line names an address first (``<a@b>: 550 …``, ``a@b... User unknown``,
    ``RCPT To:<a@b>``), or lists one under a line that introduces failed recipients
    ("could not be delivered to", "did not reach the following recipient(s)" …). The text
    after it (or, if that says nothing, before it) is its diagnostic.
    """
    action, klass = ("delayed", "4") if delayed else ("failed", "5")
    found: list[tuple[str, list[str], str]] = []
    before: list[str] = []
    telling: list[str] = []
    listing = False
    current: list[str] | None = None
    for n, raw in enumerate(human.replace("\r\n", "\n").split("\n")):
        if n > MAX_LINES or len(found) >= MAX_RECIPIENTS:
            break
        line = raw.strip()[:MAX_DIAGNOSTIC]
        low = line.lower()
        if any(m in low for m in _ORIGINAL_MARKERS) or (
            found and raw.lower().startswith(_HEADER_START)
        ):
            break
        if not line:
            continue
        if "message-id" in low:
            continue
        says = _says_something(low)
        if says and len(telling) < 8:
            telling.append(line)
        intro = any(m in low for m in _INTROS)
        lead = None if intro else _lead_address(line)
        if intro:
            listing = True
            after = [a for a in _addresses_in(line)]
            for address in after:
                current = []
                found.append((address, current, "failure-line"))
            if not after:
                current = None
                before = []
            continue
        if lead is not None:
            address, rest = lead
            said = _without(line, address)
            known = next((lines for a, lines, _ in found if a == address), None)
            if known is not None:
                current = known
                if said and len(known) < 12:
                    known.append(said)
                continue
            is_failure = rest[:1] in (":", ".", "(") or "rcpt to" in low or low[:3] in _ARROWS
            if listing or is_failure or rest[:3].isdigit():
                current = [said] if said else []
                found.append((address, current, "failure-line"))
                continue
        elif says and "@" in line:
            # "Unknown user: a@b", "550 5.1.1 mailbox a@b unavailable": the reason names it
            named = [a for a in _addresses_in(line)[:3] if not any(a == f[0] for f in found)]
            for address in named:
                current = [_without(line, address)]
                found.append((address, current, "failure-line"))
            if named:
                continue
        if current is not None and len(current) < 12:
            current.append(line)
        elif current is None:
            before = [*before[-3:], line]
    failed_header = {
        a
        for name in _FAILED_HEADERS
        for v in msg.get_all(name) or []
        for a in _addresses_in(str(v))
    }
    seen: set[str] = set()
    for address, lines, source in found:
        seen.add(address)
        diagnostic = " ".join(lines)[:MAX_DIAGNOSTIC]
        if not _says_something(diagnostic):
            # the reason stands before the address (au/ezweb, Notes) or apart from it
            extra = " ".join([*before, *(t for t in telling if t not in before)])
            diagnostic = f"{diagnostic} {extra}".strip()[:MAX_DIAGNOSTIC]
        yield RecipientReport(
            address,
            action=action,
            status=enhanced_code(diagnostic, klass) or enhanced_code(diagnostic) or f"{klass}.0.0",
            diagnostic=diagnostic,
            source="failed-header" if address in failed_header else source,
        )
    for address in sorted(failed_header - seen):
        yield RecipientReport(address, action=action, status=f"{klass}.0.0", source="failed-header")


def _without(line: str, address: str) -> str:
    """A failure line without its address (``nosuchuser@…`` is not a phrase)."""
    at = line.lower().find(address)
    if at < 0:
        return line
    return " ".join(f"{line[:at]} {line[at + len(address) :]}".strip(" <>:\t").split())


def _with_human_words(
    reports: tuple[RecipientReport, ...], human: str
) -> tuple[RecipientReport, ...]:
    """A DSN block whose Diagnostic-Code says nothing, completed by the notification's
    own failure line for that address ("The email account … does not exist")."""
    if all(_says_something(r.diagnostic) for r in reports):
        return reports
    lines = {
        r.recipient: r.diagnostic for r in _failure_lines(email.message.Message(), human, False)
    }
    out = []
    for r in reports:
        words = lines.get(r.recipient, "")
        if not _says_something(r.diagnostic) and _says_something(words):
            r = replace(r, diagnostic=f"{r.diagnostic} {words}".strip()[:MAX_DIAGNOSTIC])
        out.append(r)
    return tuple(out)


def _says_something(diagnostic: str) -> bool:
    low = diagnostic.lower()
    return enhanced_code(low) is not None or any(p in low for p, _ in PHRASES)


def _bounded(data: bytes) -> email.message.Message:
    """The message cut to ``MAX_HUMAN_TEXT`` octets, each line to ``MAX_DIAGNOSTIC``: the
    detectors below run patterns whose cost grows faster than a long line."""
    lines = data[:MAX_HUMAN_TEXT].split(b"\n")
    return email.message_from_bytes(b"\n".join(line[:MAX_DIAGNOSTIC] for line in lines))


def _flufl(msg: email.message.Message, human: str, delayed: bool) -> Iterator[RecipientReport]:
    """Mailman's detectors, last; only for an address the bounce's own text names."""
    try:
        temporary, permanent = flufl.bounce.all_failures(msg)
    except Exception:  # a detector choking on odd input: treat as unrecognised
        return
    low = human.lower()
    for addresses, action, klass in ((permanent, "failed", "5"), (temporary, "delayed", "4")):
        for raw in sorted(addresses)[:MAX_RECIPIENTS]:
            address = raw.decode("ascii", "replace").strip("<>").lower()
            at = low.find(address)
            if at < 0:
                continue
            window = human[at : at + 600]
            code = enhanced_code(window, klass) or f"{klass}.0.0"
            yield RecipientReport(
                address,
                action="delayed" if delayed else action,
                status=code,
                diagnostic=" ".join(window.split())[:MAX_DIAGNOSTIC],
                source="flufl.bounce",
            )


@dataclass(frozen=True, slots=True)
class Reading:
    """What a report says about one recipient, before any count: for audits and the bench."""

    recipient: str
    verdict: str
    """A kind (``hard`` …), or ``delayed``, ``success``, ``complaint``, ``ignored``."""
    reason: str
    evidence: str
    status: str = ""
    source: str = ""


def readings(
    report: Inbound, classifier: Classifier, own: Callable[[str], bool] = lambda a: False
) -> list[Reading]:
    """Each recipient the report names, its reason and the evidence (no attribution, no I/O)."""
    if report.complaint is not None:
        c = report.complaint
        stated = c.original_rcpt_to or tuple(a for a in c.original_to if not own(a))
        via = "Original-Rcpt-To" if c.original_rcpt_to else "returned original's To"
        verdict = "complaint" if c.feedback_type in ("abuse", "fraud") else "ignored"
        return [
            Reading(a, verdict, "complaint", f"Feedback-Type {c.feedback_type}; {via}")
            for a in stated[:1]
        ]
    out: list[Reading] = []
    for r in report.recipients:
        if own(r.recipient) or (r.original and own(r.original)):
            continue
        why = classifier.classify(r.status, r.diagnostic, final=r.final)
        if r.action in ("delivered", "relayed", "expanded") or r.status.startswith("2."):
            verdict = "success"
        elif r.action == "delayed":
            verdict = "delayed"
        else:
            verdict = why.kind
        out.append(
            Reading(
                r.recipient, verdict, why.reason, f"{why.evidence} ({r.source})", r.status, r.source
            )
        )
    return out
