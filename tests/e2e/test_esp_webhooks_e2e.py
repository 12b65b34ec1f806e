"""ESP webhooks over real HTTP into the real relay and Redis: accept, refuse, replay, map.

Each provider's payloads (tests/data/esp/, written from the providers' field
descriptions) are signed here with keys the test generates: an SNS signing
certificate pinned with ``signing_cert_file`` (the documented offline trust setting),
a SendGrid ECDSA P-256 key, a Mailgun HMAC key and Postmark basic auth.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import io
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from relay.feedback.esp.verify import sns_string_to_sign
from relay.http.hooks import EspHooks
from relay.runtime.app import Relay
from relay.store.embedded import EmbeddedRedis

DATA = Path(__file__).parent.parent / "data" / "esp"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:ses-events"
MAILGUN_KEY = b"key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
POSTMARK_AUTH = b"postmark:s3cret-hook-password"

MakeRelay = Callable[[dict[str, Any]], Awaitable[Relay]]


class Signers:
    """Test keys for every provider, and the files the relay's config names."""

    def __init__(self, folder: Path) -> None:
        self.sns_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.sns_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .sign(self.sns_key, hashes.SHA256())
        )
        self.sns_cert = folder / "sns.pem"
        self.sns_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.sendgrid_key = ec.generate_private_key(ec.SECP256R1())
        der = self.sendgrid_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.sendgrid_pub = folder / "sendgrid.pub"
        self.sendgrid_pub.write_bytes(base64.b64encode(der))  # as SendGrid's page shows it
        self.mailgun = folder / "mailgun.key"
        self.mailgun.write_bytes(MAILGUN_KEY + b"\n")
        self.postmark = folder / "postmark.auth"
        self.postmark.write_bytes(POSTMARK_AUTH + b"\n")
        for path in (self.mailgun, self.postmark):
            path.chmod(0o600)

    def sns(self, message: dict[str, Any], version: str = "2") -> bytes:
        message = {**message, "SignatureVersion": version}
        message["SigningCertURL"] = (
            "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-0000.pem"
        )
        algorithm: hashes.HashAlgorithm = hashes.SHA256() if version == "2" else hashes.SHA1()  # noqa: S303
        signature = self.sns_key.sign(sns_string_to_sign(message), padding.PKCS1v15(), algorithm)
        message["Signature"] = base64.b64encode(signature).decode()
        return json.dumps(message).encode()

    def sendgrid(self, body: bytes, timestamp: float | None = None) -> dict[str, str]:
        stamp = str(int(timestamp if timestamp is not None else time.time()))
        signature = self.sendgrid_key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
            "Content-Type": "application/json",
        }

    @staticmethod
    def mailgun_body(name: str, timestamp: float | None = None, token: str = "") -> bytes:
        data = json.loads((DATA / name).read_text())
        stamp = str(int(timestamp if timestamp is not None else time.time()))
        token = token or hashlib.sha256(f"{name}{time.time_ns()}".encode()).hexdigest()[:50]
        digest = hmac.new(MAILGUN_KEY, (stamp + token).encode(), hashlib.sha256).hexdigest()
        data["signature"] = {"timestamp": stamp, "token": token, "signature": digest}
        return json.dumps(data).encode()


def notification(name: str, message_id: str = "") -> dict[str, Any]:
    return {
        "Type": "Notification",
        "MessageId": message_id or f"sns-{name}",
        "TopicArn": TOPIC,
        "Message": (DATA / name).read_text(),
        "Timestamp": "2026-11-30T10:00:02.000Z",
    }


@pytest.fixture
def signers(tmp_path: Path) -> Signers:
    return Signers(tmp_path)


def esp_config(config_dict: dict[str, Any], signers: Signers) -> dict[str, Any]:
    raw = copy.deepcopy(config_dict)
    raw["bounces"] = {"thresholds": {"hard": 2}}  # a provider's own suppression still acts at once
    raw["esp_webhooks"] = [
        {
            "provider": "ses",
            "topic_arns": [TOPIC],
            "signing_cert_file": str(signers.sns_cert),
            "groups": {"newsletter": "newsletter"},
        },
        {
            "provider": "sendgrid",
            "public_key_file": str(signers.sendgrid_pub),
            "groups": {"42": "newsletter"},
        },
        {"provider": "mailgun", "signing_key_file": str(signers.mailgun)},
        {"provider": "postmark", "basic_auth_file": str(signers.postmark)},
    ]
    return raw


