"""Building the redis-py asyncio client: standalone, Sentinel or Cluster, timeouts set once.

Every key the relay uses is laid out for Cluster (per-address keys with the
address as hash tag; the retry queue's keys share one tag), so the same code
runs against all three deployments.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import TypeAlias

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ChildDeadlockedError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay.config import RedisConfig
from relay.errors import StoreUnavailable
from relay.eventlog import EventLog

RedisClient: TypeAlias = Redis | RedisCluster

log = EventLog(__name__)

REDIS_ERRORS = (RedisError, RedisClusterException, ChildDeadlockedError)
"""What a Redis call raises when the server cannot answer (the Cluster one and the
pool's after-fork one are no RedisError)."""


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)


def connect(url: str, timeout: float) -> Redis:
    """A standalone client that fails fast (``timeout``) and reconnects by itself."""
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=15,
        decode_responses=False,
    )


def connect_config(config: RedisConfig, url: str | None = None) -> RedisClient:
    """The client for ``redis:``; ``url`` overrides ``redis.url`` (the embedded server)."""
    if config.sentinel is not None:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            [(a.host, a.port) for a in config.sentinel.addresses],
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
        )
        client: Redis = sentinel.master_for(
            config.sentinel.master,
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
            retry=_retry(),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            db=config.sentinel.db,
        )
        return client
    target = url or config.url
    assert target is not None
    if config.cluster:
        return RedisCluster.from_url(
            target,
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
            retry=_retry(),
        )
    return connect(target, config.timeout)


async def prepare(client: RedisClient) -> None:
    """Cluster: load the slot map before the first, concurrent, commands.

    A cold redis-py ``RedisCluster`` sends its first commands to the wrong node; after
    five MOVED replies it closes every node connection, cutting the commands of other
    tasks in flight.
    """
    if isinstance(client, RedisCluster):
        try:
            await client.initialize()
        except REDIS_ERRORS as exc:
            log.warning("redis cluster not reachable at start", error=type(exc).__name__)


async def follow_master(client: RedisClient, interval: float = 0.5) -> None:
    """Sentinel: after a master switch, drop every pooled connection.

    The old master keeps taking writes until the Sentinel demotes it, then loses
    them; pooled connections would otherwise keep writing there. Runs until
    cancelled; returns at once for other deployments.
    """
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, SentinelConnectionPool):
        return
    while True:
        await asyncio.sleep(interval)
        try:
            address = await pool.sentinel_manager.discover_master(pool.service_name)
        except REDIS_ERRORS:
            continue
        if pool.master_address is not None and address != pool.master_address:
            log.warning("redis master switched", host=address[0], port=address[1])
            pool.master_address = address
            await pool.disconnect(inuse_connections=True)


async def close(client: RedisClient) -> None:
    """Close the client, and for Sentinel the connections to the Sentinels too."""
    await client.aclose()
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


@contextlib.contextmanager
def unavailable(what: str) -> Iterator[None]:
    """The one place a redis-py error becomes ``StoreUnavailable``.

    Every Redis call of the relay runs inside it, so the layers above see only the
    relay's exception tree; the message names the operation and the error's type,
    never a key or a value.
    """
    try:
        yield
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"{what}: {type(exc).__name__}") from exc
