"""Bad input, one test per row: the exact reply, nothing wrong relayed, counted, still serving.

Every row talks to a real relay over a raw socket (``rawsmtp.RawSMTP``) so the
bytes on the wire are exactly the bytes in the test: client libraries repair
line endings, quote addresses and refuse CR/LF/NUL. Each row then checks

- the exact reply code and RFC 3463 enhanced status (or, for accepted input,
  what reached the capture upstream, byte for byte, and that its DKIM signature
  verifies offline with ``keys.dnsfunc``);
- that the outcome is counted in ``relay.metrics`` (``oneclick_rejected_total``
  by code and enhanced status, or ``oneclick_messages_total`` by outcome);
- that the relay still relays a normal message afterwards.

Accepted messages carry ``Date`` and ``Message-ID`` so the relay adds nothing
after the application's header fields: what it prepends (DKIM-Signature,
Received) is the only difference, and the upstream copy must *end with* the
original bytes.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import dkim
import pytest
from conftest import Keys, Sink
from helpers import smtp_send
from prometheus_client.parser import text_string_to_metric_families
from rawsmtp import RawSMTP, Reply

from relay.runtime.app import Relay

MakeRelay = Callable[[dict[str, Any]], Awaitable[Relay]]

SENDER = "receipts@example.com"
RCPT = "alice@example.net"


# ---------------------------------------------------------------------------
# helpers


def build(
    *fields: str,
    body: bytes = b"Hello there.\r\n",
    date: bool = True,
    message_id: bool = True,
    eol: bytes = b"\r\n",
) -> bytes:
    """A message from raw header lines (str, UTF-8) with Date and Message-ID added."""
    lines = [f.encode("utf-8") for f in fields]
    if date:
        lines.append(b"Date: Tue, 24 Nov 2026 10:00:00 +0000")
    if message_id:
        lines.append(f"Message-ID: <{os.urandom(6).hex()}@example.com>".encode())
    return eol.join(lines) + eol + eol + body


def plain(sender: str = SENDER, subject: str = "Hello", body: bytes = b"Hello there.\r\n") -> bytes:
    return build(
        f"From: Example <{sender}>",
        f"To: {RCPT}",
        f"Subject: {subject}",
        body=body,
    )


def metric(relay: Relay, sample: str, **labels: str) -> float:
    """The value of one sample in ``relay.metrics.render()`` (0.0 when absent)."""
    text = relay.metrics.render().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return float(s.value)
    return 0.0


def rejected(relay: Relay, code: int, enhanced: str) -> float:
    return metric(relay, "oneclick_rejected_total", code=str(code), enhanced=enhanced)


def messages(relay: Relay, message_class: str, outcome: str) -> float:
    return metric(relay, "oneclick_messages_total", message_class=message_class, outcome=outcome)


def outcomes(relay: Relay, outcome: str) -> float:
    """``oneclick_messages_total`` with this outcome, summed over message classes."""
    text = relay.metrics.render().decode()
    return sum(
        float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "oneclick_messages_total" and s.labels.get("outcome") == outcome
    )


def stuff(data: bytes) -> bytes:
    """Dot-stuff ``data`` (lines split on CRLF, as the server reads them) and terminate it."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    lines = data.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"


async def envelope(
    client: RawSMTP, mail_from: str = SENDER, rcpts: tuple[str, ...] = (RCPT,), params: str = ""
) -> None:
    reply = await client.command("EHLO client.test")
    assert reply.code == 250, reply
    reply = await client.command(f"MAIL FROM:<{mail_from}>{params}")
    assert (reply.code, reply.enhanced) == (250, "2.1.0"), reply
    for rcpt in rcpts:
        reply = await client.command(f"RCPT TO:<{rcpt}>")
        assert (reply.code, reply.enhanced) == (250, "2.1.5"), reply


async def transact(
    port: int,
    data: bytes,
    mail_from: str = SENDER,
    rcpts: tuple[str, ...] = (RCPT,),
    params: str = "",
) -> Reply:
    """One whole transaction over a raw socket; the reply to the final dot."""
    client = await RawSMTP.open(port)
    try:
        await envelope(client, mail_from, rcpts, params)
        reply = await client.command("DATA")
        assert reply.code == 354, reply
        await client.send(stuff(data))
        reply = await client.reply()
        await client.command("QUIT")
        return reply
    finally:
        await client.close()


