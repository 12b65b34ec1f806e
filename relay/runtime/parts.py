"""The composition root: every part of the relay is built here, and only here.

``serve`` (through ``relay.runtime.app.Relay``), ``ingest`` and the store commands
of the CLI take their parts from these factories, so a relayed message, a
one-click POST, a bounce piped in by the MTA and an operator's command meet the
same objects, wired the same way.

The parts, by how long they live:

``Files``    read next to the YAML for the listeners (TLS certificate, AUTH users):
             loaded before anything starts, so a bad file stops the start with its
             key named and nothing to undo.
``Stores``   one Redis client and what only wraps it (suppression store, retry
             queue, daily counters, inbound log, webhook ledger): as long as the process.
``Live``     everything else built from the config file (policy, tokens, DKIM
             signer, upstream, VERP, feedback, unsubscriber, intake, pipeline,
             retry judge): a reload builds a new one and swaps it in whole.
``Handling`` the part of ``Live`` that ``ingest`` needs too: from an inbound message,
             a click or an ESP event to a suppression.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from relay.config import Config, SmtpTlsConfig
from relay.errors import ConfigError, StoreUnavailable
from relay.feedback.bounces import Classifier
from relay.feedback.esp.intake import EspIntake
from relay.feedback.intake import Intake
from relay.feedback.record import Feedback
from relay.mail.dkim import Signer
from relay.mail.tokens import TokenCodec
from relay.mail.verp import Verp
from relay.metrics import Metrics
from relay.outbound.judge import RetryJudge
from relay.outbound.pipeline import Pipeline
from relay.outbound.policy import Policy
from relay.outbound.retry import RetryQueue
from relay.outbound.upstream import Upstream
from relay.runtime.lifecycle import background
from relay.smtp.auth import Users
from relay.store import client as redis_client
from relay.store.client import RedisClient
from relay.store.embedded import (
    SOCKET_NAME,
    EmbeddedRedis,
    EmbeddedRedisError,
    socket_url,
    start_error,
)
from relay.store.inbound import InboundLog
from relay.store.journal import Journal
from relay.store.keys import Keys
from relay.store.ledger import Ledger
from relay.suppression.mailto import MailtoCodes
from relay.suppression.report import DailyCounters
from relay.suppression.store import SuppressionPolicy, SuppressionStore
from relay.suppression.unsubscribe import Unsubscriber

log = logging.getLogger(__name__)


# -- files ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Files:
    tls: ssl.SSLContext | None
    users: Users | None
    inbound_tls: ssl.SSLContext | None = None
    """STARTTLS of the inbound listener (``bounces.tls``)."""


def load_files(config: Config) -> Files:
    """The listeners' certificates and users file; raises ConfigError naming the key."""
    smtp, bounces = config.smtp, config.bounces
    return Files(
        tls=server_tls(smtp.tls) if smtp.tls is not None else None,
        users=Users.load(smtp.auth_users_file) if smtp.auth_users_file is not None else None,
        inbound_tls=(
            server_tls(bounces.tls, "bounces.tls.cert_file") if bounces.tls is not None else None
        ),
    )


def check_files(config: Config) -> None:
    """Load every file a start would load (DKIM keys too), so errors surface early."""
    Signer.from_config(config.dkim)
    load_files(config)


def server_tls(config: SmtpTlsConfig, key: str = "smtp.tls.cert_file") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(key, f"cannot load certificate/key: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


# -- stores -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stores:
    """One Redis client and the objects over it; shared by every part of one process."""

    redis: RedisClient
    store: SuppressionStore
    retry: RetryQueue
    counters: DailyCounters
    inbound: InboundLog
    ledger: Ledger
    journal: Journal
    """The local unsubscribe journal (``state_dir``), for while Redis is unreachable."""


def stores(config: Config, redis: RedisClient) -> Stores:
    prefix = config.redis.key_prefix
    return Stores(
        redis=redis,
        store=SuppressionStore(
            redis, prefix, policy=SuppressionPolicy.from_config(config.suppression)
        ),
        retry=RetryQueue(redis, prefix, config.retry),
        counters=DailyCounters(redis, prefix),
        inbound=InboundLog(redis, Keys(prefix)),
        ledger=Ledger(redis, Keys(prefix)),
        journal=Journal(config.state_dir),
    )


def needs_embedded(config: Config) -> bool:
    """``redis.url`` and ``redis.sentinel`` omitted: the relay starts its own Redis."""
    return config.redis.url is None and config.redis.sentinel is None


def _start_embedded(data_dir: Path | None) -> EmbeddedRedis:
    server = EmbeddedRedis(data_dir=data_dir)
    try:
        return server.start()
    except BaseException:
        server.stop()  # its temporary folder, and the process if it outlived the timeout
        raise


@contextlib.asynccontextmanager
async def embedded_redis(data_dir: Path | None = None) -> AsyncIterator[EmbeddedRedis]:
    """A Redis child process, stopped on exit (also when the start is cancelled).

    Private and throwaway without ``data_dir`` (the demo); ``redis.url: embedded``
    persists to ``data_dir`` (``relay.store.embedded``).
    """
    starting = asyncio.ensure_future(asyncio.to_thread(_start_embedded, data_dir))
    try:
        server = await asyncio.shield(starting)
    except EmbeddedRedisError as exc:
        raise start_error(data_dir, exc) from None
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):  # the thread goes on: stop what it starts
            await asyncio.to_thread((await starting).stop)
        raise
    (log.info if data_dir is None else log.warning)("embedded redis started: %s", server.describe())
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def open_stores(config: Config, url: str | None = None) -> AsyncIterator[Stores]:
    """The Redis client for ``redis:`` (``url`` overrides it), closed on exit."""
    client = redis_client.connect_config(config.redis, url)
    try:
        await redis_client.prepare(client)
        async with background("redis-sentinel", lambda: redis_client.follow_master(client)):
            yield stores(config, client)
    finally:
        await redis_client.close(client)


