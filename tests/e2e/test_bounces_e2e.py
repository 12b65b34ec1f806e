"""Bounces, complaints and mailto unsubscribes end to end.

Real SMTP into the relay → real capture upstream (which sees the VERP return path) →
a bounce built from a sample in tests/data/bounces/ addressed to that return path →
real SMTP (or LMTP, or ``oneclick-relay ingest``) into the inbound listener → the
real Redis suppression store, daily counters and the next message.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import Sink
from helpers import DATA, message, smtp_send, unsubscribe_token, write_yaml

from relay.runtime.app import Relay
from relay.suppression.report import daily_report
from relay.suppression.store import DAY, GLOBAL

SAMPLES = DATA / "bounces"
ROOT = Path(__file__).resolve().parents[2]
ALICE = "alice@example.net"
PLAIN_RETURN_PATH = "bounces@bounce.example.com"


@pytest.fixture
def bounce_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    config_dict["bounces"] = {
        "return_path_domain": "bounce.example.com",
        "listen": "127.0.0.1:0",
        "feedback_addresses": ["fbl@example.com"],
        "keep_days": 3,
    }
    config_dict["unsubscribe"] = {"mailto_domain": "unsub-mail.example.com"}
    return config_dict


@pytest.fixture
async def brelay(make_relay: Any, bounce_config: dict[str, Any]) -> Relay:
    relay: Relay = await make_relay(bounce_config)
    return relay


async def newsletter(relay: Relay, sink: Sink, rcpt: str, sender: str = "news@example.com") -> Any:
    """Relay one message to ``rcpt``; the copy the upstream got (envelope and bytes)."""
    before = len(sink.handler.messages)
    code, text = await smtp_send(
        relay.smtp_port, "app@example.com", [rcpt], message(sender=sender, to=rcpt)
    )
    assert code == 250, text
    [copy] = sink.handler.messages[before:]
    return copy


def token_of(data: bytes) -> str:
    return unsubscribe_token(data)


def bounce(sample: str, return_path: str, token: str = "", message_id: str = "") -> bytes:
    """A sample with our return path (and token) filled in, optionally a fresh Message-ID."""
    data = (SAMPLES / sample).read_bytes().replace(PLAIN_RETURN_PATH.encode(), return_path.encode())
    data = data.replace(b"@@TOKEN@@", token.encode())
    if message_id:
        data = re.sub(
            rb"(?im)^Message-ID:.*$", f"Message-ID: <{message_id}>".encode(), data, count=1
        )
    return data


async def deliver(relay: Relay, rcpt: str, data: bytes) -> tuple[int, str]:
    """Into the inbound listener, as a bounce arrives: MAIL FROM:<>."""
    return await smtp_send(relay.inbound_port, "", [rcpt], data)


async def fields(redis_url: str, address: str) -> dict[str, str]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return await client.hgetall(f"ocr:sup:{{{address}}}")
    finally:
        await client.aclose()


async def counts(relay: Relay, redis_url: str) -> dict[str, dict[str, int]]:
    await relay.counters.flush()
    client = aioredis.Redis.from_url(redis_url)
    try:
        rows = await daily_report(client, "ocr", 1)
    finally:
        await client.aclose()
    # the sample newsletters have no body link; that lint is tested on its own
    return {r.group: {k: v for k, v in r.counts.items() if k != "no-body-link"} for r in rows}


def metric(relay: Relay, line: str) -> bool:
    return line in relay.metrics.render().decode()


# ---------------------------------------------------------------------------
# the return path


async def test_every_copy_gets_its_own_verified_return_path(brelay: Relay, sink: Sink) -> None:
    code, _ = await smtp_send(
        brelay.smtp_port,
        "app@example.com",
        [ALICE, "bob@example.org"],
        message(sender="receipts@example.com"),
    )
    assert code == 250
    copies = sorted(sink.handler.messages, key=lambda m: m.rcpt_tos)
    assert [c.rcpt_tos for c in copies] == [(ALICE,), ("bob@example.org",)]
    assert copies[0].data == copies[1].data  # signed once, sent once per recipient
    for copy in copies:
        local, _, domain = copy.mail_from.partition("@")
        assert domain == "bounce.example.com"
        assert len(local) <= 64
        rcpt_local, _, rcpt_domain = copy.rcpt_tos[0].partition("@")
        assert local.endswith(f".{rcpt_local}={rcpt_domain}")
    marketing = await newsletter(brelay, sink, ALICE)
    lu = re.search(rb"List-Unsubscribe: ([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", marketing.data)
    assert lu is not None
    uris = lu.group(1).decode().replace("\r\n", "").split(", ")
    assert uris[0].startswith("<https://unsub.example.com/u/")
    token = token_of(marketing.data)
    assert re.fullmatch(
        rf"<mailto:unsubscribe\+[a-z2-7]{{16}}@unsub-mail\.example\.com\?subject=unsubscribe%20{token}>",
        uris[1],
    ), uris[1]


async def test_null_reverse_path_stays_null(brelay: Relay, sink: Sink) -> None:
    code, _ = await smtp_send(brelay.smtp_port, "", [ALICE], message(sender="receipts@example.com"))
    assert code == 250
    assert sink.handler.messages[0].mail_from == "<>"  # how aiosmtpd writes the null path


# ---------------------------------------------------------------------------
# one DSN per class, from the samples, through the SMTP listener

CLASSES = [
    # sample, recipient, reason written (None: none), daily counter
    ("postfix-5.1.1-user-unknown.eml", ALICE, "hard-bounce", "hard-bounce"),
    ("gmail-5.1.1-no-such-user.eml", "nosuchuser1234@gmail.com", "hard-bounce", "hard-bounce"),
    ("outlook-5.1.10-recipient-not-found.eml", "bob@contoso.com", "hard-bounce", "hard-bounce"),
    ("exim-5.1.1-unknown-user.eml", "dave@example.org", "hard-bounce", "hard-bounce"),
    ("postfix-4.4.1-expired.eml", ALICE, None, "soft-bounce"),
    ("gmail-5.2.2-inbox-full.eml", "fulluser@gmail.com", None, "soft-bounce"),
    ("exim-5.2.2-mailbox-full.eml", "heidi@example.org", None, "soft-bounce"),
    ("yahoo-failure-notice.eml", "carol@yahoo.com", "hard-bounce", "hard-bounce"),
    ("postfix-outlook-5.7.1-blocklist.eml", "frank@outlook.com", None, "policy-bounce"),
    ("postfix-gmail-5.7.26-unauthenticated.eml", "erin@gmail.com", None, "policy-bounce"),
    ("postfix-yahoo-5.7.9-policy.eml", "grace@yahoo.com", None, "policy-bounce"),
    ("postfix-delayed-warning.eml", ALICE, None, None),
    # by reason, whatever the Status says
    ("postfix-blocked-status-5.1.1.eml", "dot@example.org", None, "policy-bounce"),
    ("postfix-filtered-recipient-preferences.eml", "eli@example.org", None, "policy-bounce"),
    ("postfix-suspended-5.2.1.eml", "fay@example.org", None, "soft-bounce"),
    ("postfix-failed-4.1.1-user-unknown.eml", "gus@example.org", "hard-bounce", "hard-bounce"),
    ("postfix-null-mx.eml", "bea@nullmx.example", "hard-bounce", "hard-bounce"),
    ("postfix-host-unknown.eml", "ann@no-such-domain.example", "hard-bounce", "hard-bounce"),
    ("postfix-too-big.eml", "cid@example.org", None, "policy-bounce"),
    # formats without a DSN or with a broken one
    ("exchange2003-unknown-recipient.eml", "eve@example.org", "hard-bounce", "hard-bounce"),
    ("domino-user-unknown.eml", "dee@example.org", "hard-bounce", "hard-bounce"),
    ("qmail-user-unknown.eml", "gil@example.org", "hard-bounce", "hard-bounce"),
    ("dma-user-unknown.eml", "val@example.org", "hard-bounce", "hard-bounce"),
    ("sendmail-v5-user-unknown.eml", "wes@example.org", "hard-bounce", "hard-bounce"),
    ("workmail-user-unknown.eml", "yan@example.org", "hard-bounce", "hard-bounce"),
    ("opensmtpd-user-unknown.eml", "zed@example.org", "hard-bounce", "hard-bounce"),
    ("qp-text-dsn-user-unknown.eml", "abe@example.org", "hard-bounce", "hard-bounce"),
    ("ezweb-mailbox-full.eml", "taro@ezweb.ne.jp", None, "soft-bounce"),
    ("rfc3464-broken-boundary-expired.eml", "cal@host.example.edu", None, "soft-bounce"),
    # a Diagnostic-Code of 1,300 octets on one line: the listener takes it
    ("postfix-long-line-user-unknown.eml", "sue@example.org", "hard-bounce", "hard-bounce"),
]


@pytest.mark.parametrize(("sample", "rcpt", "reason", "counter"), CLASSES)
async def test_dsn_of_each_class(
    brelay: Relay,
    sink: Sink,
    redis_url: str,
    sample: str,
    rcpt: str,
    reason: str | None,
    counter: str | None,
) -> None:
    copy = await newsletter(brelay, sink, rcpt)
    code, text = await deliver(brelay, copy.mail_from, bounce(sample, copy.mail_from))
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: processed")
    assert brelay.store is not None
    entries = [e for e in await brelay.store.entries(rcpt) if e.live(brelay.store.now())]
    assert [(e.scope, e.reason) for e in entries] == ([(GLOBAL, reason)] if reason else [])
    day = await counts(brelay, redis_url)
    expected = {"sent": 1} | ({counter: 1} if counter else {})
    assert day["newsletter"] == expected
    if reason == "hard-bounce":
        # suppressed for marketing and for transactional mail alike
        before = len(sink.handler.messages)
        for sender in ("news@example.com", "receipts@example.com"):
            code, text = await smtp_send(
                brelay.smtp_port, "app@example.com", [rcpt], message(sender=sender)
            )
            assert "all 1 recipient(s) suppressed" in text
        assert len(sink.handler.messages) == before
        assert entries[0].expires - entries[0].created == 180 * DAY


async def test_policy_block_never_suppresses_even_when_repeated(
    brelay: Relay, sink: Sink, redis_url: str
) -> None:
    for n in range(6):
        copy = await newsletter(brelay, sink, "frank@outlook.com")
        data = bounce("postfix-outlook-5.7.1-blocklist.eml", copy.mail_from, message_id=f"p{n}@x")
        assert (await deliver(brelay, copy.mail_from, data))[0] == 250
    assert brelay.store is not None
    assert await brelay.store.entries("frank@outlook.com") == []
    assert (await counts(brelay, redis_url))["newsletter"]["policy-bounce"] == 6
    assert metric(brelay, 'oneclick_bounces_total{kind="policy",source="dsn"} 6.0')


# ---------------------------------------------------------------------------
# soft bounces: threshold, graduated expiry, a success resets the run


async def soft_bounce(relay: Relay, sink: Sink, n: int, sender: str = "news@example.com") -> Any:
    copy = await newsletter(relay, sink, ALICE, sender=sender)
    data = bounce("postfix-4.4.1-expired.eml", copy.mail_from, message_id=f"soft{n}@mx")
    code, text = await deliver(relay, copy.mail_from, data)
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: processed"), text
    return copy


async def test_five_soft_bounces_suppress_with_graduated_expiry(
    brelay: Relay, sink: Sink, redis_url: str
) -> None:
    assert brelay.store is not None
    for n in range(4):
        await soft_bounce(brelay, sink, n)
        assert await brelay.store.entries(ALICE) == []
    await soft_bounce(brelay, sink, 4)
    [entry] = await brelay.store.entries(ALICE)
    assert (entry.reason, entry.scope) == ("soft-bounce", GLOBAL)
    assert entry.expires - entry.created == 7 * DAY
    # marketing stops; transactional mail still flows, and its bounces count on
    _code, text = await smtp_send(brelay.smtp_port, "app@example.com", [ALICE], message())
    assert "suppressed" in text
    for n in range(5, 10):
        await soft_bounce(brelay, sink, n, sender="receipts@example.com")
    [entry] = await brelay.store.entries(ALICE)
    assert entry.expires - entry.created == 14 * DAY  # the second time: 14 days
    day = await counts(brelay, redis_url)
    assert day["newsletter"]["soft-bounce"] == 5
    assert day["-"]["soft-bounce"] == 5


async def test_a_success_resets_the_consecutive_count(
    brelay: Relay, sink: Sink, redis_url: str
) -> None:
    assert brelay.store is not None
    for n in range(4):
        await soft_bounce(brelay, sink, n)
    assert (await fields(redis_url, ALICE))["#bounce-soft"] == "4"
    await newsletter(brelay, sink, ALICE)  # accepted, and no bounce ever comes for it
    assert "#bounce-ok" in await fields(redis_url, ALICE)
    await soft_bounce(brelay, sink, 4)
    state = await fields(redis_url, ALICE)
    assert state["#bounce-soft"] == "1"
    assert await brelay.store.entries(ALICE) == []


async def test_bounces_of_copies_sent_before_a_success_still_count(
    brelay: Relay, sink: Sink, redis_url: str
) -> None:
    """The usual store-and-forward order: each copy is accepted, then it bounces."""
    assert brelay.store is not None
    copies = []
    for n in range(5):
        if n:
            copies.append(await newsletter(brelay, sink, ALICE))
        else:
            await soft_bounce(brelay, sink, 0)
    for n, copy in enumerate(copies, start=1):
        data = bounce("postfix-4.4.1-expired.eml", copy.mail_from, message_id=f"late{n}@mx")
        assert (await deliver(brelay, copy.mail_from, data))[0] == 250
    [entry] = await brelay.store.entries(ALICE)
    assert entry.reason == "soft-bounce"


# ---------------------------------------------------------------------------
# complaints


async def test_arf_complaint_suppresses_for_good(brelay: Relay, sink: Sink, redis_url: str) -> None:
    for n in range(3):
        await newsletter(brelay, sink, f"reader{n}@yahoo.com")
    copy = await newsletter(brelay, sink, "ivan@yahoo.com")
    data = bounce("yahoo-arf-complaint.eml", copy.mail_from, token_of(copy.data))
    code, text = await deliver(brelay, "fbl@example.com", data)
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: processed")
    assert brelay.store is not None
    [entry] = await brelay.store.entries("ivan@yahoo.com")
    assert (entry.reason, entry.scope, entry.expires, entry.source) == (
        "complaint",
        GLOBAL,
        0,
        "arf",
    )
    code, text = await smtp_send(
        brelay.smtp_port,
        "app@example.com",
        ["ivan@yahoo.com"],
        message(sender="receipts@example.com"),
    )
    assert "all 1 recipient(s) suppressed" in text
    day = await counts(brelay, redis_url)
    assert (day["newsletter"]["sent"], day["newsletter"]["complaint"]) == (4, 1)
    assert metric(brelay, 'oneclick_complaints_total{group="newsletter"} 1.0')


async def test_complaint_attributed_by_the_unsubscribe_token_alone(
    brelay: Relay, sink: Sink
) -> None:
    copy = await newsletter(brelay, sink, "ivan@yahoo.com")
    # no return path of ours anywhere: only the original's List-Unsubscribe token names him
    data = bounce("yahoo-arf-complaint.eml", "someone@elsewhere.example", token_of(copy.data))
    code, text = await deliver(brelay, "fbl@example.com", data)
    assert code == 250 and "processed" in text
    assert brelay.store is not None
    assert [e.reason for e in await brelay.store.entries("ivan@yahoo.com")] == ["complaint"]


@pytest.mark.parametrize("accept_unsigned", [False, True])
async def test_rfc5965_report_with_only_original_rcpt_to(
    make_relay: Any, bounce_config: dict[str, Any], accept_unsigned: bool
) -> None:
    bounce_config["bounces"]["accept_unsigned"] = accept_unsigned
    relay = await make_relay(bounce_config)
    data = (SAMPLES / "rfc5965-arf-abuse.eml").read_bytes()
    code, text = await deliver(relay, "fbl@example.com", data)
    assert code == 250
    entries = await relay.store.entries("user@example.com")
    if accept_unsigned:
        assert "processed" in text
        assert [e.reason for e in entries] == ["complaint"]
    else:
        assert "unattributed" in text
        assert entries == []


async def test_complaint_without_original_rcpt_to_by_the_returned_original(
    make_relay: Any, bounce_config: dict[str, Any], sink: Sink
) -> None:
    relay = await make_relay(bounce_config)
    copy = await newsletter(relay, sink, "quinn@yahoo.com")
    # our VERP return path in the returned original's Return-Path names him
    data = bounce("arf-no-rcpt-to-complaint.eml", copy.mail_from)
    code, text = await deliver(relay, "fbl@example.com", data)
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: processed")
    assert [e.reason for e in await relay.store.entries("quinn@yahoo.com")] == ["complaint"]


@pytest.mark.parametrize("accept_unsigned", [False, True])
async def test_complaint_without_original_rcpt_to_by_the_originals_to(
    make_relay: Any, bounce_config: dict[str, Any], accept_unsigned: bool
) -> None:
    """No VERP code, no token: only the returned original's To, if unsigned is trusted."""
    bounce_config["bounces"]["accept_unsigned"] = accept_unsigned
    relay = await make_relay(bounce_config)
    data = (SAMPLES / "arf-no-rcpt-to-complaint.eml").read_bytes()
    data = data.replace(b"Return-Path: <bounces@bounce.example.com>\r\n", b"")
    code, text = await deliver(relay, "fbl@example.com", data)
    assert code == 250
    entries = await relay.store.entries("quinn@yahoo.com")
    if accept_unsigned:
        assert "processed" in text
        assert [e.reason for e in entries] == ["complaint"]
    else:
        assert "unattributed" in text
        assert entries == []