@pytest.fixture
async def esp_relay(make_relay: MakeRelay, config_dict: dict[str, Any], signers: Signers) -> Relay:
    return await make_relay(esp_config(config_dict, signers))


async def post(
    relay: Relay, provider: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    url = f"http://127.0.0.1:{relay.http_port}/hooks/{provider}"
    data = io.BytesIO(body)
    async with aiohttp.ClientSession() as http, http.post(url, data=data, headers=headers) as resp:
        return resp.status, await resp.text()


async def entries(relay: Relay, address: str) -> set[tuple[str, str, str]]:
    assert relay.store is not None
    return {(e.scope, e.reason, e.source) for e in await relay.store.entries(address)}


# -- SES through SNS -----------------------------------------------------------------


async def test_ses_permanent_bounce_is_a_hard_failure_once(
    esp_relay: Relay, signers: Signers
) -> None:
    body = signers.sns(notification("ses-bounce-permanent.json"))
    assert await post(esp_relay, "ses", body) == (200, "ok processed=1\n")
    # threshold hard: 2 — one hard failure is counted, not yet suppressed
    assert await entries(esp_relay, "gone.user@example.net") == set()
    assert await post(esp_relay, "ses", body) == (200, "ok duplicate=1\n")  # SNS retry
    again = signers.sns(notification("ses-bounce-permanent.json", "sns-second-copy"))
    payload = json.loads(again)
    message = json.loads(payload["Message"])
    message["bounce"]["feedbackId"] = "0102018f2a3c-bounce-0009"
    payload["Message"] = json.dumps(message)
    status, _ = await post(esp_relay, "ses", signers.sns(payload))
    assert status == 200
    assert await entries(esp_relay, "gone.user@example.net") == {("*", "hard-bounce", "esp:ses")}


async def test_ses_signature_version_1_and_provider_suppression(
    esp_relay: Relay, signers: Signers
) -> None:
    body = signers.sns(notification("ses-bounce-suppressed.json"), version="1")
    assert (await post(esp_relay, "ses", body))[0] == 200
    assert await entries(esp_relay, "listed@example.net") == {("*", "hard-bounce", "esp:ses")}


async def test_ses_transient_bounce_and_complaint(esp_relay: Relay, signers: Signers) -> None:
    assert (await post(esp_relay, "ses", signers.sns(notification("ses-bounce-transient.json"))))[
        0
    ] == 200
    assert await entries(esp_relay, "full@example.net") == set()  # soft: 5 in a row
    assert (await post(esp_relay, "ses", signers.sns(notification("ses-complaint.json"))))[0] == 200
    assert await entries(esp_relay, "angry@example.net") == {("*", "complaint", "esp:ses")}


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(
            lambda m: m.update(Message=m["Message"].replace("Permanent", "Transient")),
            id="message-altered",
        ),
        pytest.param(
            lambda m: m.update(TopicArn="arn:aws:sns:eu-west-1:999999999999:other"),
            id="topic-not-allowed",
        ),
        pytest.param(
            lambda m: m.update(Signature=base64.b64encode(b"x" * 256).decode()),
            id="signature-forged",
        ),
        pytest.param(lambda m: m.update(SignatureVersion="3"), id="unknown-version"),
    ],
)
async def test_ses_unauthenticated_changes_nothing(
    esp_relay: Relay, signers: Signers, tamper: Callable[[dict[str, Any]], None]
) -> None:
    message = json.loads(signers.sns(notification("ses-bounce-suppressed.json")))
    tamper(message)
    status, text = await post(esp_relay, "ses", json.dumps(message).encode())
    assert status == 403, text
    assert await entries(esp_relay, "listed@example.net") == set()
    metric = 'oneclick_esp_requests_total{outcome="unauthenticated",provider="ses"}'
    assert metric in esp_relay.metrics.render().decode()


