"""relay.bounces: every sample in tests/data/bounces/ is read and classified as expected."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DATA

from relay.feedback.bounces import Classifier, enhanced_code, parse, status_of, token_in_subject

SAMPLES = DATA / "bounces"

# file → (report kind, [(recipient, verdict, status)])
EXPECTED: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "postfix-5.1.1-user-unknown.eml": ("dsn", [("alice@example.net", "hard", "5.1.1")]),
    "postfix-4.4.1-expired.eml": ("dsn", [("alice@example.net", "soft", "4.4.1")]),
    "postfix-delayed-warning.eml": ("dsn", [("alice@example.net", "delayed", "4.2.2")]),
    "postfix-gmail-5.7.26-unauthenticated.eml": ("dsn", [("erin@gmail.com", "policy", "5.7.26")]),
    "postfix-outlook-5.7.1-blocklist.eml": ("dsn", [("frank@outlook.com", "policy", "5.7.1")]),
    "postfix-yahoo-5.7.9-policy.eml": ("dsn", [("grace@yahoo.com", "policy", "5.7.9")]),
    "gmail-5.1.1-no-such-user.eml": ("dsn", [("nosuchuser1234@gmail.com", "hard", "5.1.1")]),
    "gmail-5.2.2-inbox-full.eml": ("dsn", [("fulluser@gmail.com", "soft", "5.2.2")]),
    "outlook-5.1.10-recipient-not-found.eml": ("dsn", [("bob@contoso.com", "hard", "5.1.10")]),
    "yahoo-failure-notice.eml": ("bounce", [("carol@yahoo.com", "unknown", "5.0.0")]),
    "exim-5.1.1-unknown-user.eml": ("bounce", [("dave@example.org", "hard", "5.1.1")]),
    "exim-5.2.2-mailbox-full.eml": ("bounce", [("heidi@example.org", "soft", "5.2.2")]),
    "rfc3464-simple-failed-4.0.0.eml": (
        "dsn",
        [("louisl@larry.slip.umd.edu", "soft", "4.0.0")],
    ),
    "rfc3464-multi-recipient.eml": (
        "dsn",
        [
            ("arathib@vnet.ibm.com", "unknown", "5.0.0"),
            ("johnh@hpnjld.njd.hp.com", "delayed", "4.0.0"),
            ("wsnell@sdcc13.ucsd.edu", "unknown", "5.0.0"),
        ],
    ),
    "rfc5965-arf-abuse.eml": ("complaint", []),
    "yahoo-arf-complaint.eml": ("complaint", []),
    "gmail-vacation-reply.eml": ("auto-reply", []),
    "outlook-automatic-reply.eml": ("auto-reply", []),
    "japanese-auto-reply.eml": ("auto-reply", []),
}


def test_every_sample_has_an_expectation() -> None:
    assert sorted(p.name for p in SAMPLES.glob("*.eml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_is_read_and_classified(name: str) -> None:
    kind, recipients = EXPECTED[name]
    report = parse((SAMPLES / name).read_bytes())
    assert report.kind == kind
    verdict = Classifier().verdict
    got = [(r.recipient, verdict(r.action, r.status), r.status) for r in report.recipients]
    assert got == recipients


def test_dsn_fields_per_recipient() -> None:
    report = parse((SAMPLES / "postfix-5.1.1-user-unknown.eml").read_bytes())
    [r] = report.recipients
    assert (r.action, r.original) == ("failed", "alice@example.net")
    assert r.remote_mta == "mx1.example.net"
    assert r.diagnostic.startswith("550 5.1.1 <alice@example.net>: Recipient address rejected")
    assert report.message_id == "<20250512103122.4Xk2Lm0RzKz9sTm@mx.example.com>"
    assert "bounces@bounce.example.com" in report.addressed_to


def test_arf_fields() -> None:
    report = parse((SAMPLES / "rfc5965-arf-abuse.eml").read_bytes())
    assert report.complaint is not None
    assert report.complaint.feedback_type == "abuse"
    assert report.complaint.original_rcpt_to == ("user@example.com",)
    assert report.complaint.source_ip == "192.0.2.1"
    yahoo = parse((SAMPLES / "yahoo-arf-complaint.eml").read_bytes())
    assert "List-Unsubscribe: <https://unsub.example.com/u/@@TOKEN@@>" in yahoo.text


def test_status_refined_from_the_diagnostic_code() -> None:
    assert status_of("5.0.0", "smtp; 550 5.1.1 no such user", "failed") == "5.1.1"
    assert status_of("5.0.0", "smtp; 450 4.2.2 full", "failed") == "5.0.0"
    assert status_of("", "smtp; 550-5.7.26 unauthenticated", "failed") == "5.7.26"
    assert status_of("", "", "delayed") == "4.0.0"
    assert enhanced_code("version 1.2.3.4 and 5.1.10 x") == "5.1.10"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("5.1.1", "hard"),
        ("5.1.10", "hard"),
        ("5.1.2", "hard"),
        ("5.2.1", "hard"),
        ("5.1.6", "hard"),
        ("5.1.7", "policy"),
        ("5.2.2", "soft"),
        ("5.3.4", "soft"),
        ("5.4.7", "soft"),
        ("4.4.1", "soft"),
        ("4.2.2", "soft"),
        ("4.7.28", "policy"),
        ("5.7.1", "policy"),
        ("5.7.26", "policy"),
        ("5.0.0", "unknown"),
        ("5.5.0", "unknown"),
        ("5.6.0", "unknown"),
    ],
)
def test_default_table(status: str, kind: str) -> None:
    assert Classifier().kind(status) == kind


def test_overrides_take_the_longest_prefix() -> None:
    classifier = Classifier([("5.4.1", "hard"), ("4.7", "soft"), ("5.7.1", "hard")])
    assert classifier.kind("5.4.1") == "hard"
    assert classifier.kind("5.4.4") == "soft"
    assert classifier.kind("4.7.0") == "soft"
    assert classifier.kind("5.7.1") == "hard"
    assert classifier.kind("5.7.26") == "policy"


def test_unsubscribe_token_in_subject() -> None:
    token = "k1." + "A" * 40
    assert token_in_subject(f"unsubscribe {token}") == token
    assert token_in_subject(f"Re: Unsubscribe  {token}") == token
    assert token_in_subject("unsubscribe me please") is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage without headers",
        b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nno boundary",
        b"Content-Type: multipart/report; report-type=feedback-report; boundary=x\r\n\r\n--x--",
        b"From: MAILER-DAEMON@x\r\nSubject: \xff\xfe\r\n\r\n\xff",
    ],
)
def test_malformed_input_never_raises(data: bytes) -> None:
    assert parse(data).kind in ("unrecognised", "bounce")


def test_auto_reply_from_a_mailer_daemon_is_not_ignored(tmp_path: Path) -> None:
    data = (SAMPLES / "exim-5.1.1-unknown-user.eml").read_bytes()
    assert b"Auto-Submitted: auto-replied" in data
    assert parse(data).kind == "bounce"