@pytest.mark.parametrize(
    "sample",
    ["provider-message-id-not-a-recipient.eml", "own-address-not-a-recipient.eml"],
)
async def test_never_the_message_id_the_sender_or_our_own_address(
    make_relay: Any, bounce_config: dict[str, Any], sample: str
) -> None:
    bounce_config["bounces"]["accept_unsigned"] = True
    relay = await make_relay(bounce_config)
    data = (SAMPLES / sample).read_bytes()
    code, _ = await deliver(relay, "fbl@example.com", data)
    assert code == 250
    for address in ("news@example.com", "bounces@bounce.example.com", "fbl@example.com"):
        assert await relay.store.entries(address) == []
    assert not [a for a in await relay.store.entries("c0rpus099.news@example.com")]


# ---------------------------------------------------------------------------
# what is ignored: auto-replies, forged return paths, the same DSN twice


@pytest.mark.parametrize(
    "sample", ["gmail-vacation-reply.eml", "outlook-automatic-reply.eml", "japanese-auto-reply.eml"]
)
async def test_out_of_office_is_ignored(brelay: Relay, sink: Sink, sample: str) -> None:
    copy = await newsletter(brelay, sink, ALICE)
    code, text = await deliver(brelay, copy.mail_from, bounce(sample, copy.mail_from))
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: ignored")
    assert brelay.store is not None
    assert await brelay.store.entries(ALICE) == []
    assert metric(
        brelay, 'oneclick_inbound_messages_total{kind="auto-reply",outcome="ignored"} 1.0'
    )


