"""Building the redis-py asyncio client: standalone, Sentinel or Cluster, timeouts set once.

Every key the relay uses is laid out for Cluster (per-address keys with the
address as hash tag; the retry queue's keys share one tag), so the same code
runs against all three deployments.
"""

from __future__ import annotations

from typing import TypeAlias

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay.config import RedisConfig

RedisClient: TypeAlias = Redis | RedisCluster


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