async def test_ses_certificate_url_must_be_sns_over_https(
    make_relay: MakeRelay, config_dict: dict[str, Any], signers: Signers
) -> None:
    """Without a pinned certificate, a SigningCertURL elsewhere is refused, never fetched."""
    raw = esp_config(config_dict, signers)
    del raw["esp_webhooks"][0]["signing_cert_file"]
    relay = await make_relay(raw)
    for url in (
        "http://sns.eu-west-1.amazonaws.com/SimpleNotificationService-1.pem",
        "https://sns.eu-west-1.amazonaws.com.attacker.example/cert.pem",
        "https://attacker.example/sns.eu-west-1.amazonaws.com.pem",
    ):
        message = json.loads(signers.sns(notification("ses-bounce-suppressed.json")))
        message["SigningCertURL"] = url
        status, text = await post(relay, "ses", json.dumps(message).encode())
        assert status == 403, url
        assert "SigningCertURL is not an SNS certificate URL" in text
    assert await entries(relay, "listed@example.net") == set()


# -- SendGrid ------------------------------------------------------------------------


async def test_sendgrid_batch_maps_every_event(esp_relay: Relay, signers: Signers) -> None:
    body = (DATA / "sendgrid-events.json").read_bytes()
    status, text = await post(esp_relay, "sendgrid", body, signers.sendgrid(body))
    assert status == 200, text
    assert text == "ok processed=6\n"  # delivered and deferred are not final outcomes
    assert await entries(esp_relay, "hard@example.net") == set()  # 1 of 2 hard failures
    assert await entries(esp_relay, "blocked@example.net") == set()  # our reputation, not theirs
    assert await entries(esp_relay, "dropped@example.net") == {("*", "hard-bounce", "esp:sendgrid")}
    assert await entries(esp_relay, "spam@example.net") == {("*", "complaint", "esp:sendgrid")}
    assert await entries(esp_relay, "leaver@example.net") == {
        ("g:newsletter", "unsubscribe", "esp:sendgrid")
    }
    # an unsubscribe group we do not map: every marketing group, never too few
    assert await entries(esp_relay, "other@example.net") == {("*", "unsubscribe", "esp:sendgrid")}
    assert await entries(esp_relay, "fine@example.net") == set()
    replay = await post(esp_relay, "sendgrid", body, signers.sendgrid(body))
    assert replay == (200, "ok duplicate=6\n")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param(lambda s, b: {}, 401, id="unsigned"),
        pytest.param(lambda s, b: s.sendgrid(b, time.time() - 3600), 403, id="stale"),
        pytest.param(lambda s, b: s.sendgrid(b + b" "), 403, id="body-altered"),
        pytest.param(
            lambda s, b: {**s.sendgrid(b), "X-Twilio-Email-Event-Webhook-Timestamp": "1"},
            403,
            id="timestamp-altered",
        ),
    ],
)
async def test_sendgrid_unauthenticated_changes_nothing(
    esp_relay: Relay,
    signers: Signers,
    headers: Callable[[Signers, bytes], dict[str, str]],
    status: int,
) -> None:
    body = (DATA / "sendgrid-events.json").read_bytes()
    assert (await post(esp_relay, "sendgrid", body, headers(signers, body)))[0] == status
    assert await entries(esp_relay, "spam@example.net") == set()


# -- Mailgun -------------------------------------------------------------------------


async def test_mailgun_events_and_token_replay(esp_relay: Relay, signers: Signers) -> None:
    body = signers.mailgun_body("mailgun-unsubscribed.json")
    assert await post(esp_relay, "mailgun", body) == (200, "ok processed=1\n")
    assert await entries(esp_relay, "bye@example.net") == {
        ("g:newsletter", "unsubscribe", "esp:mailgun")
    }
    status, text = await post(esp_relay, "mailgun", body)  # the same signed request again
    assert (status, "token already used" in text) == (403, True)
    body = signers.mailgun_body("mailgun-complained.json")
    assert (await post(esp_relay, "mailgun", body))[0] == 200
    assert await entries(esp_relay, "cross@example.net") == {("*", "complaint", "esp:mailgun")}
    body = signers.mailgun_body("mailgun-failed-temporary.json")
    assert await post(esp_relay, "mailgun", body) == (200, "ok none\n")  # Mailgun retries it
    assert await entries(esp_relay, "slow@example.net") == set()