async def test_forged_return_path_is_ignored_and_counted(
    brelay: Relay, sink: Sink, redis_url: str
) -> None:
    copy = await newsletter(brelay, sink, ALICE)
    local, _, domain = copy.mail_from.partition("@")
    code_start = len("bounces+")
    i = code_start + 3
    forged = local[:i] + ("a" if local[i] != "a" else "b") + local[i + 1 :] + "@" + domain
    victim = copy.mail_from.replace("alice=example.net", "victim=example.net")
    for n, address in enumerate((forged, victim)):
        data = bounce("postfix-5.1.1-user-unknown.eml", address, message_id=f"forged{n}@x")
        code, text = await deliver(brelay, address, data)
        assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: forged")
    assert brelay.store is not None
    assert await brelay.store.entries(ALICE) == []
    assert await brelay.store.entries("victim@example.net") == []
    assert metric(brelay, 'oneclick_inbound_messages_total{kind="dsn",outcome="forged"} 2.0')
    assert "hard-bounce" not in (await counts(brelay, redis_url))["newsletter"]


async def test_unsigned_dsn_to_the_plain_address_is_not_trusted(brelay: Relay, sink: Sink) -> None:
    await newsletter(brelay, sink, ALICE)
    data = bounce("postfix-5.1.1-user-unknown.eml", PLAIN_RETURN_PATH)
    code, text = await deliver(brelay, PLAIN_RETURN_PATH, data)
    assert code == 250 and "unattributed" in text
    assert brelay.store is not None
    assert await brelay.store.entries(ALICE) == []