async def no_more_replies(client: RawSMTP, wait: float = 0.5) -> list[Reply]:
    """Replies that arrive without a further command (there should be none)."""
    extra = []
    while True:
        try:
            extra.append(await asyncio.wait_for(client.reply(), wait))
        except TimeoutError:
            return extra


async def wait_idle(relay: Relay, seconds: float = 10.0) -> None:
    """Until no transaction is running in the relay."""
    assert relay.handler is not None
    for _ in range(int(seconds / 0.02)):
        if not relay.handler.inflight:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(relay.handler.inflight)} transactions still running")


async def assert_still_serves(relay: Relay, sink: Sink) -> None:
    before = len(sink.handler.messages)
    delivered = messages(relay, "transactional", "delivered")
    subject = f"still serving {os.urandom(4).hex()}"
    code, text = await smtp_send(relay.smtp_port, SENDER, [RCPT], plain(subject=subject))
    assert code == 250, text
    assert len(sink.handler.messages) == before + 1
    assert subject.encode() in sink.handler.messages[-1].data
    assert messages(relay, "transactional", "delivered") == delivered + 1


def assert_crlf_only(data: bytes) -> None:
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r"), "bare CR or LF"


async def assert_refused_message(
    relay: Relay, sink: Sink, data: bytes, code: int, enhanced: str, words: str = ""
) -> Reply:
    reply = await transact(relay.smtp_port, data)
    assert (reply.code, reply.enhanced) == (code, enhanced), reply
    assert words.lower() in reply.text.lower(), reply
    assert sink.handler.messages == []
    assert rejected(relay, code, enhanced) == 1
    assert outcomes(relay, "rejected") == 1
    await assert_still_serves(relay, sink)
    return reply


# ---------------------------------------------------------------------------
# the header block: From and structure (550 5.6.0)


async def test_no_from_is_550_5_6_0(relay: Relay, sink: Sink) -> None:
    data = build(f"To: {RCPT}", "Subject: who sent this?")
    await assert_refused_message(relay, sink, data, 550, "5.6.0", "From")


async def test_two_from_headers_is_550_5_6_0(relay: Relay, sink: Sink) -> None:
    data = build(f"From: <{SENDER}>", "From: <other@example.com>", f"To: {RCPT}", "Subject: two")
    await assert_refused_message(relay, sink, data, 550, "5.6.0", "From")


async def test_two_addresses_in_one_from_is_550_5_6_0(relay: Relay, sink: Sink) -> None:
    data = build(f"From: <{SENDER}>, <other@example.com>", f"To: {RCPT}", "Subject: two")
    await assert_refused_message(relay, sink, data, 550, "5.6.0", "From")


@pytest.mark.parametrize(
    "field",
    ["From: alice", "From: Alice <alice>", "From: alice@", "From: <@example.com>", "From:"],
    ids=["bare-local", "angle-local", "empty-domain", "empty-local", "empty-field"],
)
async def test_from_without_domain_is_550_5_6_0(relay: Relay, sink: Sink, field: str) -> None:
    data = build(field, f"To: {RCPT}", "Subject: no domain")
    await assert_refused_message(relay, sink, data, 550, "5.6.0", "From")


async def test_nul_in_header_block_is_550_5_6_0(relay: Relay, sink: Sink) -> None:
    data = build(f"From: <{SENDER}>", "Subject: NUL \0 in a header")
    await assert_refused_message(relay, sink, data, 550, "5.6.0", "NUL")