async def test_mailgun_forged_and_stale(esp_relay: Relay, signers: Signers) -> None:
    stale = signers.mailgun_body("mailgun-complained.json", time.time() - 3600)
    assert (await post(esp_relay, "mailgun", stale))[0] == 403
    forged = json.loads(signers.mailgun_body("mailgun-complained.json"))
    forged["signature"]["signature"] = "0" * 64
    assert (await post(esp_relay, "mailgun", json.dumps(forged).encode()))[0] == 403
    unsigned = (DATA / "mailgun-complained.json").read_bytes()
    assert (await post(esp_relay, "mailgun", unsigned))[0] == 401
    assert await entries(esp_relay, "cross@example.net") == set()


# -- Postmark ------------------------------------------------------------------------


def basic(credentials: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}


async def test_postmark_bounce_complaint_and_subscription_change(esp_relay: Relay) -> None:
    for name in ("postmark-hardbounce.json", "postmark-hardbounce.json"):
        body = (DATA / name).read_bytes()
        await post(esp_relay, "postmark", body, basic(POSTMARK_AUTH))
    assert await entries(esp_relay, "void@example.net") == set()  # the same bounce ID twice
    body = (DATA / "postmark-spamcomplaint.json").read_bytes()
    assert (await post(esp_relay, "postmark", body, basic(POSTMARK_AUTH)))[0] == 200
    assert await entries(esp_relay, "junk@example.net") == {("*", "complaint", "esp:postmark")}
    body = (DATA / "postmark-subscriptionchange.json").read_bytes()
    assert (await post(esp_relay, "postmark", body, basic(POSTMARK_AUTH)))[0] == 200
    assert await entries(esp_relay, "optout@example.net") == {
        ("g:newsletter", "unsubscribe", "esp:postmark")
    }


async def test_postmark_needs_its_password(esp_relay: Relay) -> None:
    body = (DATA / "postmark-spamcomplaint.json").read_bytes()
    assert (await post(esp_relay, "postmark", body))[0] == 401
    assert (await post(esp_relay, "postmark", body, basic(b"postmark:wrong")))[0] == 403
    assert await entries(esp_relay, "junk@example.net") == set()


# -- every provider ------------------------------------------------------------------


async def test_unconfigured_provider_and_bad_payloads(
    make_relay: MakeRelay, config_dict: dict[str, Any], signers: Signers
) -> None:
    raw = esp_config(config_dict, signers)
    raw["esp_webhooks"] = raw["esp_webhooks"][3:]  # postmark only
    relay = await make_relay(raw)
    assert (await post(relay, "sendgrid", b"[]"))[0] == 404
    assert (await post(relay, "postmark", b"{not json", basic(POSTMARK_AUTH)))[0] == 400
    too_big = b"[" + b" " * (5 * 1024 * 1024) + b"]"
    assert (await post(relay, "postmark", too_big, basic(POSTMARK_AUTH)))[0] == 413


async def test_redis_down_answers_503_and_the_retry_is_processed(
    make_relay: MakeRelay, config_dict: dict[str, Any], signers: Signers
) -> None:
    server = EmbeddedRedis().start()
    try:
        raw = esp_config(config_dict, signers)
        raw["redis"] = {"url": server.url, "timeout": 0.5}
        relay = await make_relay(raw)
        body = (DATA / "postmark-spamcomplaint.json").read_bytes()
        server.stop()
        status, text = await post(relay, "postmark", body, basic(POSTMARK_AUTH))
        assert (status, text) == (503, "try again later\n")
        server.start()  # same port, empty
        assert await post(relay, "postmark", body, basic(POSTMARK_AUTH)) == (
            200,
            "ok processed=1\n",
        )
        assert await entries(relay, "junk@example.net") == {("*", "complaint", "esp:postmark")}
    finally:
        server.stop()