async def test_the_same_dsn_twice_is_counted_once(
    brelay: Relay, sink: Sink, redis_url: str
) -> None:
    copy = await newsletter(brelay, sink, ALICE)
    data = bounce("postfix-4.4.1-expired.eml", copy.mail_from)
    first = await deliver(brelay, copy.mail_from, data)
    second = await deliver(brelay, copy.mail_from, data)
    assert first[1].split(" id=")[0] == "2.0.0 Ok: processed"
    assert second[1].split(" id=")[0] == "2.0.0 Ok: duplicate"
    assert first[1].split(" id=")[1] == second[1].split(" id=")[1]
    assert (await fields(redis_url, ALICE))["#bounce-soft"] == "1"
    assert (await counts(brelay, redis_url))["newsletter"]["soft-bounce"] == 1


async def test_original_is_kept_for_audit(brelay: Relay, sink: Sink, redis_url: str) -> None:
    copy = await newsletter(brelay, sink, ALICE)
    data = bounce("postfix-5.1.1-user-unknown.eml", copy.mail_from)
    _, text = await deliver(brelay, copy.mail_from, data)
    inbound_id = text.split(" id=")[1]
    client = aioredis.Redis.from_url(redis_url)
    try:
        kept = await client.hgetall(f"ocr:inbound:{{{inbound_id}}}")
        ttl = await client.ttl(f"ocr:inbound:{{{inbound_id}}}")
        index = await client.zrange("ocr:inbound", 0, -1)
    finally:
        await client.aclose()
    assert kept[b"data"].replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")
    assert kept[b"source"] == b"smtp"
    assert kept[b"outcome"].startswith(b"processed alice@example.net:hard:5.1.1")
    assert 3 * DAY - 60 < ttl <= 3 * DAY
    assert index == [inbound_id.encode()]