@pytest.mark.parametrize(
    ("block", "headers"),
    [
        ([f"From: <{SENDER}>", "this line is not a header field", "Subject: x"], 1),
        ([f"From: <{SENDER}>", "Bad Name: a space in the field name"], 1),
        ([f"From: <{SENDER}>", ": no field name"], 1),
        ([" folded: continuation first", f"From: <{SENDER}>"], 0),
    ],
    ids=["no-colon", "space-in-name", "empty-name", "starts-with-continuation"],
)
@pytest.mark.parametrize("sender", [SENDER, "news@example.com"], ids=["transactional", "marketing"])
async def test_non_field_line_starts_the_body_as_in_postfix(
    relay: Relay, sink: Sink, keys: Keys, block: list[str], headers: int, sender: str
) -> None:
    """The first line that is not a header field starts the body (Postfix's rule); with no
    header field at all, From is the envelope sender (as Postfix's cleanup adds it)."""
    block = [line.replace(SENDER, sender) for line in block]
    data = build(*block)
    reply = await transact(relay.smtp_port, data, mail_from=sender)
    assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    [got] = sink.handler.messages
    assert_crlf_only(got.data)
    first_body_line = block[headers].encode()
    head, body = got.data.split(b"\r\n\r\n", 1)
    assert body.startswith(first_body_line + b"\r\n"), got.data[:600]
    assert body.endswith(b"Hello there.\r\n")
    assert f"From: <{sender}>".encode() in head
    assert dkim.verify(got.data, dnsfunc=keys.dnsfunc)  # signed over what was sent


async def test_no_header_block_at_all_is_relayed_from_the_envelope_sender(
    relay: Relay, sink: Sink, keys: Keys
) -> None:
    reply = await transact(relay.smtp_port, b"\r\njust a body, no header block\r\n")
    assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    [got] = sink.handler.messages
    head, body = got.data.split(b"\r\n\r\n", 1)
    assert f"From: <{SENDER}>".encode() in head
    assert body == b"just a body, no header block\r\n"
    assert dkim.verify(got.data, dnsfunc=keys.dnsfunc)


async def test_no_header_block_and_null_sender_is_550_5_6_0(relay: Relay, sink: Sink) -> None:
    reply = await transact(relay.smtp_port, b"just a body\r\n", mail_from="")
    assert (reply.code, reply.enhanced) == (550, "5.6.0"), reply
    assert "From" in reply.text
    assert sink.handler.messages == []


# ---------------------------------------------------------------------------
# line endings, 8-bit and UTF-8: accepted and delivered exactly


@pytest.mark.parametrize("sender", [SENDER, "news@example.com"], ids=["transactional", "marketing"])
async def test_bare_lf_is_normalised_and_signed(
    relay: Relay, sink: Sink, keys: Keys, sender: str
) -> None:
    body = b"line one\nline two\n\nlast line"
    data = build(
        f"From: Example <{sender}>",
        f"To: {RCPT}",
        "Subject: bare LF",
        "X-Folded: first part",
        "  second part",
        body=body,
        eol=b"\n",
    )
    assert b"\r" not in data
    reply = await transact(relay.smtp_port, data, mail_from=sender)
    assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    [got] = sink.handler.messages
    assert got.rcpt_tos == (RCPT,)
    assert_crlf_only(got.data)
    assert got.data.endswith(data.replace(b"\n", b"\r\n") + b"\r\n")
    assert dkim.verify(got.data, dnsfunc=keys.dnsfunc)
    message_class = "marketing" if sender.startswith("news") else "transactional"
    assert messages(relay, message_class, "delivered") == 1
    await assert_still_serves(relay, sink)


async def test_bare_cr_is_normalised_and_signed(relay: Relay, sink: Sink, keys: Keys) -> None:
    data = build(f"From: <{SENDER}>", f"To: {RCPT}", "Subject: bare CR", body=b"one\rtwo\r\n")
    reply = await transact(relay.smtp_port, data)
    assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    [got] = sink.handler.messages
    assert_crlf_only(got.data)
    assert got.data.endswith(b"\r\n\r\none\r\ntwo\r\n")
    assert dkim.verify(got.data, dnsfunc=keys.dnsfunc)
    assert messages(relay, "transactional", "delivered") == 1
    await assert_still_serves(relay, sink)


