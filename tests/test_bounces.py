"""relay.feedback.bounces: every sample in tests/data/bounces/ is read as its manifest says."""

from __future__ import annotations

import pytest
from helpers import DATA

from relay.config import BounceThresholds
from relay.feedback.bounces import (
    Classifier,
    enhanced_code,
    parse,
    readings,
    status_of,
    token_in_subject,
)

SAMPLES = DATA / "bounces"


def manifest() -> dict[str, tuple[str, dict[str, tuple[str, str]]]]:
    """file → (report kind, {recipient: (reason, decision)})."""
    out: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {}
    for line in (SAMPLES / "manifest.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kind, rcpt, reason, decision = line.split("\t")
        entry = out.setdefault(name, (kind, {}))
        if rcpt != "-":
            entry[1][rcpt] = (reason, decision)
    return out


EXPECTED = manifest()


def decision(verdict: str) -> str:
    """The decision under the default thresholds (the manifest's vocabulary)."""
    if verdict == "complaint":
        return "suppress"
    if verdict in ("hard", "soft", "policy", "unknown"):
        n = BounceThresholds().of(verdict)  # type: ignore[arg-type]
        return "suppress" if n == 1 else "never" if n == 0 else "count"
    return "delayed" if verdict == "delayed" else "ignore"


def own(address: str) -> bool:
    return address.endswith("@bounce.example.com")


def test_every_sample_has_an_expectation() -> None:
    assert sorted(p.name for p in SAMPLES.glob("*.eml")) == sorted(EXPECTED)


def test_every_reason_has_samples() -> None:
    reasons = {reason for _, rcpts in EXPECTED.values() for reason, _ in rcpts.values()}
    assert reasons >= {
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
        "complaint",
    }
    assert any(kind == "auto-reply" for kind, _ in EXPECTED.values())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_is_read_and_classified(name: str) -> None:
    kind, recipients = EXPECTED[name]
    report = parse((SAMPLES / name).read_bytes())
    assert report.kind == kind
    got = {
        r.recipient: (r.reason, decision(r.verdict)) for r in readings(report, Classifier(), own)
    }
    assert got == recipients


def test_dsn_fields_per_recipient() -> None:
    report = parse((SAMPLES / "postfix-5.1.1-user-unknown.eml").read_bytes())
    [r] = report.recipients
    assert (r.action, r.original, r.source) == ("failed", "alice@example.net", "dsn")
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
    assert yahoo.complaint is not None
    assert yahoo.complaint.original_to == ()  # "redacted@yahoo.com" names nobody


def test_complaint_without_original_rcpt_to_names_the_returned_originals_to() -> None:
    report = parse((SAMPLES / "arf-no-rcpt-to-complaint.eml").read_bytes())
    assert report.complaint is not None
    assert report.complaint.original_rcpt_to == ()
    assert report.complaint.original_to == ("quinn@yahoo.com",)


def test_never_a_message_id_or_the_original_sender() -> None:
    report = parse((SAMPLES / "provider-message-id-not-a-recipient.eml").read_bytes())
    assert [r.recipient for r in report.recipients] == ["pat@isp.example.net"]
    for sample in EXPECTED:
        report = parse((SAMPLES / sample).read_bytes())
        for r in report.recipients:
            assert r.recipient != "news@example.com"
            assert "c0rpus" not in r.recipient and "bounce-" not in r.recipient


def test_status_refined_from_the_diagnostic_code() -> None:
    assert status_of("5.0.0", "smtp; 550 5.1.1 no such user", "failed") == "5.1.1"
    assert status_of("5.0.0", "smtp; 450 4.2.2 full", "failed") == "5.0.0"
    assert status_of("", "smtp; 550-5.7.26 unauthenticated", "failed") == "5.7.26"
    assert status_of("", "", "delayed") == "4.0.0"
    assert enhanced_code("version 1.2.3.4 and 5.1.10 x") == "5.1.10"
    assert enhanced_code("no mailbox here by that name. (#5.1.1)") == "5.1.1"


@pytest.mark.parametrize(
    ("status", "diagnostic", "reason", "evidence"),
    [
        # the receiving server's code outranks the Status the reporting MTA derived
        ("5.1.1", "550 5.7.1 Service unavailable", "blocked", "Diagnostic-Code 5.7.1"),
        # a phrase about our mail outranks the code and a phrase about the address
        ("5.1.1", "550 5.1.1 Refused due to recipient preferences", "filtered", "phrase"),
        ("5.1.1", "550 5.1.1 user unknown; client host rejected", "blocked", "phrase"),
        ("5.2.1", "550 5.2.1 account disabled", "suspended", "phrase"),
        # a phrase about the address outranks the code
        (
            "5.0.0",
            "554 delivery error: dd This user doesn't have a yahoo.com account",
            "user-unknown",
            "phrase",
        ),
        ("4.1.1", "450 4.1.1 User unknown in local recipient table", "user-unknown", "phrase"),
        ("5.4.4", "Host or domain name not found", "host-unknown", "phrase"),
        ("5.1.10", "", "host-unknown", "Status 5.1.10"),
        # a generic condition phrase does not outrank a specific code
        ("5.7.708", "550 5.7.708 Service unavailable. Access denied", "blocked", "Diagnostic-Code"),
        ("5.0.0", "Service unavailable", "system-error", "phrase"),
        (
            "4.4.3",
            "Host not found, try again. type=MX: Host not found, try again",
            "network-error",
            "phrase",
        ),
        # the basic reply code, then nothing
        ("", "552 Requested mail action aborted", "mailbox-full", "reply 552"),
        ("5.0.0", "550 go away", "unknown", "Status 5.0.0"),
        ("", "", "unknown", "no code or phrase"),
    ],
)
def test_precedence(status: str, diagnostic: str, reason: str, evidence: str) -> None:
    got = Classifier().classify(status, diagnostic)
    assert (got.reason, got.evidence.split(" ")[0]) == (reason, evidence.split(" ")[0])
    assert got.evidence.startswith(evidence)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("5.1.1", "hard"),
        ("5.1.10", "hard"),
        ("5.1.2", "hard"),
        ("5.1.6", "hard"),
        ("5.2.1", "soft"),  # suspended: hard only with bounces.suppress_suspended
        ("5.1.7", "policy"),
        ("5.2.2", "soft"),
        ("5.3.4", "policy"),  # too big: our message, not the address
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
def test_default_kinds(status: str, kind: str) -> None:
    assert Classifier().kind(status) == kind


def test_suspended_suppresses_at_once_when_configured() -> None:
    assert Classifier().classify("5.2.1").kind == "soft"
    got = Classifier(suppress_suspended=True).classify("5.0.0", "550 account disabled")
    assert (got.reason, got.kind) == ("suspended", "hard")


def test_overrides_take_the_longest_prefix_and_phrases_first() -> None:
    classifier = Classifier(
        [
            ("5.4.1", "hard"),
            ("4.7", "soft"),
            ("5.7.1", "user-unknown"),
            ("Mailbox Unavailable For This Sender", "blocked"),
        ]
    )
    assert classifier.kind("5.4.1") == "hard"
    assert classifier.kind("5.4.4") == "soft"
    assert classifier.kind("4.7.0") == "soft"
    assert classifier.classify("5.7.1").reason == "user-unknown"
    assert classifier.kind("5.7.26") == "policy"
    got = classifier.classify("5.4.1", "550 5.4.1 mailbox   unavailable for this sender")
    assert (got.reason, got.kind) == ("blocked", "policy")
    assert got.evidence == 'override phrase "mailbox unavailable for this sender"'
    kind_only = classifier.classify("5.4.1", "550 5.4.1 connection refused")
    assert (kind_only.reason, kind_only.kind) == ("network-error", "hard")
    assert kind_only.evidence == 'override code "5.4.1"'


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
        b"From: MAILER-DAEMON@x\r\nContent-Type: message/delivery-status\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n!!!",
    ],
)
def test_malformed_input_never_raises(data: bytes) -> None:
    assert parse(data).kind in ("unrecognised", "bounce")


