"""Connection caps and per-client rates: what each listener admits before it reads a byte.

Every listener (SMTP, HTTP, the inbound MX) holds a ``ConnectionLimiter``: at most
``total`` open connections and ``per_client`` from one address. A connection over
either cap is answered at once with a clear refusal (SMTP ``421 4.7.0``, HTTP
``503``) and closed, so a flood of idle sockets runs into the cap long before the
process runs out of file descriptors (``EMFILE``). ``RateLimiter`` counts events per
client in a sliding minute (messages on the inbound listener, failed AUTH).
Pure bookkeeping, no I/O, so any layer may use it.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

Refusal = Literal["listener", "client"]


def client_key(peer: object) -> str:
    """The address a cap counts by: the IP (an IPv6 client by its /64), or ``local``."""
    if not isinstance(peer, tuple) or not peer:
        return "local"
    try:
        address = ipaddress.ip_address(str(peer[0]))
    except ValueError:
        return str(peer[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class ConnectionLimiter:
    def __init__(self, total: int, per_client: int, exempt: Callable[[str], bool] | None = None):
        """``exempt``: clients without a per-client cap (a trusted reverse proxy)."""
        self.total = total
        self.per_client = per_client
        self._exempt = exempt
        self._open = 0
        self._by_client: dict[str, int] = {}

    @property
    def open(self) -> int:
        return self._open

    def admit(self, client: str) -> Refusal | None:
        """Count a new connection from ``client``; the cap it hit when refused."""
        if self._open >= self.total:
            return "listener"
        count = self._by_client.get(client, 0)
        if count >= self.per_client and not (self._exempt is not None and self._exempt(client)):
            return "client"
        self._open += 1
        self._by_client[client] = count + 1
        return None

    def release(self, client: str) -> None:
        self._open -= 1
        count = self._by_client.get(client, 0) - 1
        if count > 0:
            self._by_client[client] = count
        else:
            self._by_client.pop(client, None)


class RateLimiter:
    """At most ``limit`` events per client in any ``window`` seconds."""

    def __init__(
        self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._events: dict[str, deque[float]] = {}

    def _recent(self, client: str) -> deque[float]:
        now = self._clock()
        events = self._events.setdefault(client, deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        if len(self._events) > 10_000:  # forget idle clients so the table stays bounded
            for key in [k for k, v in self._events.items() if not v and k != client]:
                del self._events[key]
        return events

    def allow(self, client: str) -> bool:
        """True (and counted) if ``client`` is under its limit."""
        events = self._recent(client)
        if len(events) >= self.limit:
            return False
        events.append(self._clock())
        return True

    def count(self, client: str) -> int:
        return len(self._recent(client))

    def add(self, client: str) -> int:
        """Count one event regardless of the limit; the events in the window now."""
        events = self._recent(client)
        events.append(self._clock())
        return len(events)