# ---------------------------------------------------------------------------
# mailto unsubscribe


async def test_mailto_unsubscribe_works_like_the_post(
    brelay: Relay, sink: Sink, redis_url: str
) -> None:
    copy = await newsletter(brelay, sink, ALICE)
    token = token_of(copy.data)
    request = (
        f"From: Alice <{ALICE}>\r\nTo: unsubscribe@unsub-mail.example.com\r\n"
        f"Subject: unsubscribe {token}\r\nMessage-ID: <req1@example.net>\r\n\r\n\r\n"
    ).encode()
    code, text = await smtp_send(
        brelay.inbound_port, ALICE, ["unsubscribe@unsub-mail.example.com"], request
    )
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: processed")
    assert brelay.store is not None
    [entry] = await brelay.store.entries(ALICE)
    assert (entry.scope, entry.reason, entry.source) == ("g:newsletter", "unsubscribe", "mailto")
    code, text = await smtp_send(brelay.smtp_port, "app@example.com", [ALICE], message())
    assert "suppressed" in text
    client = aioredis.Redis.from_url(redis_url)
    try:
        [(_, event)] = await client.xrange("ocr:events")
    finally:
        await client.aclose()
    assert (event[b"type"], event[b"reason"], event[b"source"]) == (
        b"add",
        b"unsubscribe",
        b"mailto",
    )
    assert metric(brelay, 'oneclick_unsubscribes_total{channel="mailto",group="newsletter"} 1.0')
    assert (await counts(brelay, redis_url))["newsletter"]["unsubscribe"] == 1