async def test_8bit_header_bytes_are_delivered_byte_exact(
    relay: Relay, sink: Sink, keys: Keys
) -> None:
    data = (
        b"From: J\xc3\xb6rg M\xc3\xbcller <" + SENDER.encode() + b">\r\n"
        b"To: Ren\xe9e <" + RCPT.encode() + b">\r\n"  # Latin-1, not UTF-8
        b"Subject: Gr\xc3\xbc\xc3\x9fe \xff\xfe raw bytes\r\n"
        b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <8bit@example.com>\r\n"
        b"\r\n"
        b"Body with 8-bit: caf\xc3\xa9 \xe9\r\n"
    )
    reply = await transact(relay.smtp_port, data)
    assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    [got] = sink.handler.messages
    assert got.data.endswith(data)
    assert dkim.verify(got.data, dnsfunc=keys.dnsfunc)
    assert messages(relay, "transactional", "delivered") == 1
    await assert_still_serves(relay, sink)


@pytest.mark.parametrize("sender", ["jörg@example.com", "news@example.com"])
async def test_smtputf8_address_is_accepted_and_delivered(
    relay: Relay, sink: Sink, keys: Keys, sender: str
) -> None:
    rcpt = "zoë.ñandú@example.net"
    data = build(
        f"From: Jörg <{sender}>", f"To: <{rcpt}>", "Subject: Grüße", body="ünï\r\n".encode()
    )
    reply = await transact(relay.smtp_port, data, sender, (rcpt,), params=" SMTPUTF8")
    assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    [got] = sink.handler.messages
    assert (got.mail_from, got.rcpt_tos) == (sender, (rcpt,))
    assert got.data.endswith(data)
    assert dkim.verify(got.data, dnsfunc=keys.dnsfunc)
    message_class = "marketing" if sender.startswith("news") else "transactional"
    assert messages(relay, message_class, "delivered") == 1
    await assert_still_serves(relay, sink)


# ---------------------------------------------------------------------------
# size limits


@pytest.mark.parametrize("where", ["body", "header"])
async def test_line_over_998_octets_is_550_5_6_0(relay: Relay, sink: Sink, where: str) -> None:
    long = "x" * 999
    if where == "body":
        data = plain(body=b"short\r\n" + long.encode() + b"\r\n")
    else:
        data = build(f"From: <{SENDER}>", f"To: {RCPT}", f"Subject: {long}")
    await assert_refused_message(relay, sink, data, 550, "5.6.0", "998")


async def test_line_of_exactly_998_octets_is_delivered(relay: Relay, sink: Sink) -> None:
    line = b"y" * 998
    data = plain(body=line + b"\r\n")
    reply = await transact(relay.smtp_port, data)
    assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    [got] = sink.handler.messages
    assert got.data.endswith(data)
    await assert_still_serves(relay, sink)


async def test_too_many_recipients_is_452_4_5_3(relay: Relay, sink: Sink) -> None:
    rcpts = [f"user{i}@example.net" for i in range(50)]
    client = await RawSMTP.open(relay.smtp_port)
    try:
        await envelope(client, SENDER, tuple(rcpts))
        reply = await client.command("RCPT TO:<one-too-many@example.net>")
        assert (reply.code, reply.enhanced) == (452, "4.5.3"), reply
        reply = await client.command("DATA")
        assert reply.code == 354
        await client.send(stuff(plain()))
        reply = await client.reply()
        assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    finally:
        await client.close()
    [got] = sink.handler.messages
    assert list(got.rcpt_tos) == rcpts
    assert rejected(relay, 452, "4.5.3") == 1
    await assert_still_serves(relay, sink)