async def test_events_stream_and_daily_report_see_esp_entries(
    esp_relay: Relay, signers: Signers
) -> None:
    body = (DATA / "sendgrid-events.json").read_bytes()
    assert (await post(esp_relay, "sendgrid", body, signers.sendgrid(body)))[0] == 200
    assert esp_relay.store is not None
    redis = esp_relay.store._redis
    stream = await redis.xrange("ocr:events")
    sources = {fields[b"source"].decode() for _, fields in stream}
    assert sources == {"esp:sendgrid"}
    await esp_relay.counters.flush()
    rows = await esp_relay.counters.report(1)
    totals: dict[str, int] = {}
    for row in rows:
        for metric, n in row.counts.items():
            totals[metric] = totals.get(metric, 0) + n
    assert totals["complaint"] == 1
    assert totals["unsubscribe"] == 2
    assert totals["hard-bounce"] >= 2  # the provider-suppressed address and the hard failure


async def test_sns_subscription_is_confirmed_for_allowed_topics_only(
    esp_relay: Relay, signers: Signers
) -> None:
    """A local server stands in for SNS's SubscribeURL: only an allowed topic's is fetched."""
    hits: list[str] = []

    async def confirm(request: web.Request) -> web.Response:
        hits.append(request.path_qs)
        return web.Response(text="<ConfirmSubscriptionResponse/>")

    sns = web.Application()
    sns.router.add_get("/confirm", confirm)
    sns_runner = web.AppRunner(sns)
    await sns_runner.setup()
    await web.TCPSite(sns_runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{sns_runner.addresses[0][1]}"

    async def fetch(url: str) -> bytes:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return await resp.read()

    (ses,) = [c for c in esp_relay.config.esp_webhooks if c.provider == "ses"]
    assert esp_relay.esp_intake is not None
    hooks = EspHooks(
        [ses],
        esp_relay.esp_intake,
        esp_relay.metrics,
        fetch=fetch,
        url_allowed=lambda url: url.startswith(base + "/"),
    )
    app = web.Application()
    app.add_routes(hooks.routes())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/ses"
    message = {
        "Type": "SubscriptionConfirmation",
        "MessageId": "sub-1",
        "Token": "tok",
        "TopicArn": TOPIC,
        "Message": "You have chosen to subscribe to the topic.",
        "SubscribeURL": f"{base}/confirm?Token=tok",
        "Timestamp": "2026-11-30T10:00:00.000Z",
    }
    other_topic = {**message, "TopicArn": "arn:aws:sns:eu-west-1:123456789012:other"}
    elsewhere = {**message, "SubscribeURL": "https://example.org/confirm"}
    try:
        async with aiohttp.ClientSession() as http:
            for body, status in ((message, 200), (other_topic, 403), (elsewhere, 403)):
                async with http.post(url, data=signers.sns(body)) as resp:
                    assert resp.status == status, await resp.text()
    finally:
        await runner.cleanup()
        await sns_runner.cleanup()
    assert hits == ["/confirm?Token=tok"]


async def test_provider_hard_bounce_that_names_a_block_never_suppresses(esp_relay: Relay) -> None:
    """The provider says "HardBounce"; the words say our IP is blocked: policy, as in a DSN."""
    hard = json.loads((DATA / "postmark-hardbounce.json").read_bytes())
    for n in range(3):
        for who, details in (
            ("blocked@example.net", "smtp;550 5.7.1 Client host [192.0.2.10] blocked using zen"),
            ("gone@example.net", "smtp;550 5.1.1 The email account does not exist."),
        ):
            body = dict(hard, ID=hard["ID"] - 10 * n - len(who), Email=who, Details=details)
            status, _ = await post(
                esp_relay, "postmark", json.dumps(body).encode(), basic(POSTMARK_AUTH)
            )
            assert status == 200
    assert await entries(esp_relay, "blocked@example.net") == set()
    assert await entries(esp_relay, "gone@example.net") == {("*", "hard-bounce", "esp:postmark")}