def redis_target(config: Config) -> str:
    """Where Redis is, for an error line: host and port only (a URL may hold a password)."""
    if config.redis.sentinel is not None:
        return f"sentinel master {config.redis.sentinel.master}"
    if config.redis.url is None:
        return "embedded"
    parts = urlsplit(config.redis.url)
    return f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else parts.scheme


@contextlib.asynccontextmanager
async def command_stores(config: Config) -> AsyncIterator[Stores]:
    """The stores for an operator command: a shared Redis, every error as StoreUnavailable.

    The error names the operation and where Redis is, for the one line the CLI prints.
    """
    url = None
    if config.redis.embedded and config.redis.data_dir is not None:
        # The running relay's server, through its socket: the AOF is never opened twice.
        if not (config.redis.data_dir / SOCKET_NAME).exists():
            raise StoreUnavailable(
                f"redis.url is embedded and no relay is running on {config.redis.data_dir}"
                " (start oneclick-relay serve first)"
            )
        url = socket_url(config.redis.data_dir)
    elif needs_embedded(config):
        raise ConfigError("redis.url", "the CLI needs a shared Redis (the embedded one is private)")
    try:
        async with open_stores(config, url) as parts:
            with redis_client.unavailable("redis"):
                yield parts
    except StoreUnavailable as exc:
        raise StoreUnavailable(f"{exc} (redis at {redis_target(config)})") from exc


# -- live parts -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handling:
    """From an inbound message or a one-click request to a suppression."""

    tokens: TokenCodec
    verp: Verp | None
    feedback: Feedback
    unsubscriber: Unsubscriber
    intake: Intake
    esp: EspIntake
    """ESP webhook events (``esp_webhooks``)."""
    mailto: MailtoCodes
    """The codes in the mailto unsubscribe address: issued by the pipeline, read by intake."""


def handling(config: Config, parts: Stores, metrics: Metrics) -> Handling:
    tokens = TokenCodec(config.tokens)
    verp = Verp.from_config(config)
    feedback = Feedback(parts.store, config.bounces.thresholds, parts.counters, metrics)
    mailto = MailtoCodes.from_config(config, parts.redis)
    unsubscriber = Unsubscriber(
        tokens,
        parts.store,
        config.policy,
        metrics,
        parts.counters,
        journal=parts.journal,
        mailto=mailto,
    )
    intake = Intake(
        config=config,
        records=parts.inbound,
        store=parts.store,
        unsubscriber=unsubscriber,
        feedback=feedback,
        verp=verp,
        metrics=metrics,
    )
    esp = EspIntake(
        feedback=feedback,
        store=parts.store,
        unsubscriber=unsubscriber,
        counters=parts.counters,
        ledger=parts.ledger,
        metrics=metrics,
        classifier=Classifier.from_config(config.bounces),
    )
    return Handling(tokens, verp, feedback, unsubscriber, intake, esp, mailto)


@dataclass(frozen=True, slots=True)
class Live:
    """Every part built from the config file alone; a reload replaces it whole."""

    config: Config
    handling: Handling
    policy: Policy
    signer: Signer
    upstream: Upstream
    pipeline: Pipeline
    judge: RetryJudge


def live(
    config: Config,
    parts: Stores,
    metrics: Metrics,
    *,
    signer: Signer | None = None,
    upstream: Upstream | None = None,
) -> Live:
    """Build the live parts; ``signer``, ``upstream``: already built for this config.

    Reads the DKIM keys unless given (ConfigError naming the key); opens no connection.
    """
    if signer is None:
        signer = Signer.from_config(config.dkim)
    policy = Policy(config.policy)
    handled = handling(config, parts, metrics)
    if upstream is None:
        upstream = Upstream(config.upstream, local_hostname=config.smtp.hostname)
    pipeline = Pipeline(
        config=config,
        policy=policy,
        store=parts.store,
        tokens=handled.tokens,
        signer=signer,
        upstream=upstream,
        retry=parts.retry,
        metrics=metrics,
        counters=parts.counters,
        verp=handled.verp,
        feedback=handled.feedback,
        mailto=handled.mailto,
    )
    judge = RetryJudge(handled.feedback, Classifier.from_config(config.bounces), handled.verp)
    return Live(config, handled, policy, signer, upstream, pipeline, judge)
