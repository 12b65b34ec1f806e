"""The header fields the relay writes: one-click unsubscribe, List-Id, trace and defaults."""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

from relay.config import ComplianceConfig, GroupConfig
from relay.mail.mailto import with_code
from relay.mail.message import Header, Message

LIST_HEADERS = ("list-unsubscribe", "list-unsubscribe-post")
ONE_CLICK = "List-Unsubscribe=One-Click"
_HTTPS_URI = re.compile(r"<(https://[^>\s]+)>")


def unsubscribe_url(public_url: str, token: str) -> str:
    return f"{public_url}/u/{token}"


def one_click_headers(
    url: str,
    group: GroupConfig | None,
    token: str,
    mailto: str | None = None,
    code: str | None = None,
) -> list[Header]:
    """``List-Unsubscribe`` (HTTPS first: Gmail takes the first, then mailto) and ``-Post``.

    The mailto address is the group's own (``policy.groups.*.mailto``), else ``mailto``
    (``unsubscribe.mailto_domain``). The ``code`` goes in its local part, which is all
    Apple Mail sends; the token stays in the subject for clients that keep it.
    """
    uris = [f"<{url}>"]
    address = mailto_address(group, mailto)
    if address:
        if code is not None:
            address = with_code(address, code)
        uris.append(f"<mailto:{address}?subject=unsubscribe%20{token}>")
    fields = [
        Header.build("List-Unsubscribe", ", ".join(uris)),
        Header.build("List-Unsubscribe-Post", ONE_CLICK),
    ]
    if group is not None and group.list_id:
        fields.append(Header.build("List-Id", group.list_id))
    return fields


def compliance_names(compliance: ComplianceConfig) -> tuple[str, ...]:
    """The fields the relay writes itself, so the application's own are removed first."""
    names: tuple[str, ...] = ()
    if compliance.cfbl_address:
        names += ("cfbl-address", "cfbl-feedback-id")
    if compliance.feedback_id:
        names += ("feedback-id",)
    return names


def _feedback_value(value: str) -> str:
    """A template field's value: no ``:`` (Gmail's separator), no space, printable ASCII."""
    return "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "._-@" else "-" for ch in value)


def compliance_headers(
    compliance: ComplianceConfig,
    group: GroupConfig | None,
    group_name: str,
    sender_domain: str,
    token: str | None,
) -> list[Header]:
    """``CFBL-Address`` and ``CFBL-Feedback-ID`` (RFC 9477) and Gmail's ``Feedback-ID``.

    ``CFBL-Feedback-ID`` is the recipient's unsubscribe token: authenticated encryption
    (as RFC 9477 recommends an HMAC, so nobody can alter it) naming recipient and group,
    so an ARF report that redacts the recipient's address is still attributed.
    ``Feedback-ID`` is the same for every copy of a message: Gmail's reports are
    aggregates per value, never per recipient.
    """
    fields = []
    if compliance.cfbl_address:
        fields.append(Header.build("CFBL-Address", f"{compliance.cfbl_address}; report=arf"))
        if token is not None:
            fields.append(Header.build("CFBL-Feedback-ID", token))
    template = (group.feedback_id if group is not None else None) or compliance.feedback_id
    if template:
        value = (
            template.replace("{group}", _feedback_value(group_name))
            .replace("{class}", "marketing")
            .replace("{domain}", _feedback_value(sender_domain))
        )
        fields.append(Header.build("Feedback-ID", value))
    return fields


def mailto_address(group: GroupConfig | None, mailto: str | None) -> str | None:
    """The group's own mailto address, else the relay's (``unsubscribe.mailto_domain``)."""
    return group.mailto if group is not None and group.mailto else mailto


def app_https_unsubscribe(message: Message) -> str | None:
    """The HTTPS URI of an application's own List-Unsubscribe, if it set exactly one field."""
    fields = message.get_all("List-Unsubscribe")
    if len(fields) != 1:
        return None
    m = _HTTPS_URI.search(fields[0].value)
    return m.group(1) if m else None


def received(helo: str, client_ip: str, hostname: str, queue_id: str, now: float) -> Header:
    """The RFC 5321 4.4 trace field this hop adds."""
    helo = "".join(ch for ch in helo if ch.isalnum() or ch in ".-[]:")[:255] or "unknown"
    value = (
        f"from {helo} ([{client_ip}]) by {hostname} (oneclick-relay) with ESMTP id {queue_id};"
        f" {formatdate(now, localtime=False, usegmt=True)}"
    )
    return Header.build("Received", value)


def missing_defaults(message: Message, hostname: str, now: float | None = None) -> list[Header]:
    """Date and Message-ID when the application left them out (as Postfix's cleanup does)."""
    added = []
    if not message.has("Date"):
        moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
        added.append(Header.build("Date", format_datetime(moment)))
    if not message.has("Message-ID"):
        added.append(Header.build("Message-ID", f"<{uuid.uuid4().hex}@{hostname}>"))
    return added