@pytest.mark.parametrize(
    "line",
    [
        b"a" * 2_000_000 + b"@",
        b"@" * 1_000_000,
        b"x@" * 500_000,
        b"<<< 550 " * 200_000,
        b"Final-Recipient: " + b"a" * 1_000_000,
    ],
)
def test_hostile_lines_are_read_within_bounds(line: bytes) -> None:
    """Long runs that would make a backtracking pattern quadratic (timed in bench/)."""
    data = (
        b"From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered Mail\r\n\r\n"
        b"The following address(es) failed:\r\n\r\n" + line + b"\r\n"
    )
    report = parse(data)
    assert len(report.recipients) <= 1000
    assert all(len(r.diagnostic) <= 2000 for r in report.recipients)


def test_auto_reply_from_a_mailer_daemon_is_not_ignored() -> None:
    data = (SAMPLES / "exim-5.1.1-unknown-user.eml").read_bytes()
    assert b"Auto-Submitted: auto-replied" in data
    assert parse(data).kind == "bounce"


def test_phrase_table_is_lower_case_and_unique() -> None:
    from relay.feedback.reasons import PHRASES, normalize_phrase

    phrases = [p for p, _ in PHRASES]
    assert len(phrases) == len(set(phrases))
    assert all(normalize_phrase(p) == p for p in phrases)


def test_specific_only_when_more_than_the_class_spoke() -> None:
    classifier = Classifier()
    assert classifier.classify("5.1.1").specific
    assert classifier.classify("5.0.0", "550 user unknown").specific
    assert not classifier.classify("5.0.0", "550 go away").specific
    assert not classifier.classify("5.9.9").specific
    assert not classifier.classify("").specific


def test_a_persons_reply_is_not_a_bounce() -> None:
    data = (
        b"From: Alice <alice@example.net>\r\nTo: bounces+x@bounce.example.com\r\n"
        b"Subject: Re: This week at Example\r\n\r\n"
        b"Please stop. bob@example.org: user unknown to me, and so are you.\r\n"
    )
    assert parse(data).kind == "unrecognised"
    bounce = data.replace(b"Subject: Re: This week", b"Subject: Undeliverable: This week")
    assert [r.recipient for r in parse(bounce).recipients] == ["bob@example.org"]
