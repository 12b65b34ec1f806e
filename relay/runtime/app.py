"""Composition root: builds the store, signer, pipeline and servers, and stops them in order.

Start order: Redis (embedded when ``redis.url`` is omitted) → store and retry
queue → keys, tokens, policy → upstream pool → pipeline → HTTP → inbound
listener (bounces, complaints, mailto) → SMTP → retry worker. Stop order is the
reverse, with SMTP first: stop accepting, let in-flight transactions finish
(``smtp.drain_timeout``), then the inbound listener the same way, then the rest.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from relay.config import Config, SmtpTlsConfig, load_config
from relay.errors import ConfigError
from relay.feedback.bounces import Classifier
from relay.feedback.esp.intake import EspIntake
from relay.feedback.intake import Intake
from relay.feedback.record import Feedback
from relay.http.admin import AdminApi
from relay.http.hooks import EspHooks
from relay.http.web import MAX_HEADERS, MAX_LINE, WebApp
from relay.inbound.listener import InboundHandler, start_listener
from relay.mail.dkim import Signer
from relay.mail.tokens import TokenCodec
from relay.mail.verp import Verp
from relay.metrics import Metrics
from relay.outbound.events import StreamConsumer, WebhookSender, build_consumers
from relay.outbound.judge import RetryJudge
from relay.outbound.pipeline import Pipeline
from relay.outbound.policy import Policy
from relay.outbound.retry import RetryQueue, RetryWorker
from relay.outbound.upstream import Upstream
from relay.runtime import sdnotify
from relay.runtime.looplag import LoopLagMonitor
from relay.smtp.auth import Users
from relay.smtp.server import RelayHandler, RelaySMTP
from relay.store import client as redis_client
from relay.store.client import RedisClient
from relay.store.embedded import EmbeddedRedis, EmbeddedRedisError
from relay.store.inbound import InboundLog
from relay.store.keys import Keys
from relay.store.ledger import Ledger
from relay.suppression.report import DailyCounters
from relay.suppression.store import SuppressionPolicy, SuppressionStore
from relay.suppression.unsubscribe import Unsubscriber

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Parts:
    """What a reload rebuilds: everything that depends only on the config file."""

    policy: Policy
    tokens: TokenCodec
    signer: Signer
    upstream: Upstream
    verp: Verp | None


def check_files(config: Config) -> None:
    """Load keys, certificate and users file once; raises ConfigError naming the key."""
    Signer.from_config(config.dkim)
    if config.smtp.tls is not None:
        _server_tls(config.smtp.tls)
    if config.smtp.auth_users_file is not None:
        Users.load(config.smtp.auth_users_file)


def _build_parts(config: Config) -> _Parts:
    return _Parts(
        policy=Policy(config.policy),
        tokens=TokenCodec(config.tokens),
        signer=Signer.from_config(config.dkim),
        upstream=Upstream(config.upstream, local_hostname=config.smtp.hostname),
        verp=Verp.from_config(config),
    )


class Relay:
    def __init__(self, config: Config, *, reuse_port: bool = False) -> None:
        """``reuse_port``: several worker processes share the listening ports."""
        self.config = config
        self._reuse_port = reuse_port
        self.metrics = Metrics()
        self._embedded: EmbeddedRedis | None = None
        self._redis: RedisClient | None = None
        self._smtp_server: asyncio.Server | None = None
        self._web_runner: web.AppRunner | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self.loop_lag: LoopLagMonitor | None = None
        self._consumers: list[StreamConsumer] = []
        self._consumer_tasks: list[asyncio.Task[None]] = []
        self._closers: list[WebhookSender] = []
        self._counters_task: asyncio.Task[None] | None = None
        self._follow_task: asyncio.Task[None] | None = None
        self._counters: DailyCounters | None = None
        self._parts: _Parts | None = None
        self.handler: RelayHandler | None = None
        self.inbound: InboundHandler | None = None
        self._inbound_server: asyncio.Server | None = None
        self.inbound_port = 0
        self._feedback: Feedback | None = None
        self.store: SuppressionStore | None = None
        self.retry: RetryQueue | None = None
        self.retry_worker: RetryWorker | None = None
        self.smtp_port = 0
        self.http_port = 0
        self.esp_intake: EspIntake | None = None

    @property
    def counters(self) -> DailyCounters:
        assert self._counters is not None, "start() first"
        return self._counters

    @property
    def signer(self) -> Signer:
        assert self._parts is not None
        return self._parts.signer

    @property
    def redis_url(self) -> str:
        if self._embedded is not None:
            return self._embedded.url
        return self.config.redis.url or f"sentinel:{self.config.redis.sentinel}"

    async def start(self) -> None:
        config = self.config
        parts = _build_parts(config)
        if config.redis.url is None and config.redis.sentinel is None:
            try:
                self._embedded = await asyncio.to_thread(EmbeddedRedis().start)
            except EmbeddedRedisError as exc:
                raise ConfigError("redis.url", f"not set, and no embedded Redis: {exc}") from None
            log.info("embedded redis started url=%s", self._embedded.url)
        self._redis = redis_client.connect_config(
            config.redis, self._embedded.url if self._embedded else None
        )
        await redis_client.prepare(self._redis)
        self._follow_task = asyncio.get_running_loop().create_task(
            redis_client.follow_master(self._redis)
        )
        self.store = SuppressionStore(
            self._redis,
            config.redis.key_prefix,
            policy=SuppressionPolicy.from_config(config.suppression),
        )
        self.retry = RetryQueue(self._redis, config.redis.key_prefix, config.retry)
        self._counters = DailyCounters(self._redis, config.redis.key_prefix)
        self._feedback = Feedback(
            self.store, config.bounces.thresholds, self._counters, self.metrics
        )
        self._parts = parts
        pipeline = self._pipeline(config, parts)
        users = Users.load(config.smtp.auth_users_file) if config.smtp.auth_users_file else None
        self.handler = RelayHandler(pipeline, config.smtp, self.metrics, users)
        tls_context = _server_tls(config.smtp.tls) if config.smtp.tls else None

        unsubscriber = Unsubscriber(
            parts.tokens, self.store, config.policy, self.metrics, self.counters
        )
        self._web = WebApp(unsubscriber, self.store, self.metrics, config.http.trusted_proxies)
        admin = (
            AdminApi(
                self.store,
                self.retry,
                config.http.admin_token,
                self._counters,
                metrics=self.metrics,
            )
            if config.http.admin_token is not None
            else None
        )
        self._web_runner = web.AppRunner(
            self._web.build(
                config.http.max_body_size, admin, self._esp_hooks(config, unsubscriber)
            ),
            access_log=None,
            handle_signals=False,
            max_headers=MAX_HEADERS,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
        )
        await self._web_runner.setup()
        site = web.TCPSite(
            self._web_runner,
            config.http.listen.host,
            config.http.listen.port,
            reuse_port=self._reuse_port or None,
        )
        await site.start()
        self.http_port = int(self._web_runner.addresses[0][1])

        if config.bounces.listen is not None:
            self.inbound = InboundHandler(
                self._intake(config, parts, unsubscriber), config.bounces.protocol == "lmtp"
            )
            self._inbound_server = await start_listener(
                self.inbound, config.bounces, config.smtp.hostname, reuse_port=self._reuse_port
            )
            self.inbound_port = _bound_port(self._inbound_server)

        handler = self.handler
        loop = asyncio.get_running_loop()
        implicit = config.smtp.tls is not None and config.smtp.tls.mode == "implicit"
        self._smtp_server = await loop.create_server(
            lambda: RelaySMTP(handler, config.smtp, tls_context),
            config.smtp.listen.host,
            config.smtp.listen.port,
            reuse_port=self._reuse_port or None,
            ssl=tls_context if implicit else None,
        )
        self.smtp_port = _bound_port(self._smtp_server)

        self.retry_worker = RetryWorker(
            self.retry, parts.upstream, self.metrics, config.retry.poll_interval
        )
        self.retry_worker.judge = self._retry_judge(config, parts)
        self._retry_task = loop.create_task(self.retry_worker.run())
        self.loop_lag = LoopLagMonitor(self.metrics)
        self._lag_task = loop.create_task(self.loop_lag.run())
        self._consumers, self._closers = build_consumers(
            self._redis,
            self.store.events_key,
            config.events,
            parts.upstream,
            config.smtp.hostname,
            self.metrics,
        )
        self._consumer_tasks = [loop.create_task(c.run()) for c in self._consumers]
        self._counters_task = loop.create_task(self.counters.run())
        log.info(
            "relay started smtp=%s:%d http=%s:%d upstream=%s:%d dkim_domains=%s inbound=%s verp=%s",
            config.smtp.listen.host,
            self.smtp_port,
            config.http.listen.host,
            self.http_port,
            config.upstream.host,
            config.upstream.port,
            ",".join(parts.signer.domains) or "-",
            f"{config.bounces.protocol}:{self.inbound_port}" if self.inbound else "-",
            config.bounces.return_path_domain or "-",
        )

    def _pipeline(self, config: Config, parts: _Parts) -> Pipeline:
        assert self.store is not None and self.retry is not None
        return Pipeline(
            config=config,
            policy=parts.policy,
            store=self.store,
            tokens=parts.tokens,
            signer=parts.signer,
            upstream=parts.upstream,
            retry=self.retry,
            metrics=self.metrics,
            counters=self.counters,
            verp=parts.verp,
            feedback=self._feedback,
        )

    def _intake(self, config: Config, parts: _Parts, unsubscriber: Unsubscriber) -> Intake:
        assert self._redis is not None and self.store is not None and self._feedback is not None
        return Intake(
            config=config,
            records=InboundLog(self._redis, Keys(config.redis.key_prefix)),
            store=self.store,
            unsubscriber=unsubscriber,
            feedback=self._feedback,
            verp=parts.verp,
            metrics=self.metrics,
        )

    def _esp_hooks(self, config: Config, unsubscriber: Unsubscriber) -> EspHooks | None:
        if not config.esp_webhooks:
            return None
        assert self._feedback is not None and self._counters is not None
        assert self.store is not None and self._redis is not None
        intake = EspIntake(
            feedback=self._feedback,
            store=self.store,
            unsubscriber=unsubscriber,
            counters=self._counters,
            ledger=Ledger(self._redis, Keys(config.redis.key_prefix)),
            metrics=self.metrics,
        )
        self.esp_intake = intake
        return EspHooks(config.esp_webhooks, intake, self.metrics)

    def _retry_judge(self, config: Config, parts: _Parts) -> RetryJudge:
        assert self._feedback is not None
        return RetryJudge(self._feedback, Classifier(config.bounces.classify), parts.verp)

    async def reload(self, config: Config) -> None:
        """Swap in a new config's policy, keys and upstream; listeners stay as they are."""
        assert self.handler is not None and self._parts is not None and self.store is not None
        for name in ("smtp", "http", "redis"):
            if getattr(config, name) != getattr(self.config, name):
                log.warning("reload: %s settings change only on restart", name)
        old_inbound = (self.config.bounces.listen, self.config.bounces.protocol)
        if (config.bounces.listen, config.bounces.protocol) != old_inbound:
            log.warning("reload: bounces.listen and bounces.protocol change only on restart")
        parts = _build_parts(config)
        old = self._parts
        self._parts = parts
        self.config = config
        self.store.set_policy(SuppressionPolicy.from_config(config.suppression))
        self._feedback = Feedback(
            self.store, config.bounces.thresholds, self.counters, self.metrics
        )
        self.handler.pipeline = self._pipeline(config, parts)
        self._web.unsubscriber = Unsubscriber(
            parts.tokens, self.store, config.policy, self.metrics, self.counters
        )
        if self.inbound is not None:
            self.inbound.intake = self._intake(config, parts, self._web.unsubscriber)
        if self.retry_worker is not None:
            self.retry_worker.upstream = parts.upstream
            self.retry_worker.judge = self._retry_judge(config, parts)
        await old.upstream.close()
        log.info(
            "reload done senders=%d dkim_keys=%d",
            len(config.policy.senders),
            len(config.dkim.keys),
        )

    async def stop(self) -> None:
        if self._smtp_server is not None:
            self._smtp_server.close()
        if self.handler is not None:
            left = await self.handler.drain(self.config.smtp.drain_timeout)
            if left:
                log.error("shutdown: %d transactions still running were cut", left)
        if self._inbound_server is not None:
            self._inbound_server.close()
        if self.inbound is not None:
            left = await self.inbound.drain(self.config.smtp.drain_timeout)
            if left:
                log.error("shutdown: %d inbound messages still being processed were cut", left)
        if self.retry_worker is not None:
            self.retry_worker.stop()
        if self.loop_lag is not None:
            self.loop_lag.stop()
        for consumer in self._consumers:
            consumer.stop()
        if self._counters is not None:
            self._counters.stop()
        tasks = (self._retry_task, self._lag_task, self._counters_task)
        background = {t for t in tasks if t is not None}
        background.update(self._consumer_tasks)
        if background:
            _, pending = await asyncio.wait(background, timeout=5)
            for task in pending:
                task.cancel()
        for closer in self._closers:
            await closer.close()
        if self._web_runner is not None:
            await self._web_runner.cleanup()
        if self._parts is not None:
            await self._parts.upstream.close()
        if self._follow_task is not None:
            self._follow_task.cancel()
        if self._redis is not None:
            await redis_client.close(self._redis)
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
            self._embedded = None
        log.info("relay stopped")


def _server_tls(config: SmtpTlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("smtp.tls.cert_file", f"cannot load certificate/key: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _bound_port(server: asyncio.Server) -> int:
    sock: socket.socket = server.sockets[0]
    return int(sock.getsockname()[1])


async def serve(
    config: Config,
    ready: Callable[[Relay], None] | None = None,
    *,
    reuse_port: bool = False,
) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the config file (the old one stays if bad)."""
    relay = Relay(config, reuse_port=reuse_port)
    await relay.start()
    # Everything built so far lives as long as the process: keep it out of the
    # collector's full passes, which otherwise pause the loop for 15-20 ms.
    gc.collect()
    gc.freeze()
    if ready is not None:
        ready(relay)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async def reload() -> None:
        sdnotify.notify("RELOADING=1")
        try:
            new = load_config(config.source)
            await relay.reload(new)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
        finally:
            sdnotify.notify("READY=1")

    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    sdnotify.notify(f"READY=1\nSTATUS=serving smtp {relay.smtp_port} http {relay.http_port}")
    await stopping.wait()
    sdnotify.notify("STOPPING=1")
    log.info("shutdown requested: no new connections, draining in-flight transactions")
    await relay.stop()
    return 0
