"""The running relay: its parts entered into one ``AsyncExitStack``, left in reverse.

Start order (each step is undone by the stop, in reverse):

1. files: DKIM keys, TLS certificate, AUTH users (a bad one stops here, nothing started)
2. embedded Redis, when ``redis.url`` and ``redis.sentinel`` are omitted
3. the Redis client (and the Sentinel master follower)
4. the upstream pool (closed when everything that sends has stopped)
5. daily counters (flushed one last time after everything that counts)
6. retry worker
7. event consumers (webhook, notification mail)
8. HTTP (one-click, admin, ESP webhooks, metrics)
9. inbound listener (bounces, complaints, mailto)
10. milter (``milter.listen``)
11. SMTP (unless ``smtp.listen`` is null: a milter-only host)
12. event-loop lag monitor

So a stop first closes the SMTP port and lets in-flight transactions finish
(``smtp.drain_timeout``), then the milter and the inbound listener the same way, then HTTP, the
consumers, the retry worker, the counters, the upstream, Redis. A start that fails
at any step unwinds exactly the steps before it. A reload (``reload()``) builds new
live parts (``relay.runtime.parts.Live``) and swaps them in; ``relay.runtime.reload``
says which keys apply live and which wait for a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import resource
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from aiohttp import web

from relay.config import Config, Network, load_config
from relay.errors import ConfigError
from relay.feedback.esp.intake import EspIntake
from relay.http.admin import AdminApi
from relay.http.connections import body_deadline, gated
from relay.http.hooks import EspHooks
from relay.http.web import MAX_HEADERS, MAX_LINE, WebApp
from relay.inbound.listener import InboundHandler, start_listener
from relay.limits import ConnectionLimiter
from relay.mail.dkim import Signer
from relay.metrics import Metrics
from relay.milter.server import MilterFrontEnd
from relay.outbound.events import build_consumers
from relay.outbound.retry import RetryQueue, RetryWorker
from relay.outbound.upstream import Upstream
from relay.runtime import parts, sdnotify
from relay.runtime import reload as reloading
from relay.runtime.lifecycle import Drained, background, bound_port, cannot_listen, listening
from relay.runtime.looplag import LoopLagMonitor
from relay.smtp.server import RelayHandler, RelaySMTP
from relay.store.client import RedisClient
from relay.suppression.report import DailyCounters
from relay.suppression.store import SuppressionPolicy, SuppressionStore
from relay.suppression.unsubscribe import JournalReplayer

log = logging.getLogger(__name__)

check_files = parts.check_files


@dataclass(frozen=True, slots=True)
class _Running:
    """What a start built that lives until the stop; a reload re-points its holders."""

    stores: parts.Stores
    redis_url: str
    handler: RelayHandler
    web_app: WebApp
    web_runner: web.AppRunner
    hooks: EspHooks | None
    inbound: InboundHandler | None
    milter: MilterFrontEnd | None
    retry_worker: RetryWorker
    loop_lag: LoopLagMonitor
    smtp_port: int
    http_port: int
    inbound_port: int
    milter_port: int
    """0 for a Unix socket."""


class Relay:
    def __init__(
        self, config: Config, *, reuse_port: bool = False, baseline: Config | None = None
    ) -> None:
        """``reuse_port``: several worker processes share the listening ports.

        ``baseline``: the config as the file said it, when ``config`` was made concrete
        by the supervisor (ports, the embedded Redis URL); a reload is compared with it.
        """
        self.config = config
        self.metrics = Metrics()
        self.drained = Drained()
        self._baseline = baseline or config
        self._reuse_port = reuse_port
        self._stack: AsyncExitStack | None = None
        self._running: _Running | None = None
        self._live: parts.Live | None = None
        self._events: AsyncExitStack | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._http_port = 0

    # -- what tests, the demo and the benchmarks read -----------------------------------

    def _started(self) -> _Running:
        if self._running is None:
            raise RuntimeError("the relay is not started")
        return self._running

    @property
    def started(self) -> bool:
        """Between the end of ``start()`` and the beginning of ``stop()``."""
        return self._stack is not None

    @property
    def smtp_port(self) -> int:
        return self._running.smtp_port if self._running else 0

    @property
    def http_port(self) -> int:
        return self._running.http_port if self._running else 0

    @property
    def inbound_port(self) -> int:
        return self._running.inbound_port if self._running else 0

    @property
    def milter_port(self) -> int:
        return self._running.milter_port if self._running else 0

    @property
    def milter(self) -> MilterFrontEnd | None:
        return self._started().milter

    @property
    def redis_url(self) -> str:
        return self._started().redis_url

    @property
    def redis(self) -> RedisClient:
        return self._started().stores.redis

    @property
    def store(self) -> SuppressionStore:
        return self._started().stores.store

    @property
    def retry(self) -> RetryQueue:
        return self._started().stores.retry

    @property
    def counters(self) -> DailyCounters:
        return self._started().stores.counters

    @property
    def handler(self) -> RelayHandler:
        return self._started().handler

    @property
    def inbound(self) -> InboundHandler | None:
        return self._started().inbound

    @property
    def esp_intake(self) -> EspIntake | None:
        running = self._started()
        return running.hooks.intake if running.hooks is not None else None

    @property
    def retry_worker(self) -> RetryWorker:
        return self._started().retry_worker

    @property
    def loop_lag(self) -> LoopLagMonitor:
        return self._started().loop_lag

    @property
    def web_runner(self) -> web.AppRunner:
        return self._started().web_runner

    @property
    def live(self) -> parts.Live:
        if self._live is None:
            raise RuntimeError("the relay is not started")
        return self._live

    @property
    def signer(self) -> Signer:
        return self.live.signer

    @property
    def upstream(self) -> Upstream:
        return self.live.upstream

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every part in order; when one fails, stop those started before it."""
        if self._stack is not None:
            raise RuntimeError("the relay is already started")
        async with AsyncExitStack() as stack:
            await self._enter(stack)
            self._stack = stack.pop_all()

    async def stop(self) -> None:
        """Stop every part in reverse order (safe to call twice, or before a start)."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        await stack.aclose()
        log.info("relay stopped")

    async def _enter(self, stack: AsyncExitStack) -> None:
        config, metrics = self.config, self.metrics
        files = parts.load_files(config)  # every file read before anything starts
        signer = Signer.from_config(config.dkim)

        url = None
        if parts.needs_embedded(config):
            embedded = parts.embedded_redis(config.redis.data_dir)
            url = (await stack.enter_async_context(embedded)).url
        stores = await stack.enter_async_context(parts.open_stores(config, url))
        live = self._live = parts.live(config, stores, metrics, signer=signer)
        stack.push_async_callback(self._close_upstreams)

        counters = stores.counters
        await stack.enter_async_context(background("counters", counters.run, counters.stop))
        problem = stores.journal.check_writable()
        if problem:
            log.error(
                "state_dir: %s; unsubscribes cannot be kept while Redis is unreachable", problem
            )
        replayer = JournalReplayer(stores.journal, stores.store, metrics, counters)
        await stack.enter_async_context(background("journal-replay", replayer.run, replayer.stop))
        retry_worker = RetryWorker(stores.retry, live.upstream, metrics, config.retry.poll_interval)
        retry_worker.judge = live.judge
        await stack.enter_async_context(
            background("retry-worker", retry_worker.run, retry_worker.stop)
        )
        stack.push_async_callback(self._close_events)
        await self._open_events(stores, live)

        web_app = WebApp(
            live.handling.unsubscriber,
            stores.store,
            metrics,
            config.http.trusted_proxies,
            metrics_token=config.http.metrics_token,
            journal=replayer,
        )
        hooks = (
            EspHooks(config.esp_webhooks, live.handling.esp, metrics)
            if config.esp_webhooks
            else None
        )
        runner = await stack.enter_async_context(self._http(stores, web_app, hooks))

        inbound, inbound_port = None, 0
        drain = config.smtp.drain_timeout
        bounces = config.bounces
        if bounces.listen is not None:
            inbound = InboundHandler(
                live.handling.intake, bounces.protocol == "lmtp", bounces, metrics
            )
            listener = await stack.enter_async_context(
                listening(
                    "bounces.listen",
                    bounces.listen,
                    lambda: start_listener(
                        inbound,
                        bounces,
                        config.smtp.hostname,
                        reuse_port=self._reuse_port,
                        tls_context=files.inbound_tls,
                    ),
                    inbound.drain,
                    drain,
                    self.drained,
                    "inbound messages",
                )
            )
            inbound_port = bound_port(listener)

        milter, milter_port = None, 0
        if config.milter.listen is not None:
            milter = MilterFrontEnd(live.pipeline, config.milter, config.smtp, metrics)
            where = config.milter.listen
            if isinstance(where, Path):  # runs after the server closed
                stack.callback(where.unlink, missing_ok=True)
            server = await stack.enter_async_context(
                listening(
                    "milter.listen",
                    where,
                    lambda: milter.start(reuse_port=self._reuse_port),
                    milter.drain,
                    drain,
                    self.drained,
                    "milter messages",
                )
            )
            milter_port = 0 if isinstance(where, Path) else bound_port(server)

        handler = RelayHandler(live.pipeline, config.smtp, metrics, files.users)
        smtp_port = 0
        if config.smtp.listen is not None:
            smtp = await stack.enter_async_context(
                listening(
                    "smtp.listen",
                    config.smtp.listen,
                    lambda: self._smtp_server(handler, files),
                    handler.drain,
                    drain,
                    self.drained,
                    "transactions",
                )
            )
            smtp_port = bound_port(smtp)
        loop_lag = LoopLagMonitor(metrics)
        await stack.enter_async_context(background("loop-lag", loop_lag.run, loop_lag.stop))

        self._running = _Running(
            stores=stores,
            redis_url=url or config.redis.url or f"sentinel:{config.redis.sentinel}",
            handler=handler,
            web_app=web_app,
            web_runner=runner,
            hooks=hooks,
            inbound=inbound,
            milter=milter,
            retry_worker=retry_worker,
            loop_lag=loop_lag,
            smtp_port=smtp_port,
            http_port=self._http_port,
            inbound_port=inbound_port,
            milter_port=milter_port,
        )
        at = config.milter.listen
        log.info(
            "relay started smtp=%s http=%s:%d upstream=%s:%d dkim_domains=%s inbound=%s verp=%s"
            " milter=%s",
            f"{config.smtp.listen.host}:{smtp_port}" if config.smtp.listen else "-",
            config.http.listen.host,
            self.http_port,
            config.upstream.host,
            config.upstream.port,
            ",".join(live.signer.domains) or "-",
            f"{config.bounces.protocol}:{inbound_port}" if inbound else "-",
            config.bounces.return_path_domain or "-",
            (f"unix:{at}" if isinstance(at, Path) else f"{at.host}:{milter_port}")
            if at is not None
            else "-",
        )

    async def _smtp_server(self, handler: RelayHandler, files: parts.Files) -> asyncio.Server:
        smtp = self.config.smtp
        assert smtp.listen is not None
        implicit = smtp.tls is not None and smtp.tls.mode == "implicit"
        return await asyncio.get_running_loop().create_server(
            lambda: RelaySMTP(handler, smtp, files.tls),
            smtp.listen.host,
            smtp.listen.port,
            reuse_port=self._reuse_port or None,
            ssl=files.tls if implicit else None,
        )

    @contextlib.asynccontextmanager
    async def _http(
        self, stores: parts.Stores, web_app: WebApp, hooks: EspHooks | None
    ) -> AsyncIterator[web.AppRunner]:
        http = self.config.http
        admin = (
            AdminApi(
                stores.store,
                stores.retry,
                http.admin_token,
                stores.counters,
                metrics=self.metrics,
            )
            if http.admin_token is not None
            else None
        )
        application = web_app.build(http.max_body_size, admin, hooks)
        application.middlewares.append(body_deadline(http.body_timeout, self.metrics))
        runner = web.AppRunner(
            application,
            access_log=None,
            handle_signals=False,
            max_headers=MAX_HEADERS,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            keepalive_timeout=http.header_timeout,
        )
        await runner.setup()
        server: asyncio.Server | None = None
        try:
            trusted = http.trusted_proxies
            limiter = ConnectionLimiter(
                http.max_connections,
                http.max_connections_per_client,
                exempt=lambda client: _in_networks(client, trusted),
            )
            assert runner.server is not None
            try:
                server = await asyncio.get_running_loop().create_server(
                    gated(runner.server, limiter, self.metrics),
                    http.listen.host,
                    http.listen.port,
                    reuse_port=self._reuse_port or None,
                )
            except OSError as exc:
                raise cannot_listen("http.listen", http.listen, exc) from None
            self._http_port = bound_port(server)
            yield runner
        finally:
            if server is not None:
                server.close()
            await runner.cleanup()

    async def _open_events(self, stores: parts.Stores, live: parts.Live) -> None:
        consumers, closers = build_consumers(
            stores.redis,
            stores.store.events_key,
            live.config.events,
            live.upstream,
            live.config.smtp.hostname,
            self.metrics,
        )
        async with AsyncExitStack() as stack:
            for closer in closers:
                stack.push_async_callback(closer.close)
            for index, consumer in enumerate(consumers):
                await stack.enter_async_context(
                    background(f"events-{index}", consumer.run, consumer.stop)
                )
            self._events = stack.pop_all()

    async def _close_events(self) -> None:
        events, self._events = self._events, None
        if events is not None:
            await events.aclose()

    async def _close_upstreams(self) -> None:
        if self._retiring:
            await asyncio.wait(set(self._retiring))
        if self._live is not None:
            await self._live.upstream.close()

    # -- reload -------------------------------------------------------------------------

    async def reload(self, config: Config) -> None:
        """Build new live parts from ``config`` and swap them in; say what waits for a restart.

        Raises ConfigError (a key file that does not load) with nothing changed.
        """
        running, old = self._started(), self.live
        plan = reloading.plan(self._baseline, self.config, config)
        keep = old.upstream if plan.config.upstream == old.config.upstream else None
        live = parts.live(plan.config, running.stores, self.metrics, upstream=keep)
        suppression = SuppressionPolicy.from_config(plan.config.suppression)

        self._live, self.config, self._baseline = live, plan.config, config
        running.stores.store.set_policy(suppression)
        running.handler.pipeline = live.pipeline
        if running.milter is not None:
            running.milter.pipeline = live.pipeline
        running.web_app.unsubscriber = live.handling.unsubscriber
        if running.inbound is not None:
            running.inbound.intake = live.handling.intake
        if running.hooks is not None:
            running.hooks.intake = live.handling.esp
        running.retry_worker.upstream = live.upstream
        running.retry_worker.judge = live.judge
        if live.config.events != old.config.events or live.upstream is not old.upstream:
            await self._close_events()
            await self._open_events(running.stores, live)
        for key in plan.restart:
            log.warning("reload: %s changed; it applies after a restart (running value kept)", key)
        log.info(
            "reload done senders=%d dkim_keys=%d applied=%s",
            len(config.policy.senders),
            len(config.dkim.keys),
            ",".join(plan.live) or "-",
        )
        if live.upstream is not old.upstream:
            await self._retire(old.upstream)

    async def _retire(self, upstream: Upstream) -> None:
        """Close a replaced upstream pool once the transactions already using it are done."""
        running = self._started()
        inflight = set(running.handler.inflight)
        if running.inbound is not None:
            inflight |= running.inbound.inflight
        if running.milter is not None:
            inflight |= running.milter.inflight

        async def close() -> None:
            if inflight:
                await asyncio.wait(inflight, timeout=self.config.smtp.drain_timeout)
            await upstream.close()

        task = asyncio.get_running_loop().create_task(close(), name="upstream-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        await asyncio.shield(task)


def _raise_file_limit(config: Config) -> None:
    """Lift the soft RLIMIT_NOFILE to the hard one; warn if the caps could still exceed it.

    The connection caps refuse a connection with 421/503 before the process runs out
    of descriptors (EMFILE makes accept() fail for every listener at once), provided
    they add up to less than the limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    inbound = config.bounces.max_connections if config.bounces.listen is not None else 0
    needed = (
        config.smtp.max_connections
        + config.http.max_connections
        + inbound
        + 2 * config.upstream.connections
        + 64  # Redis, files, the admin's background work
    )
    if needed > soft:
        log.warning(
            "open file limit %d is below the connection caps (smtp.max_connections,"
            " http.max_connections, bounces.max_connections) plus pools: %d;"
            " raise LimitNOFILE or lower the caps",
            soft,
            needed,
        )


