"""``smtp.workers``: N relay processes sharing the listening ports with SO_REUSEPORT.

The relay is stateless (all state is in Redis), so one host scales with its cores by
running one event loop per core. The parent process only supervises: it starts the
embedded Redis when ``redis.url`` is omitted (so every worker shares it), turns
port 0 into a real free port, forks the workers, forwards SIGTERM/SIGINT/SIGHUP to
them, and restarts a worker that died unexpectedly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
from typing import Protocol

from relay.config import Config, HostPort
from relay.errors import ConfigError
from relay.runtime.lifecycle import StartError, check_port
from relay.store.embedded import EmbeddedRedis, EmbeddedRedisError, free_port, start_error

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
EXIT_RUNTIME = 1
PR_SET_PDEATHSIG = 1  # linux/prctl.h
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported
MAX_RESTARTS_PER_MINUTE = 5


class EventLike(Protocol):
    def set(self) -> None: ...

    def is_set(self) -> bool: ...


def _child(config: Config, baseline: Config, started: EventLike) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    _die_with_parent()
    from relay.runtime.app import serve
    from relay.runtime.loop import run_async

    try:
        status = run_async(
            serve(config, lambda _: started.set(), reuse_port=True, baseline=baseline)
        )
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        status = EXIT_CONFIG
    except (StartError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = EXIT_RUNTIME
    raise SystemExit(status)


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies, even by SIGKILL (no orphans)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def mark_process_dead(pid: int | None) -> None:
    from prometheus_client.multiprocess import mark_process_dead as mark

    if pid is not None:
        mark(pid)  # type: ignore[no-untyped-call]


def preflight(config: Config) -> None:
    """Load everything a worker would load from files, so errors surface in the parent."""
    from relay.runtime.parts import check_files

    check_files(config)


def _concrete(listen: HostPort) -> HostPort:
    return listen if listen.port else HostPort(listen.host, free_port())


def run_workers(config: Config) -> int:
    """Serve with ``config.smtp.workers`` processes; returns the exit status.

    0 after a clean stop; 2 when a worker met a config error; 1 when a worker could
    not start (a port in use), when workers keep dying, or when a worker's drain cut
    transactions. The embedded Redis is stopped on every way out.
    """
    if config.smtp.workers <= 1:
        from relay.runtime.app import serve
        from relay.runtime.loop import run_async

        return run_async(serve(config))
    baseline = config
    metrics_dir = tempfile.TemporaryDirectory(prefix="oneclick-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir.name  # before prometheus_client is imported
    ctx = multiprocessing.get_context("fork")
    stopping = False
    status = 0
    deaths: list[float] = []
    procs: list[tuple[BaseProcess, EventLike]] = []
    embedded: EmbeddedRedis | None = None

    supervisor = os.getpid()

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if os.getpid() != supervisor:  # a worker between fork and its own handlers
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc, _ in procs:
            if proc.pid and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    def stop_all(exit_status: int) -> None:
        nonlocal status, stopping
        status = max(status, exit_status)
        stopping = True
        forward(signal.SIGTERM, None)

    # Before anything is started: a SIGTERM from now on stops what has started.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, forward)
    try:
        preflight(config)  # key, certificate and users-file errors exit 2 before any fork
        config = _concrete_ports(config)
        for key, listen in _listeners(config):
            check_port(key, listen)  # a port in use: one line, exit 1, nothing started
        if config.redis.url is None and config.redis.sentinel is None:
            try:
                embedded = EmbeddedRedis(data_dir=config.redis.data_dir)
                embedded.start()
                log.warning("embedded redis started: %s", embedded.describe())
            except EmbeddedRedisError as exc:
                raise start_error(config.redis.data_dir, exc) from None
            config = replace(config, redis=replace(config.redis, url=embedded.url))

        def start() -> tuple[BaseProcess, EventLike]:
            started = ctx.Event()
            proc = ctx.Process(target=_child, args=(config, baseline, started), daemon=False)
            proc.start()
            return proc, started

        for _ in range(config.smtp.workers):
            if not stopping:
                procs.append(start())
        log.info(
            "started %d workers smtp=%s http=%s", len(procs), config.smtp.listen, config.http.listen
        )
        while procs:
            for entry in list(procs):
                proc, started = entry
                proc.join(timeout=0.2)
                if proc.exitcode is None:
                    continue
                mark_process_dead(proc.pid)
                procs.remove(entry)
                code = proc.exitcode
                if stopping:
                    if code != 0:  # a cut drain (the worker said how many), or no start
                        status = max(status, EXIT_RUNTIME)
                        if started.is_set():
                            log.error("worker pid=%s stopped with status %s", proc.pid, code)
                elif code == EXIT_CONFIG:
                    log.error("worker exited with a config error; stopping")
                    stop_all(EXIT_CONFIG)
                elif not started.is_set():
                    log.error("worker pid=%s could not start (status %s); stopping", proc.pid, code)
                    stop_all(EXIT_RUNTIME)
                else:
                    now = time.monotonic()
                    deaths[:] = [t for t in deaths if now - t < 60] + [now]
                    if len(deaths) > MAX_RESTARTS_PER_MINUTE:
                        log.error("workers keep dying; stopping so the supervisor can act")
                        stop_all(EXIT_RUNTIME)
                        continue
                    log.error("worker pid=%s died status=%s; restarting", proc.pid, code)
                    time.sleep(0.5)
                    if not stopping:
                        procs.append(start())
        return status
    finally:
        for proc, _ in procs:  # only after an error in this loop: leave no worker behind
            proc.terminate()
            proc.join(10)
        if embedded is not None:
            embedded.stop()
        metrics_dir.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _listeners(config: Config) -> list[tuple[str, HostPort]]:
    found = [("http.listen", config.http.listen)]
    if config.smtp.listen is not None:
        found.append(("smtp.listen", config.smtp.listen))
    if isinstance(config.milter.listen, HostPort):
        found.append(("milter.listen", config.milter.listen))
    if config.bounces.listen is not None:
        found.append(("bounces.listen", config.bounces.listen))
    return found


def _concrete_ports(config: Config) -> Config:
    """Port 0 becomes one free port that every worker listens on."""
    smtp = config.smtp.listen
    config = replace(
        config,
        smtp=replace(config.smtp, listen=_concrete(smtp) if smtp is not None else None),
        http=replace(config.http, listen=_concrete(config.http.listen)),
    )
    if isinstance(config.milter.listen, HostPort):
        milter = replace(config.milter, listen=_concrete(config.milter.listen))
        config = replace(config, milter=milter)
    if config.bounces.listen is not None:
        bounces = replace(config.bounces, listen=_concrete(config.bounces.listen))
        config = replace(config, bounces=bounces)
    return config
