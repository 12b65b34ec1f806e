"""``POST /hooks/{provider}``: ESP webhook events (SES via SNS, SendGrid, Mailgun, Postmark).

Authenticity first: nothing is read into events before the provider's signature (or
basic auth) verifies; an unauthenticated request answers 401/403, changes nothing and
is counted. An accepted request answers 200 only once its events are in the store;
with Redis down it answers 503, so the provider retries (each event is acted on once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from relay.config import EspWebhookConfig
from relay.errors import StoreUnavailable
from relay.eventlog import EventLog
from relay.feedback.esp import events
from relay.feedback.esp.events import BadPayload, EspEvent
from relay.feedback.esp.intake import EspIntake
from relay.feedback.esp.verify import (
    Unauthenticated,
    load_sendgrid_key,
    sns_url_allowed,
    verify_basic,
    verify_mailgun,
    verify_sendgrid,
    verify_sns,
)
from relay.metrics import Metrics

log = EventLog(__name__)

MAX_BODY = 4 * 1024 * 1024
"""A SendGrid batch of 1,000 events is ~1 MB; nothing a provider sends is near this."""
PARSE_INLINE = 64 * 1024
"""Bodies above this are parsed in a thread, so a large batch never stalls the loop."""
FETCH_TIMEOUT = 10.0
MAX_CERT = 16 * 1024

Fetch = Callable[[str], Awaitable[bytes]]
T = TypeVar("T")


class BodyTooLarge(Exception):
    pass


class TryLater(Exception):
    """SNS could not be reached (certificate, confirmation): 503, the provider retries."""


async def _read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(65536):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class SnsCertificates:
    """SNS signing certificates: the pinned one, or fetched over HTTPS from SNS and cached."""

    def __init__(self, pinned: bytes | None, fetch: Fetch) -> None:
        self._pinned = pinned
        self._fetch = fetch
        self._cache: dict[str, bytes] = {}

    async def get(self, url: str) -> bytes:
        if self._pinned is not None:
            return self._pinned
        if not sns_url_allowed(url) or not url.endswith(".pem"):
            raise Unauthenticated(f"SigningCertURL is not an SNS certificate URL: {url[:120]!r}")
        if url not in self._cache:
            if len(self._cache) > 32:
                self._cache.clear()
            self._cache[url] = await self._fetch(url)
        return self._cache[url]


class HttpsFetcher:
    """GETs of SNS URLs (certificates, subscription confirmations), bounded in time and size."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, url: str) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
            )
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise OSError(f"HTTP {response.status} from {url[:120]}")
                body = await response.content.read(MAX_CERT + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OSError(f"GET {url[:120]} failed: {type(exc).__name__}") from exc
        if len(body) > MAX_CERT:
            raise OSError(f"GET {url[:120]}: response too large")
        return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class EspHooks:
    def __init__(
        self,
        configs: Iterable[EspWebhookConfig],
        intake: EspIntake,
        metrics: Metrics,
        *,
        fetch: Fetch | None = None,
        url_allowed: Callable[[str], bool] = sns_url_allowed,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``fetch`` and ``url_allowed`` replace the HTTPS client and the SNS host check
        (tests serve their own certificate and confirmation URL)."""
        self._configs = {c.provider: c for c in configs}
        self.intake = intake
        """Public: a reload points it at the intake built from the new config."""
        self._metrics = metrics
        self._fetcher = HttpsFetcher()
        self._fetch: Fetch = fetch or self._fetcher
        self._url_allowed = url_allowed
        self._clock = clock
        ses = self._configs.get("ses")
        self._certs = SnsCertificates(ses.signing_cert_pem if ses else None, self._fetch)
        sendgrid = self._configs.get("sendgrid")
        self._sendgrid_key = (
            load_sendgrid_key(sendgrid.public_key) if sendgrid and sendgrid.public_key else None
        )

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/hooks/{provider}", self.handle)] if self._configs else []

    async def close(self, app: web.Application) -> None:
        await self._fetcher.close()

    async def handle(self, request: web.Request) -> web.Response:
        provider = request.match_info["provider"]
        config = self._configs.get(provider)  # type: ignore[call-overload]
        if config is None:
            return self._answer(provider, "unknown-provider", 404, "no such webhook")
        try:
            body = await _read_body(request)
        except BodyTooLarge:
            return self._answer(provider, "too-large", 413, "body too large")
        try:
            found = await self._authenticated_events(config, request, body)
        except Unauthenticated as exc:
            log.warning("esp webhook refused", provider=provider, reason=exc.reason)
            return self._answer(provider, "unauthenticated", exc.status, exc.reason)
        except BadPayload as exc:
            return self._answer(provider, "bad-payload", 400, str(exc))
        except (StoreUnavailable, TryLater):
            return self._answer(provider, "try-later", 503, "try again later")
        if found is None:  # an SNS subscription message, handled
            return self._answer(provider, "subscription", 200, "ok")
        try:
            applied = await self.intake.apply(found)
        except StoreUnavailable:
            return self._answer(provider, "store-unavailable", 503, "try again later")
        log.info("esp webhook", provider=provider, events=len(found), applied=applied)
        return self._answer(provider, "accepted", 200, f"ok {applied}")

    def _answer(self, provider: str, outcome: str, status: int, text: str) -> web.Response:
        label = provider if provider in self._configs else "-"
        self._metrics.esp_requests.labels(label, outcome).inc()
        return web.Response(text=text[:300] + "\n", status=status)

    async def _authenticated_events(
        self, config: EspWebhookConfig, request: web.Request, body: bytes
    ) -> list[EspEvent] | None:
        now = self._clock()
        groups = config.groups
        if config.provider == "sendgrid":
            assert self._sendgrid_key is not None
            verify_sendgrid(
                self._sendgrid_key,
                request.headers.get("X-Twilio-Email-Event-Webhook-Signature"),
                request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp"),
                body,
                now,
                config.max_skew,
            )
            return await _parse(body, lambda b: list(events.sendgrid(b, groups)))
        if config.provider == "postmark":
            assert config.basic_auth is not None
            verify_basic(config.basic_auth.reveal(), request.headers.get("Authorization"))
            data = await _parse(body, _object)
            return list(events.postmark(data, groups))
        if config.provider == "mailgun":
            assert config.signing_key is not None
            data = await _parse(body, _object)
            signature = data.get("signature")
            if not isinstance(signature, dict):
                raise Unauthenticated("signature missing", missing=True)
            token = verify_mailgun(config.signing_key.reveal(), signature, now, config.max_skew)
            if not await self.intake.first_use("mailgun-token", token, 2 * config.max_skew):
                raise Unauthenticated("token already used (replayed request)")
            return list(events.mailgun(data, groups))
        return await self._sns(config, request, body)

    async def _sns(
        self, config: EspWebhookConfig, request: web.Request, body: bytes
    ) -> list[EspEvent] | None:
        message = await _parse(body, _object)
        topic = message.get("TopicArn")
        if topic not in config.topic_arns:
            raise Unauthenticated(f"topic not allowed: {str(topic)[:200]!r}")
        try:
            certificate = await self._certs.get(str(message.get("SigningCertURL", "")))
        except OSError as exc:
            log.warning("esp webhook certificate not fetched", provider="ses", error=exc)
            raise TryLater("SNS certificate not fetched") from exc
        verify_sns(message, certificate)
        kind = message.get("Type")
        if kind == "SubscriptionConfirmation":
            await self._confirm(str(topic), str(message.get("SubscribeURL", "")))
            return None
        if kind == "UnsubscribeConfirmation":
            log.warning("esp webhook unsubscribed this endpoint", provider="ses", topic=topic)
            return None
        text = message.get("Message")
        if not isinstance(text, str):
            raise BadPayload("SNS Notification without a Message")
        return await _parse(text.encode(), lambda b: list(events.ses(b.decode(), config.groups)))

    async def _confirm(self, topic: str, url: str) -> None:
        """Confirm a subscription to an allowed topic by GETting its SubscribeURL."""
        if not self._url_allowed(url):
            raise Unauthenticated(f"SubscribeURL is not an SNS URL: {url[:120]!r}")
        try:
            await self._fetch(url)
        except OSError as exc:
            log.warning(
                "esp webhook subscription not confirmed",
                provider="ses",
                topic=topic,
                error=exc,
                action="confirm it by opening SubscribeURL",
            )
            raise TryLater("subscription not confirmed") from exc
        log.info("esp webhook subscription confirmed", provider="ses", topic=topic)


def _object(body: bytes) -> Mapping[str, Any]:
    data = events.loads(body)
    if not isinstance(data, dict):
        raise BadPayload("expected a JSON object")
    return data


async def _parse(body: bytes, parse: Callable[[bytes], T]) -> T:
    if len(body) > PARSE_INLINE:
        return await asyncio.to_thread(parse, body)
    return parse(body)
