"""relay.feedback.esp: every sample payload read into the meaning the README's table gives,
the provider checks, the SNS subscription confirmation, and the config entries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import build_config

from relay.errors import ConfigError
from relay.feedback.esp import events
from relay.feedback.esp.verify import Unauthenticated, sns_url_allowed, verify_basic

DATA = Path(__file__).parent / "data" / "esp"


def meanings(found: list[events.EspEvent]) -> list[tuple[str, str, str | None]]:
    return [(e.recipient, e.meaning, e.group) for e in found]


def test_ses_samples() -> None:
    def read(name: str) -> list[events.EspEvent]:
        return list(events.ses((DATA / name).read_text(), {}))

    (bounce,) = read("ses-bounce-permanent.json")
    assert (bounce.recipient, bounce.meaning, bounce.status) == (
        "Gone.User@Example.NET",
        "hard",
        "5.1.1",
    )
    assert bounce.token == "TOKEN" or bounce.token is None  # the sample's URL is no real token
    assert meanings(read("ses-bounce-suppressed.json")) == [
        ("listed@example.net", "suppressed", None)
    ]
    assert meanings(read("ses-bounce-transient.json")) == [("full@example.net", "soft", None)]
    assert meanings(read("ses-complaint.json")) == [
        ("angry@example.net", "complaint", "newsletter")
    ]


def test_ses_not_spam_feedback_is_no_complaint() -> None:
    data = json.loads((DATA / "ses-complaint.json").read_text())
    data["complaint"]["complaintFeedbackType"] = "not-spam"
    assert list(events.ses(json.dumps(data), {})) == []


def test_sendgrid_sample() -> None:
    found = list(events.sendgrid((DATA / "sendgrid-events.json").read_bytes(), {"42": "news"}))
    assert meanings(found) == [
        ("hard@example.net", "hard", None),
        ("blocked@example.net", "policy", None),
        ("dropped@example.net", "suppressed", None),
        ("spam@example.net", "complaint", None),
        ("leaver@example.net", "unsubscribe", "news"),
        ("other@example.net", "unsubscribe", None),
    ]
    assert found[0].event_id == "sg-bounce-0001"


def test_mailgun_samples() -> None:
    def read(name: str) -> list[tuple[str, str, str | None]]:
        return meanings(list(events.mailgun(json.loads((DATA / name).read_text()), {})))

    assert read("mailgun-failed-permanent.json") == [("nobody@example.net", "hard", "newsletter")]
    assert read("mailgun-failed-temporary.json") == []
    assert read("mailgun-complained.json") == [("cross@example.net", "complaint", None)]
    assert read("mailgun-unsubscribed.json") == [("bye@example.net", "unsubscribe", "newsletter")]


def test_postmark_samples() -> None:
    def read(name: str) -> list[tuple[str, str, str | None]]:
        data = json.loads((DATA / name).read_text())
        return meanings(list(events.postmark(data, {"broadcast": "promotions"})))

    assert read("postmark-hardbounce.json") == [("void@example.net", "hard", "promotions")]
    assert read("postmark-spamcomplaint.json") == [("junk@example.net", "complaint", "promotions")]
    assert read("postmark-subscriptionchange.json") == [
        ("optout@example.net", "unsubscribe", "newsletter")
    ]


@pytest.mark.parametrize("body", [b"{", b'{"event-data": []}', b'{"event-data": "x"}'])
def test_bad_payloads(body: bytes) -> None:
    with pytest.raises(events.BadPayload):
        list(events.mailgun(events.loads(body), {}))


def test_sendgrid_needs_an_array() -> None:
    with pytest.raises(events.BadPayload):
        list(events.sendgrid(b'{"event": "bounce"}', {}))


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem", True),
        ("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem", True),
        ("http://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem", False),
        ("https://sns.us-east-1.amazonaws.com:8443/x.pem", False),
        ("https://user@sns.us-east-1.amazonaws.com/x.pem", False),
        ("https://sns.us-east-1.amazonaws.com.evil.example/x.pem", False),
        ("https://evil.example/sns.us-east-1.amazonaws.com", False),
        ("https://s3.amazonaws.com/x.pem", False),
        ("not a url", False),
    ],
)
def test_sns_url_allowed(url: str, allowed: bool) -> None:
    assert sns_url_allowed(url) is allowed


def test_basic_auth_compares_credentials() -> None:
    verify_basic(b"u:p", "Basic dTpw")
    with pytest.raises(Unauthenticated) as missing:
        verify_basic(b"u:p", None)
    assert missing.value.status == 401
    with pytest.raises(Unauthenticated) as wrong:
        verify_basic(b"u:p", "Basic dTpx")
    assert wrong.value.status == 403


# -- config ----------------------------------------------------------------------------


def with_hooks(config_dict: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {**config_dict, "esp_webhooks": entries}


@pytest.mark.parametrize(
    ("entries", "key", "problem"),
    [
        ([{"provider": "ses"}], "esp_webhooks[0].topic_arns", "at least one SNS topic ARN"),
        ([{"provider": "ses", "topic_arns": ["nope"]}], "esp_webhooks[0].topic_arns[0]", "ARN"),
        ([{"provider": "sparkpost"}], "esp_webhooks[0].provider", "expected one of"),
        ([{"provider": "sendgrid"}], "esp_webhooks[0].public_key_file", "is required"),
        ([{"provider": "mailgun"}], "esp_webhooks[0].signing_key_file", "is required"),
        (
            [{"provider": "mailgun", "signing_key_env": "X", "public_key_file": "k"}],
            "esp_webhooks[0].public_key_file",
            "unknown key for provider mailgun",
        ),
        (
            [
                {"provider": "postmark", "basic_auth_env": "OCR_TEST_PM"},
                {"provider": "postmark", "basic_auth_env": "OCR_TEST_PM"},
            ],
            "esp_webhooks[1].provider",
            "configured twice",
        ),
    ],
)
def test_config_errors_name_the_key(
    config_dict: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    entries: list[dict[str, Any]],
    key: str,
    problem: str,
) -> None:
    monkeypatch.setenv("OCR_TEST_PM", "user:pass")
    with pytest.raises(ConfigError) as err:
        build_config(with_hooks(config_dict, entries))
    assert err.value.key == key
    assert problem in err.value.problem


def test_postmark_auth_must_be_user_and_password(
    config_dict: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OCR_TEST_PM", "no-colon")
    with pytest.raises(ConfigError) as err:
        build_config(
            with_hooks(config_dict, [{"provider": "postmark", "basic_auth_env": "OCR_TEST_PM"}])
        )
    assert err.value.key == "esp_webhooks[0].basic_auth_file"