async def test_mailto_token_in_the_local_part_and_bad_tokens(brelay: Relay, sink: Sink) -> None:
    copy = await newsletter(brelay, sink, ALICE)
    token = token_of(copy.data)
    rcpt = f"unsubscribe+{token}@unsub-mail.example.com"
    request = f"From: {ALICE}\r\nSubject: please\r\nMessage-ID: <req2@x>\r\n\r\n".encode()
    code, text = await smtp_send(brelay.inbound_port, ALICE, [rcpt], request)
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: processed")
    bad = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    request = f"From: x@y.example\r\nSubject: unsubscribe {bad}\r\nMessage-ID: <r3@x>\r\n\r\n"
    code, text = await smtp_send(
        brelay.inbound_port, "x@y.example", ["unsubscribe@unsub-mail.example.com"], request.encode()
    )
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: invalid-token")


# ---------------------------------------------------------------------------
# the listener is not a relay; LMTP


@pytest.mark.parametrize(
    "rcpt", ["someone@example.org", "news@example.com", "bounces@other.example", "fbl@example.co"]
)
async def test_listener_takes_only_its_own_addresses(brelay: Relay, rcpt: str) -> None:
    code, text = await smtp_send(brelay.inbound_port, "x@example.org", [rcpt], message())
    assert code == 550
    assert text.startswith("5.7.1")


