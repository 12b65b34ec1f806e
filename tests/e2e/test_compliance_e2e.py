"""CFBL (RFC 9477) and Feedback-ID end to end.

Real SMTP into the relay → the copies the capture upstream got, checked by the
independent Mail::DKIM verifier (and broken by an added duplicate) → an ARF report
built from a copy, redacted, over real SMTP to the CFBL address at the real inbound
listener → the real Redis suppression store. Plus ``check-config``'s alignment warning.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import Keys, Sink
from helpers import message, perl_dkim_results, smtp_send, write_yaml
from test_config import base_config, run_cli

from relay.runtime.app import Relay
from relay.suppression.store import GLOBAL

ALICE = "alice@example.net"
FBL = "fbl@example.com"
APP_HEADERS = (
    "CFBL-Address: app-fbl@elsewhere.example; report=arf\r\n"
    "CFBL-Feedback-ID: app-chosen\r\nFeedback-ID: app:chosen:id\r\n"
)


@pytest.fixture
async def crelay(make_relay: Any, config_dict: dict[str, Any]) -> Relay:
    config_dict["compliance"] = {"cfbl_address": FBL, "feedback_id": "{group}:{class}:exco"}
    config_dict["policy"]["groups"]["promotions"] = {"feedback_id": "promo:{domain}:exco"}
    config_dict["bounces"] = {"listen": "127.0.0.1:0"}
    relay: Relay = await make_relay(config_dict)
    return relay


def fields(data: bytes, name: str) -> list[str]:
    head = data.partition(b"\r\n\r\n")[0].decode()
    lines = re.split(r"\r\n(?![ \t])", head)
    prefix = name.lower() + ":"
    return [" ".join(x[len(prefix) :].split()) for x in lines if x.lower().startswith(prefix)]


async def relay_one(relay: Relay, sink: Sink, sender: str, extra: str = APP_HEADERS) -> bytes:
    before = len(sink.handler.messages)
    code, text = await smtp_send(
        relay.smtp_port, "app@example.com", [ALICE], message(sender=sender, extra=extra)
    )
    assert code == 250, text
    [copy] = sink.handler.messages[before:]
    return copy.data


async def test_present_once_signed_oversigned_and_a_duplicate_breaks_it(
    crelay: Relay, sink: Sink, keys: Keys, tmp_path: Path
) -> None:
    data = await relay_one(crelay, sink, "news@example.com")
    token = re.search(rb"/u/([\w.-]+)>", data)
    assert token is not None
    assert fields(data, "CFBL-Address") == [f"{FBL}; report=arf"]
    assert fields(data, "CFBL-Feedback-ID") == [token.group(1).decode()]
    assert fields(data, "Feedback-ID") == ["newsletter:marketing:exco"]
    dns = keys.write_dns_file(tmp_path / "dns.txt")
    [(result, h)] = perl_dkim_results(data, dns)
    assert result == "pass"
    for name in ("cfbl-address", "cfbl-feedback-id", "feedback-id"):
        assert h.count(name) == 2, (name, h)  # signed, and once more: oversigned
    for added in (
        b"Feedback-ID: spam:marketing:exco\r\n",
        b"CFBL-Address: attacker@evil.example; report=arf\r\n",
        b"CFBL-Feedback-ID: k1.forgedforgedforgedforged\r\n",
    ):
        [(result, _)] = perl_dkim_results(added + data, dns)
        assert result == "fail", added
    # the group's own template, the From domain in it
    promo = await relay_one(crelay, sink, "deals@promo.example.com")
    assert fields(promo, "Feedback-ID") == ["promo:promo.example.com:exco"]
    # transactional mail: the application's fields are its own, nothing is added
    receipt = await relay_one(crelay, sink, "receipts@example.com")
    assert fields(receipt, "Feedback-ID") == ["app:chosen:id"]
    assert fields(receipt, "CFBL-Address") == ["app-fbl@elsewhere.example; report=arf"]


def arf_report(original: bytes) -> bytes:
    """A provider's RFC 5965 report on ``original``, with the recipient redacted (RFC 6590)
    and its List-Unsubscribe dropped: only the CFBL-Feedback-ID still names the person."""
    head, _, body = original.partition(b"\r\n\r\n")
    kept = [
        line
        for line in re.split(rb"\r\n(?![ \t])", head)
        if not line.lower().startswith((b"list-unsubscribe", b"to:", b"dkim-signature"))
    ]
    redacted = b"\r\n".join(kept) + b"\r\nTo: xxxxx@example.net\r\n\r\n" + body
    return (
        b"From: <staff@mailbox.example>\r\nTo: <" + FBL.encode() + b">\r\n"
        b"Subject: FW: complaint\r\nMessage-ID: <cfbl-report-1@mailbox.example>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/report;"
        b' report-type=feedback-report; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nA complaint about a message.\r\n"
        b"--b\r\nContent-Type: message/feedback-report\r\n\r\n"
        b"Feedback-Type: abuse\r\nUser-Agent: Mailbox/1.0\r\nVersion: 1\r\n"
        b"Original-Rcpt-To: <xxxxx@example.net>\r\n\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
        + redacted
        + b"\r\n--b--\r\n"
    )


async def test_arf_report_to_the_cfbl_address_is_attributed_through_it(
    crelay: Relay, sink: Sink
) -> None:
    data = await relay_one(crelay, sink, "news@example.com")
    report = arf_report(data)
    assert ALICE.encode() not in report and b"/u/" not in report
    code, text = await smtp_send(crelay.inbound_port, "", [FBL], report)
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: processed")
    assert crelay.store is not None
    [entry] = await crelay.store.entries(ALICE)
    assert (entry.reason, entry.scope, entry.source) == ("complaint", GLOBAL, "arf")
    # a forged CFBL-Feedback-ID attributes nobody
    forged = report.replace(b"cfbl-report-1", b"cfbl-report-2")
    forged = re.sub(rb"CFBL-Feedback-ID: k1\.[\w-]+", b"CFBL-Feedback-ID: k1." + b"A" * 80, forged)
    code, text = await smtp_send(crelay.inbound_port, "", [FBL], forged)
    assert (code, text.split(" id=")[0]) == (250, "2.0.0 Ok: unattributed")
    # the listener still takes nothing else
    code, _ = await smtp_send(crelay.inbound_port, "", ["postmaster@example.com"], report)
    assert code == 550


def test_check_config_warns_when_cfbl_is_not_aligned(keys: Keys, tmp_path: Path) -> None:
    raw = base_config(keys)
    raw["compliance"] = {"cfbl_address": "fbl@feedback.example.com"}
    result = run_cli("check-config", "-c", str(write_yaml(tmp_path / "a.yaml", raw)))
    assert result.returncode == 0, result.stderr
    assert "CFBL-Address: fbl@feedback.example.com; report=arf" in result.stdout
    assert "cfbl_address" not in result.stderr  # a subdomain of d=example.com is aligned
    raw["compliance"] = {"cfbl_address": "fbl@esp.example"}
    result = run_cli("check-config", "-c", str(write_yaml(tmp_path / "b.yaml", raw)))
    assert result.returncode == 0
    assert (
        "WARNING: compliance.cfbl_address domain esp.example is not aligned with DKIM"
        " d=example.com of marketing sender 'news@example.com'"
    ) in result.stderr
