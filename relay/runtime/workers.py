"""``smtp.workers``: N relay processes sharing the listening ports with SO_REUSEPORT.

The relay is stateless (all state is in Redis), so one host scales with its cores by
running one event loop per core. The parent process only supervises: it starts the
embedded Redis when ``redis.url`` is omitted (so every worker shares it), turns
port 0 into a real free port, forks the workers, forwards SIGTERM/SIGINT/SIGHUP to
them, and restarts a worker that died unexpectedly.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from dataclasses import replace
from multiprocessing.process import BaseProcess
from types import FrameType

from relay.config import Config, HostPort
from relay.errors import ConfigError
from relay.store.embedded import EmbeddedRedis, EmbeddedRedisError, free_port

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported
MAX_RESTARTS_PER_MINUTE = 5


def _child(config: Config) -> None:
    from relay.runtime.app import serve
    from relay.runtime.loop import run_async

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        status = run_async(serve(config, reuse_port=True))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        status = EXIT_CONFIG
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        status = EXIT_CONFIG
    raise SystemExit(status)


def mark_process_dead(pid: int | None) -> None:
    from prometheus_client.multiprocess import mark_process_dead as mark

    if pid is not None:
        mark(pid)  # type: ignore[no-untyped-call]


def preflight(config: Config) -> None:
    """Load everything a worker would load from files, so errors surface in the parent."""
    from relay.runtime.app import check_files

    check_files(config)


def _concrete(listen: HostPort) -> HostPort:
    return listen if listen.port else HostPort(listen.host, free_port())


def run_workers(config: Config) -> int:
    """Serve with ``config.smtp.workers`` processes; returns the exit status."""
    if config.smtp.workers <= 1:
        from relay.runtime.app import serve
        from relay.runtime.loop import run_async

        return run_async(serve(config))
    metrics_dir = tempfile.TemporaryDirectory(prefix="oneclick-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir.name  # before prometheus_client is imported
    preflight(config)  # key, certificate and users-file errors exit 2 before any fork

    embedded = None
    if config.redis.url is None and config.redis.sentinel is None:
        try:
            embedded = EmbeddedRedis().start()
        except EmbeddedRedisError as exc:
            raise ConfigError("redis.url", f"not set, and no embedded Redis: {exc}") from None
        config = replace(config, redis=replace(config.redis, url=embedded.url))
    config = replace(
        config,
        smtp=replace(config.smtp, listen=_concrete(config.smtp.listen)),
        http=replace(config.http, listen=_concrete(config.http.listen)),
    )
    if config.bounces.listen is not None:  # every worker shares the inbound port too
        bounces = replace(config.bounces, listen=_concrete(config.bounces.listen))
        config = replace(config, bounces=bounces)
    ctx = multiprocessing.get_context("fork")
    stopping = False
    status = 0
    deaths: list[float] = []
    procs: list[BaseProcess] = []

    def start() -> BaseProcess:
        proc = ctx.Process(target=_child, args=(config,), daemon=False)
        proc.start()
        return proc

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc in procs:
            if proc.pid and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    try:
        procs.extend(start() for _ in range(config.smtp.workers))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        log.info(
            "started %d workers smtp=%s http=%s", len(procs), config.smtp.listen, config.http.listen
        )
        while procs:
            for proc in list(procs):
                proc.join(timeout=0.2)
                if proc.exitcode is None:
                    continue
                mark_process_dead(proc.pid)
                if stopping:
                    procs.remove(proc)
                elif proc.exitcode == EXIT_CONFIG:
                    log.error("worker exited with a config error; stopping")
                    status = EXIT_CONFIG
                    stopping = True
                    forward(signal.SIGTERM, None)
                    procs.remove(proc)
                else:
                    now = time.monotonic()
                    deaths[:] = [t for t in deaths if now - t < 60] + [now]
                    if len(deaths) > MAX_RESTARTS_PER_MINUTE:
                        log.error("workers keep dying; stopping so the supervisor can act")
                        status = 1
                        stopping = True
                        forward(signal.SIGTERM, None)
                        procs.remove(proc)
                        continue
                    log.error("worker pid=%s died status=%s; restarting", proc.pid, proc.exitcode)
                    time.sleep(0.5)
                    procs[procs.index(proc)] = start()
        return status
    finally:
        if embedded is not None:
            embedded.stop()
        metrics_dir.cleanup()