def _in_networks(client: str, networks: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(address in network for network in networks)


async def serve(
    config: Config,
    ready: Callable[[Relay], None] | None = None,
    *,
    reuse_port: bool = False,
    baseline: Config | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the config file (the old one stays if bad).

    Returns 0, or 1 when the drain overran ``smtp.drain_timeout`` and cut transactions.
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the start: a SIGTERM then still stops
        loop.add_signal_handler(sig, stopping.set)
    _raise_file_limit(config)
    relay = Relay(config, reuse_port=reuse_port, baseline=baseline)
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        sdnotify.notify("RELOADING=1")
        try:
            new = load_config(config.source)
            await relay.reload(new)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
        finally:
            sdnotify.notify("READY=1")

    def on_hup() -> None:
        if not relay.started or stopping.is_set():
            log.warning(
                "reload ignored: the relay is %s", "running" if relay.started else "starting"
            )
            return
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await relay.start()
        try:
            # Everything built so far lives as long as the process: keep it out of the
            # collector's full passes, which otherwise pause the loop for 15-20 ms.
            gc.collect()
            gc.freeze()
            if ready is not None:
                ready(relay)
            milter = relay.milter_port or ("unix" if relay.config.milter.listen else "-")
            sdnotify.notify(
                f"READY=1\nSTATUS=serving smtp {relay.smtp_port or '-'} http {relay.http_port}"
                f" milter {milter}"
            )
            await stopping.wait()
            sdnotify.notify("STOPPING=1")
            log.info("shutdown requested: no new connections, draining in-flight transactions")
            if reloads:
                await asyncio.wait(set(reloads))
        finally:
            await relay.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    if relay.drained.cut:
        log.error(
            "shutdown: exit status 1: %d transaction(s) cut after smtp.drain_timeout=%gs",
            relay.drained.cut,
            config.smtp.drain_timeout,
        )
        return 1
    return 0
