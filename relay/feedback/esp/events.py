"""Each provider's event payload, read into ``EspEvent``: one meaning for all of them.

=============================== ============ ==============================================
provider event                  meaning      what it changes
=============================== ============ ==============================================
permanent bounce                hard         a hard failure (``bounces.thresholds.hard``)
transient / undetermined bounce soft/unknown a soft or unknown failure, counted in a row
blocked (reputation, policy)    policy       counted, never suppresses the recipient
provider suppressed the address suppressed   a ``hard-bounce`` entry at once: it will not send
complaint (abuse, fraud)        complaint    a ``complaint`` entry, for good
unsubscribe (group or global)   unsubscribe  an ``unsubscribe`` entry for the mapped group
delivered, opened, deferred ... (ignored)    nothing: not a final outcome about the address
=============================== ============ ==============================================

Field names follow each provider's published webhook documentation. A payload that
is not what the provider sends raises ``BadPayload``; an event type we do not act on
is skipped, not an error (providers add types).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from relay.errors import RelayError

Meaning = Literal["hard", "soft", "unknown", "policy", "suppressed", "complaint", "unsubscribe"]

_TOKEN_URL = re.compile(r"/u/([A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{16,})")
_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
NOT_COMPLAINTS = frozenset({"not-spam", "virus", "auth-failure"})


class BadPayload(RelayError):
    """The body is not an event payload of this provider."""


@dataclass(frozen=True, slots=True)
class EspEvent:
    provider: str
    event_id: str
    """The provider's id for this event and recipient: processed once."""
    meaning: Meaning
    recipient: str
    status: str = ""
    """The enhanced status code, when the provider gives one."""
    detail: str = ""
    group: str | None = None
    """Our group when the provider names one we map (``groups:``), else None."""
    token: str | None = None
    """Our unsubscribe token, when the provider echoes the List-Unsubscribe header."""
    provider_group: str | None = None


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise BadPayload(f"{what}: expected a JSON object")
    return value


def _text(value: object, limit: int = 300) -> str:
    return str(value)[:limit] if value is not None else ""


def loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadPayload(f"not JSON: {exc}") from exc


def _token_in(*texts: object) -> str | None:
    for text in texts:
        if isinstance(text, str):
            m = _TOKEN_URL.search(text)
            if m:
                return m.group(1)
    return None


def _status_in(text: str) -> str:
    m = _STATUS.search(text)
    return m.group(1) if m else ""


# -- Amazon SES (the Message of an SNS Notification) ---------------------------------


def ses(message: str, groups: Mapping[str, str]) -> Iterator[EspEvent]:
    """SES event publishing or feedback notifications (``eventType``/``notificationType``)."""
    data = _mapping(loads(message.encode()), "ses message")
    kind = data.get("eventType") or data.get("notificationType")
    mail = _mapping(data.get("mail") or {}, "ses mail")
    token = _token_in(*(h.get("value") for h in mail.get("headers") or [] if isinstance(h, dict)))
    tags = mail.get("tags") if isinstance(mail.get("tags"), dict) else {}
    provider_group = _own_group(tags.get("oneclick-group")) if tags else None
    group = groups.get(provider_group, provider_group) if provider_group else None
    if kind == "Bounce":
        bounce = _mapping(data.get("bounce"), "ses bounce")
        btype, subtype = bounce.get("bounceType"), bounce.get("bounceSubType")
        if btype == "Permanent":
            meaning: Meaning = (
                "suppressed" if subtype in ("Suppressed", "OnAccountSuppressionList") else "hard"
            )
        elif btype == "Transient":
            meaning = "soft"
        else:
            meaning = "unknown"
        feedback_id = _text(bounce.get("feedbackId"))
        for r in bounce.get("bouncedRecipients") or []:
            r = _mapping(r, "ses bouncedRecipients[]")
            diag = _text(r.get("diagnosticCode"))
            yield EspEvent(
                "ses",
                f"{feedback_id}:{r.get('emailAddress')}",
                meaning,
                _text(r.get("emailAddress"), 320),
                _text(r.get("status"), 16) or _status_in(diag),
                f"{btype}/{subtype} {diag}".strip(),
                group,
                token,
                provider_group,
            )
    elif kind == "Complaint":
        complaint = _mapping(data.get("complaint"), "ses complaint")
        ftype = _text(complaint.get("complaintFeedbackType")) or "abuse"
        if ftype in NOT_COMPLAINTS:
            return
        feedback_id = _text(complaint.get("feedbackId"))
        for r in complaint.get("complainedRecipients") or []:
            r = _mapping(r, "ses complainedRecipients[]")
            address = _text(r.get("emailAddress"), 320)
            yield EspEvent(
                "ses",
                f"{feedback_id}:{address}",
                "complaint",
                address,
                "",
                f"type={ftype}",
                group,
                token,
                provider_group,
            )


_GROUP = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _own_group(value: object) -> str | None:
    """``oneclick_group``: a custom variable the sender sets to our group's name."""
    name = _first(value)
    return name if name and _GROUP.match(name) else None


def _first(value: object) -> str | None:
    if isinstance(value, list) and value:
        return str(value[0])
    return str(value) if isinstance(value, str) else None


# -- SendGrid Event Webhook ------------------------------------------------------------

_SENDGRID_DROPPED = ("bounced address", "unsubscribed address", "spam reporting address")


