"""What a reload (SIGHUP) changes: the keys that apply live, and those that wait for a restart.

A key applies live when the parts that read it are rebuilt by a reload (policy,
tokens, DKIM keys, upstream, VERP, bounce rules, event consumers). A key is
*restart-only* when it is read once by something that lives as long as the process:
a listening socket, the Redis client, the retry worker's queue, the log handlers.
For those the running value stays, and the reload names each changed key in a log
line, so the running relay is always exactly one consistent config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from relay.config import Config, HostPort

T = TypeVar("T")

RESTART_ONLY: tuple[str, ...] = (
    "smtp",  # listening socket, TLS, AUTH users, limits, drain, workers, hostname
    "http.listen",
    "http.max_body_size",
    "http.admin_token",
    "http.metrics_token",
    "http.trusted_proxies",
    "redis.url",
    "redis.cluster",
    "redis.sentinel",
    "redis.key_prefix",
    "redis.timeout",
    "retry",
    "bounces.listen",
    "bounces.protocol",
    "bounces.max_message_size",
    "bounces.timeout",
    "log",
    "milter",  # the milter's listening socket and its session settings
    "esp_webhooks",  # the webhook routes and their keys are set up with the HTTP server
)
"""Dotted keys (or whole sections) read only at start; everything else applies live."""

_NOT_KEYS = frozenset({"source"})
_VALUES = (HostPort,)
"""Dataclasses that are one YAML value (``host:port``), not a section of keys."""


@dataclass(frozen=True, slots=True)
class Plan:
    """A reload worked out: the config to run, and what changed."""

    config: Config
    """The new file with every restart-only key at its running value."""
    live: tuple[str, ...]
    """Changed keys that the reload applies."""
    restart: tuple[str, ...]
    """Changed keys that keep their running value until a restart."""


def changed_keys(old: object, new: object, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ, descending into config sections."""
    if old == new:
        return []
    if (
        dataclasses.is_dataclass(old)
        and type(old) is type(new)
        and not isinstance(old, (type, *_VALUES))
    ):
        keys: list[str] = []
        for f in dataclasses.fields(old):
            if f.name in _NOT_KEYS:
                continue
            name = f"{prefix}.{f.name}" if prefix else f.name
            keys.extend(changed_keys(getattr(old, f.name), getattr(new, f.name), name))
        return keys
    return [prefix]


def is_restart_only(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESTART_ONLY)


def plan(baseline: Config, running: Config, new: Config) -> Plan:
    """Compare ``new`` with ``baseline`` (the file the relay was started or last reloaded
    with) and build the config to run: ``new``, restart-only keys taken from ``running``.

    ``running`` differs from ``baseline`` only where the process made a key concrete
    (``smtp.workers`` > 1 turns port 0 into a real port, an embedded Redis into a URL).
    """
    keys = changed_keys(baseline, new)
    effective = new
    for path in RESTART_ONLY:
        effective = _put(effective, path.split("."), _get(running, path.split(".")))
    return Plan(
        config=effective,
        live=tuple(k for k in keys if not is_restart_only(k)),
        restart=tuple(k for k in keys if is_restart_only(k)),
    )


def _get(obj: object, path: list[str]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def _put(obj: T, path: list[str], value: object) -> T:
    head, rest = path[0], path[1:]
    inner = value if not rest else _put(getattr(obj, head), rest, value)
    return dataclasses.replace(obj, **{head: inner})  # type: ignore[type-var]