async def test_lmtp_gives_one_reply_per_recipient(
    make_relay: Any, bounce_config: dict[str, Any], sink: Sink
) -> None:
    bounce_config["bounces"]["protocol"] = "lmtp"
    relay = await make_relay(bounce_config)
    copy = await newsletter(relay, sink, ALICE)
    data = bounce("postfix-5.1.1-user-unknown.eml", copy.mail_from)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.inbound_port)
    try:

        async def command(line: str, replies: int = 1) -> list[str]:
            if line:
                writer.write(line.encode() + b"\r\n")
            got = []
            while len(got) < replies:
                text = (await asyncio.wait_for(reader.readline(), 5)).decode().rstrip()
                if text[3:4] == " ":
                    got.append(text)
            return got

        assert (await command(""))[0].startswith("220")
        assert (await command("EHLO x"))[0].startswith("500")
        assert (await command("LHLO x"))[0].startswith("250")
        assert (await command("MAIL FROM:<>"))[0].startswith("250")
        assert (await command(f"RCPT TO:<{copy.mail_from}>"))[0].startswith("250")
        assert (await command("RCPT TO:<fbl@example.com>"))[0].startswith("250")
        assert (await command("DATA"))[0].startswith("354")
        writer.write(data.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") + b"\r\n")
        replies = await command(".", replies=2)
        assert [r[:19] for r in replies] == ["250 2.0.0 Ok: proce"] * 2
        await command("QUIT")
    finally:
        writer.close()
    assert relay.store is not None
    assert [e.reason for e in await relay.store.entries(ALICE)] == ["hard-bounce"]


# ---------------------------------------------------------------------------
# the upstream's own refusals while relaying


async def test_upstream_rcpt_refusals_go_through_the_classifier(
    brelay: Relay, sink: Sink, redis_url: str
) -> None:
    sink.handler.rcpt_replies["gone@example.org"] = "550 5.1.1 no such user"
    sink.handler.rcpt_replies["blocked@example.org"] = "550 5.7.1 blocked by policy"
    sink.handler.rcpt_replies["full@example.org"] = "452 4.2.2 mailbox full"
    rcpts = ["gone@example.org", "blocked@example.org", "full@example.org", ALICE]
    code, text = await smtp_send(brelay.smtp_port, "app@example.com", rcpts, message())
    assert code == 250 and "refused 2" in text and "queued 1" in text
    assert brelay.store is not None
    assert [e.reason for e in await brelay.store.entries("gone@example.org")] == ["hard-bounce"]
    assert await brelay.store.entries("blocked@example.org") == []
    assert await brelay.store.entries("full@example.org") == []
    day = await counts(brelay, redis_url)
    assert day["newsletter"] == {"sent": 1, "hard-bounce": 1, "policy-bounce": 1}
    assert metric(brelay, 'oneclick_upstream_deferrals_total{kind="soft"} 1.0')
    assert metric(brelay, 'oneclick_bounces_total{kind="hard",source="relay"} 1.0')


# ---------------------------------------------------------------------------
# ingest, inbound list/show and the report, as an operator runs them


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "ONECLICK_RELAY_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


async def test_ingest_report_and_audit_from_the_command_line(
    brelay: Relay, sink: Sink, bounce_config: dict[str, Any], tmp_path: Path
) -> None:
    cfg = str(write_yaml(tmp_path / "relay.yaml", bounce_config))
    for n in range(2):
        await newsletter(brelay, sink, f"reader{n}@example.org")
    hard = await newsletter(brelay, sink, ALICE)
    angry = await newsletter(brelay, sink, "ivan@yahoo.com")
    await newsletter(brelay, sink, "bob@example.org", sender="receipts@example.com")
    await brelay.counters.flush()

    dsn = bounce("postfix-5.1.1-user-unknown.eml", hard.mail_from)
    first = cli("ingest", "-c", cfg, "--recipient", hard.mail_from, stdin=dsn)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(b"processed id=")
    again = cli("ingest", "-c", cfg, stdin=dsn)  # no envelope: the To header is ours
    assert (again.returncode, again.stdout.split()[0]) == (0, b"duplicate")
    arf = bounce("yahoo-arf-complaint.eml", angry.mail_from, token_of(angry.data))
    assert cli("ingest", "-c", cfg, stdin=arf).stdout.startswith(b"processed")
    assert brelay.store is not None
    assert [e.reason for e in await brelay.store.entries(ALICE)] == ["hard-bounce"]

    report = cli("report", "-c", cfg, "--days", "1", "--json")
    assert report.returncode == 0, report.stderr
    [row] = [r for r in json.loads(report.stdout) if r["group"] == "newsletter"]
    assert (row["sent"], row["hard-bounce"], row["complaint"]) == (4, 1, 1)
    assert row["complaint_rate"] == 0.25
    table = cli("report", "-c", cfg, "--days", "1").stdout.decode().splitlines()
    [news] = [line for line in table if " newsletter " in line]
    assert "25.000% over the 0.3% limit" in news
    [total] = [line for line in table if " (all) " in line]
    assert total.split()[2:4] == ["5", "1"]  # sent, hard
    assert "20.000% over the 0.3% limit" in total

    listing = cli("inbound", "-c", cfg, "list").stdout.decode().splitlines()
    assert len(listing) == 2
    inbound_id = first.stdout.split()[1].decode().removeprefix("id=")
    assert any(
        line.startswith(inbound_id) and "\tingest\tdsn\tprocessed" in line for line in listing
    )
    raw = cli("inbound", "-c", cfg, "show", inbound_id, "--raw")
    assert raw.stdout == dsn
    shown = cli("inbound", "-c", cfg, "show", inbound_id).stdout
    assert shown.endswith(dsn)
    reading = shown[: -len(dsn)].decode()
    assert "# kind: dsn (read by rfc3464)" in reading
    assert (
        f"# recipient {ALICE}: reason=user-unknown kind=hard status=5.1.1 decision=suppressed"
        in reading
    )
    assert '#   evidence: phrase "user unknown" (dsn)' in reading


async def test_ingest_with_redis_down_asks_the_mta_to_retry(
    bounce_config: dict[str, Any], tmp_path: Path
) -> None:
    from relay.store.embedded import free_port

    bounce_config["redis"]["url"] = f"redis://127.0.0.1:{free_port()}/0"
    cfg = str(write_yaml(tmp_path / "relay.yaml", bounce_config))
    data = (SAMPLES / "postfix-5.1.1-user-unknown.eml").read_bytes()
    result = cli("ingest", "-c", cfg, stdin=data)
    assert result.returncode == 75, result.stderr
    assert b"try again later" in result.stderr


async def test_admin_report_shows_rates(
    make_relay: Any, bounce_config: dict[str, Any], sink: Sink, tmp_path: Path
) -> None:
    import aiohttp

    secret = tmp_path / "admin.token"
    secret.write_text("a-long-enough-admin-token\n")
    bounce_config["http"]["admin_token_file"] = str(secret)
    relay = await make_relay(bounce_config)
    copy = await newsletter(relay, sink, ALICE)
    await deliver(relay, copy.mail_from, bounce("postfix-5.1.1-user-unknown.eml", copy.mail_from))
    await relay.counters.flush()
    headers = {"Authorization": "Bearer a-long-enough-admin-token"}
    url = f"http://127.0.0.1:{relay.http_port}/admin/report?days=1&group=newsletter"
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        body = await resp.json()
    assert body["thresholds"] == {"goal": 0.001, "limit": 0.003}
    [row] = body["days"]
    assert (row["sent"], row["hard-bounce"], row["complaint_rate"]) == (1, 1, 0.0)


async def test_retry_queue_final_refusal_is_counted(
    brelay: Relay, sink: Sink, redis_url: str
) -> None:
    sink.handler.rcpt_replies["later@example.org"] = "451 4.2.0 try later"
    code, text = await smtp_send(
        brelay.smtp_port, "app@example.com", [ALICE, "later@example.org"], message()
    )
    assert code == 250 and "queued 1" in text
    sink.handler.rcpt_replies["later@example.org"] = "550 5.1.1 gone meanwhile"
    assert brelay.store is not None
    counted = 'oneclick_bounces_total{kind="hard",source="retry"} 1.0'
    for _ in range(50):  # the entry is written before the metric: wait for both
        if await brelay.store.entries("later@example.org") and metric(brelay, counted):
            break
        await asyncio.sleep(0.1)
    [entry] = await brelay.store.entries("later@example.org")
    assert (entry.reason, entry.source) == ("hard-bounce", "bounce")
    assert metric(brelay, counted)
    assert (await counts(brelay, redis_url))["newsletter"]["hard-bounce"] == 1


async def test_redis_down_the_listener_answers_451(
    make_relay: Any, bounce_config: dict[str, Any]
) -> None:
    from relay.store.embedded import free_port

    bounce_config["redis"]["url"] = f"redis://127.0.0.1:{free_port()}/0"
    relay = await make_relay(bounce_config)
    data = (SAMPLES / "postfix-5.1.1-user-unknown.eml").read_bytes()
    code, text = await deliver(relay, "fbl@example.com", data)
    assert (code, text[:5]) == (451, "4.3.0")


async def test_reload_applies_new_thresholds_to_the_listener(
    brelay: Relay, sink: Sink, bounce_config: dict[str, Any]
) -> None:
    from helpers import build_config

    bounce_config["bounces"]["thresholds"] = {"hard": 2}
    await brelay.reload(build_config(bounce_config))
    copy = await newsletter(brelay, sink, ALICE)
    data = bounce("postfix-5.1.1-user-unknown.eml", copy.mail_from)
    code, text = await deliver(brelay, copy.mail_from, data)
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: processed")
    assert brelay.store is not None
    assert await brelay.store.entries(ALICE) == []  # one hard bounce of two


async def test_workers_share_the_inbound_port(
    bounce_config: dict[str, Any], sink: Sink, tmp_path: Path
) -> None:
    """``serve`` with two worker processes: port 0 becomes one port both listen on."""
    import signal

    from relay.store.embedded import free_port

    smtp = free_port()
    bounce_config["smtp"].update(listen=f"127.0.0.1:{smtp}", workers=2)
    bounce_config["http"]["listen"] = f"127.0.0.1:{free_port()}"
    path = write_yaml(tmp_path / "relay.yaml", bounce_config)
    log = tmp_path / "relay.log"
    with log.open("w") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a long-running child, stopped below
            [sys.executable, "-m", "relay", "serve", "-c", str(path)], stdout=out, stderr=out
        )
    try:
        started: list[str] = []
        for _ in range(150):
            started = [line for line in log.read_text().splitlines() if "relay started" in line]
            if len(started) == 2 or proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        ports = {m.group(1) for line in started if (m := re.search(r"inbound=smtp:(\d+)", line))}
        assert len(started) == 2 and len(ports) == 1, log.read_text()
        inbound = int(ports.pop())
        code, _ = await smtp_send(smtp, "app@example.com", [ALICE], message())
        assert code == 250
        copy = sink.handler.messages[-1]
        data = bounce("postfix-5.1.1-user-unknown.eml", copy.mail_from)
        code, text = await smtp_send(inbound, "", [copy.mail_from], data)
        assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: processed")
        code, text = await smtp_send(smtp, "app@example.com", [ALICE], message())
        assert "all 1 recipient(s) suppressed" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


@pytest.mark.parametrize("feedback_type", ["auth-failure", "not-spam", "virus"])
async def test_feedback_reports_that_are_not_complaints_are_ignored(
    brelay: Relay, sink: Sink, feedback_type: str
) -> None:
    copy = await newsletter(brelay, sink, "ivan@yahoo.com")
    data = bounce("yahoo-arf-complaint.eml", copy.mail_from, token_of(copy.data))
    data = data.replace(b"Feedback-Type: abuse", f"Feedback-Type: {feedback_type}".encode())
    code, text = await deliver(brelay, "fbl@example.com", data)
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: ignored")
    assert brelay.store is not None
    assert await brelay.store.entries("ivan@yahoo.com") == []