async def test_oversize_message_is_552_5_3_4(
    relay: Relay, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    body = (b"z" * 900 + b"\r\n") * 1200  # ~1.1 MB > max_message_size (1 MiB)
    reply = await transact(relay.smtp_port, plain(body=body))
    assert (reply.code, reply.enhanced) == (552, "5.3.4"), reply
    assert "refused client=127.0.0.1 reason=message-too-big" in caplog.text
    assert sink.handler.messages == []
    assert rejected(relay, 552, "5.3.4") == 1
    await assert_still_serves(relay, sink)


async def test_oversize_declared_at_mail_is_552_5_3_4(relay: Relay, sink: Sink) -> None:
    client = await RawSMTP.open(relay.smtp_port)
    try:
        await client.command("EHLO client.test")
        reply = await client.command(f"MAIL FROM:<{SENDER}> SIZE={2 * 1024 * 1024}")
        assert (reply.code, reply.enhanced) == (552, "5.3.4"), reply
    finally:
        await client.close()
    assert rejected(relay, 552, "5.3.4") == 1
    await assert_still_serves(relay, sink)


async def test_one_megabyte_header_block_is_552_5_3_4(relay: Relay, sink: Sink) -> None:
    filler = [f"X-Filler-{i:05d}: {'f' * 80}" for i in range(10_600)]
    data = build(f"From: <{SENDER}>", f"To: {RCPT}", *filler)
    assert 1_000_000 <= len(data) < 1024 * 1024  # under the message size limit
    await assert_refused_message(relay, sink, data, 552, "5.3.4", "header")


# ---------------------------------------------------------------------------
# envelope syntax and injection

# (command line, exact (code, enhanced) or None for "501 or 553 with a 5.x.x code")
RCPT_SYNTAX = {
    "space-in-local-part": (b"RCPT TO:<a b@c>", None),
    "null-path": (b"RCPT TO:<>", (553, "5.1.3")),
    "missing-colon": (b"RCPT TO <alice@example.net>", (501, "5.5.4")),
    "no-address": (b"RCPT TO:", (501, "5.5.4")),
    "no-local-part": (b"RCPT TO:<@example.net>", (553, "5.1.3")),
    "no-domain": (b"RCPT TO:<alice@>", (553, "5.1.3")),
    "two-at-signs": (b"RCPT TO:<a@b@example.net>", (553, "5.1.3")),
    "nested-brackets": (b"RCPT TO:<<alice@example.net>>", (553, "5.1.3")),
    "trailing-bracket": (b"RCPT TO:<alice@example.net>>", (501, "5.5.4")),
    "comma-list": (b"RCPT TO:<a,b@example.net>", (501, "5.5.4")),
    "invalid-utf8": (b"RCPT TO:<a\xff@example.net>", None),
    "control-character": (b"RCPT TO:<x\x0cy@example.net>", None),
}


def assert_refused(reply: Reply, exact: tuple[int, str] | None) -> None:
    """The exact reply, or (``None``) any 501/553 with a permanent enhanced code."""
    if exact is None:
        assert reply.code in (501, 553), reply
        assert reply.enhanced is not None and reply.enhanced.startswith("5."), reply
    else:
        assert (reply.code, reply.enhanced) == exact, reply


@pytest.mark.parametrize("case", RCPT_SYNTAX.keys())
async def test_rcpt_syntax_error_is_refused_with_enhanced_code(
    relay: Relay, sink: Sink, case: str
) -> None:
    line, exact = RCPT_SYNTAX[case]
    client = await RawSMTP.open(relay.smtp_port)
    try:
        await client.command("EHLO client.test")
        reply = await client.command(f"MAIL FROM:<{SENDER}> SMTPUTF8")
        assert reply.code == 250, reply
        reply = await client.command(line)
        assert_refused(reply, exact)
        assert await no_more_replies(client) == []
        data_reply = await client.command("DATA")
        if data_reply.code == 354:  # the bad address was taken: finish so the outcome shows
            await client.send(stuff(plain()))
            data_reply = await client.reply()
        assert (data_reply.code, data_reply.enhanced) == (503, "5.5.1"), data_reply
    finally:
        await client.close()
    assert sink.handler.messages == []
    assert rejected(relay, reply.code, reply.enhanced or "") == 1
    await assert_still_serves(relay, sink)


# (command line, exact (code, enhanced) or None for "501 or 553 with a 5.x.x code")
MAIL_SYNTAX = {
    "missing-colon": (b"MAIL FROM <receipts@example.com>", (501, "5.5.4")),
    "no-address": (b"MAIL FROM:", (501, "5.5.4")),
    "unknown-parameter": (b"MAIL FROM:<receipts@example.com> BOGUS=1", (555, "5.5.4")),
    "space-in-local-part": (b"MAIL FROM:<a b@example.com>", None),
    "space-and-no-at": (b"MAIL FROM:<exa mple.net>", None),
    "no-at": (b"MAIL FROM:<receipts>", None),
    "control-character": (b"MAIL FROM:<x\x0cy@example.com>", None),
    "invalid-utf8": (b"MAIL FROM:<a\xff@example.com>", None),
}


@pytest.mark.parametrize("case", MAIL_SYNTAX.keys())
async def test_mail_syntax_error_is_refused_with_enhanced_code(
    relay: Relay, sink: Sink, case: str
) -> None:
    line, exact = MAIL_SYNTAX[case]
    client = await RawSMTP.open(relay.smtp_port)
    try:
        await client.command("EHLO client.test")
        reply = await client.command(line)
        assert_refused(reply, exact)
        assert await no_more_replies(client) == []
        refused = await client.command(f"RCPT TO:<{RCPT}>")
        if refused.code == 250:  # the bad sender was taken: finish so the outcome shows
            assert (await client.command("DATA")).code == 354
            await client.send(stuff(plain()))
            refused = await client.reply()
        assert (refused.code, refused.enhanced) == (503, "5.5.1"), refused
    finally:
        await client.close()
    await wait_idle(relay)
    assert sink.handler.messages == []
    assert rejected(relay, reply.code, reply.enhanced or "") == 1
    await assert_still_serves(relay, sink)


async def test_null_reverse_path_is_accepted(relay: Relay, sink: Sink, keys: Keys) -> None:
    """``MAIL FROM:<>`` is how bounces and DSNs are sent (RFC 5321 4.5.5): relay it."""
    data = plain(sender="mailer-daemon@example.com", subject="Undelivered Mail")
    client = await RawSMTP.open(relay.smtp_port)
    try:
        await client.command("EHLO client.test")
        reply = await client.command("MAIL FROM:<>")
        assert (reply.code, reply.enhanced) == (250, "2.1.0"), reply
        reply = await client.command(f"RCPT TO:<{RCPT}>")
        assert (reply.code, reply.enhanced) == (250, "2.1.5"), reply
        assert (await client.command("DATA")).code == 354
        await client.send(stuff(data))
        reply = await client.reply()
        assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    finally:
        await client.close()
    [got] = sink.handler.messages
    assert (got.mail_from, got.rcpt_tos) == ("<>", (RCPT,))  # aiosmtpd writes the null path so
    assert got.data.endswith(data)
    await assert_still_serves(relay, sink)


# (command, expected first reply) — the rest of the transaction must then refuse to send
INJECTION = {
    "mail-cr": (b"MAIL FROM:<a\rb@example.com>", (553, "5.1.7")),
    "mail-nul": (b"MAIL FROM:<a\0b@example.com>", (553, "5.1.7")),
    "mail-cr-command": (b"MAIL FROM:<a@example.com>\rRCPT TO:<evil@example.org>", (501, "5.5.4")),
    "mail-lf-command": (b"MAIL FROM:<a@example.com\nRCPT TO:<evil@example.org>>", None),
    "rcpt-cr": (b"RCPT TO:<a\rb@example.net>", (553, "5.1.3")),
    "rcpt-nul": (b"RCPT TO:<a\0b@example.net>", (553, "5.1.3")),
    "rcpt-cr-command": (
        b"RCPT TO:<victim@example.net\rRCPT TO:<evil@example.org>>",
        (501, "5.5.4"),
    ),
    "rcpt-lf-command": (b"RCPT TO:<victim@example.net\nRCPT TO:<evil@example.org>>", None),
}


@pytest.mark.parametrize("case", INJECTION.keys())
async def test_cr_lf_nul_in_envelope_address_is_refused(
    relay: Relay, sink: Sink, case: str
) -> None:
    """A CR, LF or NUL inside an address is refused; nothing of the transaction is relayed.

    A bare LF is not a line ending in SMTP (RFC 5321 2.3.8): the whole line is one
    bad command, so it gets exactly one 5xx reply and no part of it takes effect.
    """
    line, exact = INJECTION[case]
    client = await RawSMTP.open(relay.smtp_port)
    try:
        await client.command("EHLO client.test")
        if line.startswith(b"RCPT"):
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        reply = await client.command(line)
        extra = await no_more_replies(client)
        assert extra == [], f"one command line got {len(extra) + 1} replies: {reply}, {extra}"
        if exact is None:
            assert 500 <= reply.code < 600, reply
            assert reply.enhanced is not None and reply.enhanced.startswith("5."), reply
        else:
            assert (reply.code, reply.enhanced) == exact, reply
        if line.startswith(b"MAIL"):
            refused = await client.command(f"RCPT TO:<{RCPT}>")
        else:
            refused = await client.command("DATA")
        if refused.code == 354:
            await client.send(stuff(plain()))
            refused = await client.reply()
        assert (refused.code, refused.enhanced) == (503, "5.5.1"), refused
    finally:
        await client.close()
    await wait_idle(relay)
    assert sink.handler.messages == []
    assert rejected(relay, reply.code, reply.enhanced or "") == 1
    await assert_still_serves(relay, sink)


async def test_smtp_smuggling_in_data_stays_one_message(relay: Relay, sink: Sink) -> None:
    """``<LF>.<CR><LF>`` and ``<CR><LF>.<LF>`` do not end DATA; no second message appears."""
    smuggled = (
        b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<evil@example.org>\r\nDATA\r\n"
        b"From: <ceo@example.com>\r\nSubject: smuggled\r\n\r\nsmuggled\r\n"
    )
    body = b"first\n.\r\n" + smuggled + b"\r\n.\nsecond " + smuggled + b"\r\n"
    data = plain(body=body)
    client = await RawSMTP.open(relay.smtp_port)
    try:
        await envelope(client)
        assert (await client.command("DATA")).code == 354
        await client.send(data + b".\r\n")
        reply = await client.reply()
        assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
        assert await no_more_replies(client) == []
    finally:
        await client.close()
    await wait_idle(relay)
    [got] = sink.handler.messages
    assert got.rcpt_tos == (RCPT,)
    assert_crlf_only(got.data)
    assert b"Subject: smuggled" in got.data  # still inside the one message's body
    await assert_still_serves(relay, sink)


@pytest.mark.parametrize(
    "ending",
    [b"last line\n.\n", b"last line\r\n\n.\n", b"last\n.\nQUIT\n"],
    ids=["lf-dot-lf", "crlf-then-bare-lf-dot-lf", "command-after"],
)
async def test_bare_lf_data_terminator_is_answered_at_once(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink, ending: bytes
) -> None:
    """``<LF>.<LF>`` is not the end of data, and the client is not left waiting for the
    idle timeout (60 s here): 521 5.5.2 at once, the connection closed, nothing relayed."""
    config_dict["smtp"]["timeout"] = 60
    relay = await make_relay(config_dict)
    client = await RawSMTP.open(relay.smtp_port, timeout=10)
    try:
        await envelope(client)
        assert (await client.command("DATA")).code == 354
        await client.send(plain(body=b"") + ending)
        reply = await client.reply()
        assert (reply.code, reply.enhanced) == (521, "5.5.2"), reply
        assert "bare <LF>" in reply.text
        assert await client.closed_by_server(within=5)
    finally:
        await client.close()
    await wait_idle(relay)
    assert sink.handler.messages == []
    assert rejected(relay, 521, "5.5.2") == 1
    await assert_still_serves(relay, sink)


# ---------------------------------------------------------------------------
# odd bodies


async def test_nul_bytes_in_body_are_delivered_unchanged(
    relay: Relay, sink: Sink, keys: Keys
) -> None:
    """The relay never touches the body: NUL octets there go through, signed."""
    data = plain(body=b"before\0after\r\n\0\0\r\nend\r\n")
    reply = await transact(relay.smtp_port, data)
    assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    [got] = sink.handler.messages
    assert got.data.endswith(data)
    assert dkim.verify(got.data, dnsfunc=keys.dnsfunc)
    assert messages(relay, "transactional", "delivered") == 1
    await assert_still_serves(relay, sink)


@pytest.mark.parametrize("blank_line", [False, True], ids=["no-separator", "with-separator"])
async def test_empty_body_is_delivered(
    relay: Relay, sink: Sink, keys: Keys, blank_line: bool
) -> None:
    headers = build(f"From: <{SENDER}>", f"To: {RCPT}", "Subject: headers only", body=b"")
    assert headers.endswith(b"\r\n\r\n")
    data = headers if blank_line else headers[:-2]
    reply = await transact(relay.smtp_port, data)
    assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    [got] = sink.handler.messages
    assert got.data.endswith(headers)
    assert dkim.verify(got.data, dnsfunc=keys.dnsfunc)
    assert messages(relay, "transactional", "delivered") == 1
    await assert_still_serves(relay, sink)


# ---------------------------------------------------------------------------
# clients that go away or stall


async def test_disconnect_mid_data_relays_nothing(relay: Relay, sink: Sink) -> None:
    client = await RawSMTP.open(relay.smtp_port)
    await envelope(client)
    assert (await client.command("DATA")).code == 354
    await client.send(plain()[:60])  # part of the header block, no final dot
    client.writer.transport.abort()  # hang up hard (RST)
    await asyncio.sleep(0.5)
    await wait_idle(relay)
    assert sink.handler.messages == []
    assert messages(relay, "transactional", "delivered") == 0
    await assert_still_serves(relay, sink)


def half_close(client: RawSMTP) -> None:
    """``shutdown(SHUT_WR)`` on the client's socket: the server reads EOF, we can still read."""
    sock = client.writer.get_extra_info("socket")
    sock.shutdown(socket.SHUT_WR)
    with socket.socket(fileno=os.dup(sock.fileno())) as same, pytest.raises(BrokenPipeError):
        same.send(b"x")  # our side really is closed for writing


async def read_until_closed(client: RawSMTP, within: float) -> bytes | None:
    """Everything the server writes until it closes; None if it is still open after ``within``."""
    data = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await client.reader.read(65536):
                data += chunk
    except TimeoutError:
        return None
    return data


async def test_half_close_mid_data_relays_nothing(relay: Relay, sink: Sink) -> None:
    """EOF before the final dot ends the session at once: no 250, nothing relayed.

    ``smtp.timeout`` is 300 s here, so a close within 5 s is the EOF's doing.
    """
    assert relay.config.smtp.timeout >= 300
    client = await RawSMTP.open(relay.smtp_port)
    await envelope(client)
    assert (await client.command("DATA")).code == 354
    await client.send(plain() + b"\r\n")  # the whole message but no final dot
    half_close(client)
    rest = await read_until_closed(client, within=5)
    await client.close()
    assert rest is not None, "the relay kept a half-closed session open"
    assert b"250" not in rest, rest  # the data was never taken as complete
    await wait_idle(relay)
    assert sink.handler.messages == []
    assert messages(relay, "transactional", "delivered") == 0
    await assert_still_serves(relay, sink)


async def test_half_close_after_final_dot_is_answered(relay: Relay, sink: Sink) -> None:
    """A client that shuts its side right after the dot still reads the reply: the
    delivery under way is not cancelled by the EOF, exactly one copy reaches the
    upstream, and the 250 says so (without it the client would resend)."""
    client = await RawSMTP.open(relay.smtp_port)
    await envelope(client)
    assert (await client.command("DATA")).code == 354
    await client.send(stuff(plain(subject="half close after the dot")))
    half_close(client)
    rest = await read_until_closed(client, within=10)
    await client.close()
    assert rest is not None, "the relay kept a half-closed session open"
    assert rest.startswith(b"250 2.0.0 Ok: delivered 1 id="), rest
    assert rest.count(b"\r\n") == 1, rest  # that reply, then the close
    await wait_idle(relay)
    delivered = [m for m in sink.handler.messages if b"half close after the dot" in m.data]
    assert len(delivered) == 1
    assert messages(relay, "transactional", "delivered") == 1
    await assert_still_serves(relay, sink)


@pytest.mark.parametrize("stage", ["after-greeting", "mid-data"])
async def test_stalled_client_is_disconnected(
    make_relay: MakeRelay, config_dict: dict[str, Any], sink: Sink, stage: str
) -> None:
    config_dict["smtp"]["timeout"] = 1
    relay = await make_relay(config_dict)
    client = await RawSMTP.open(relay.smtp_port)
    try:
        if stage == "mid-data":
            await envelope(client)
            assert (await client.command("DATA")).code == 354
            await client.send(plain()[:80])
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await client.closed_by_server(within=8), "relay kept a stalled client"
        assert loop.time() - started < 5
    finally:
        await client.close()
    await wait_idle(relay)
    assert sink.handler.messages == []
    assert messages(relay, "transactional", "delivered") == 0
    await assert_still_serves(relay, sink)