def sendgrid(body: bytes, groups: Mapping[str, str]) -> Iterator[EspEvent]:
    """A JSON array of events; custom args (``oneclick_group``) are echoed on each."""
    events = loads(body)
    if not isinstance(events, list):
        raise BadPayload("sendgrid: expected a JSON array of events")
    for raw in events:
        e = _mapping(raw, "sendgrid event")
        event, email = e.get("event"), _text(e.get("email"), 320)
        event_id = _text(e.get("sg_event_id")) or f"{e.get('sg_message_id')}:{event}:{email}"
        asm = e.get("asm_group_id")
        own = _own_group(e.get("oneclick_group"))
        provider_group = str(asm) if asm is not None else own
        group = groups.get(provider_group, own) if provider_group else None
        status = _text(e.get("status"), 16)
        reason = _text(e.get("reason"))
        meaning: Meaning | None = None
        if event == "bounce":
            # "type": "bounce" is a permanent failure, "blocked" a refusal of the sender
            meaning = "policy" if e.get("type") == "blocked" else "hard"
            status = status or _status_in(reason)
            if meaning == "hard" and status.startswith("4"):
                meaning = "soft"
        elif event == "dropped":
            if reason.lower() in _SENDGRID_DROPPED:
                meaning = "suppressed"
        elif event == "spamreport":
            meaning = "complaint"
        elif event in ("unsubscribe", "group_unsubscribe"):
            meaning = "unsubscribe"
        if meaning is None or not email:
            continue
        yield EspEvent(
            "sendgrid",
            event_id,
            meaning,
            email,
            status,
            f"{event} {reason}".strip(),
            group,
            None,
            provider_group,
        )


# -- Mailgun webhooks --------------------------------------------------------------------


def mailgun(data: Mapping[str, Any], groups: Mapping[str, str]) -> Iterator[EspEvent]:
    """``event-data`` of a Mailgun webhook (one event per request)."""
    e = _mapping(data.get("event-data"), "mailgun event-data")
    event, recipient = e.get("event"), _text(e.get("recipient"), 320)
    variables = e.get("user-variables") if isinstance(e.get("user-variables"), dict) else {}
    provider_group = _own_group(variables.get("oneclick_group")) if variables else None
    group = groups.get(provider_group, provider_group) if provider_group else None
    raw_delivery = e.get("delivery-status")
    delivery: Mapping[str, Any] = raw_delivery if isinstance(raw_delivery, dict) else {}
    message = _text(delivery.get("message") or delivery.get("description"))
    code = _text(delivery.get("code"), 8)
    status = _status_in(message) or (f"{code[0]}.0.0" if code[:1] in ("4", "5") else "")
    meaning: Meaning | None = None
    if event == "failed":
        reason = _text(e.get("reason"))
        if e.get("severity") == "permanent":
            meaning = "suppressed" if reason.startswith("suppress-") else "hard"
            if reason == "espblock":
                meaning = "policy"
        # temporary failures are retried by Mailgun: not final, nothing to record
    elif event == "complained":
        meaning = "complaint"
    elif event == "unsubscribed":
        meaning = "unsubscribe"
    if meaning is None or not recipient:
        return
    yield EspEvent(
        "mailgun",
        _text(e.get("id")) or f"{e.get('timestamp')}:{event}:{recipient}",
        meaning,
        recipient,
        status,
        f"{event} {e.get('reason') or ''} {message}".strip(),
        group,
        None,
        provider_group,
    )


# -- Postmark webhooks -------------------------------------------------------------------

_POSTMARK_BOUNCE: dict[str, Meaning] = {
    "HardBounce": "hard",
    "BadEmailAddress": "hard",
    "SoftBounce": "soft",
    "Transient": "soft",
    "DnsError": "soft",
    "Blocked": "policy",
    "SpamComplaint": "complaint",
    "ManuallyDeactivated": "suppressed",
}


def postmark(data: Mapping[str, Any], groups: Mapping[str, str]) -> Iterator[EspEvent]:
    """Bounce, SpamComplaint and SubscriptionChange webhooks (``RecordType``)."""
    record = data.get("RecordType")
    metadata = data.get("Metadata") if isinstance(data.get("Metadata"), dict) else {}
    own = _own_group(metadata.get("oneclick_group")) if metadata else None
    provider_group = own or _text(data.get("MessageStream")) or None
    group = groups.get(provider_group, own) if provider_group else None
    if record in ("Bounce", "SpamComplaint"):
        meaning = _POSTMARK_BOUNCE.get(_text(data.get("Type")))
        if record == "SpamComplaint":
            meaning = "complaint"
        email = _text(data.get("Email"), 320)
        if meaning is None or not email:
            return
        details = _text(data.get("Details"))
        yield EspEvent(
            "postmark",
            f"{record}:{data.get('ID')}",
            meaning,
            email,
            _status_in(details),
            f"{data.get('Type')} {details}".strip(),
            group,
            None,
            provider_group,
        )
    elif record == "SubscriptionChange":
        if not data.get("SuppressSending"):
            return  # a reactivation: the relay's own list is managed with its CLI/API
        reason = _text(data.get("SuppressionReason"))
        change: dict[str, Meaning] = {"HardBounce": "suppressed", "SpamComplaint": "complaint"}
        meaning = change.get(reason, "unsubscribe")
        email = _text(data.get("Recipient"), 320)
        if not email:
            return
        yield EspEvent(
            "postmark",
            f"SubscriptionChange:{data.get('MessageID')}:{email}:{data.get('ChangedAt')}",
            meaning,
            email,
            "",
            f"SubscriptionChange {reason}",
            group,
            None,
            provider_group,
        )
