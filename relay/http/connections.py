"""Connection caps and read deadlines for the HTTP listener (aiohttp has neither).

aiohttp's own server accepts any number of connections and, by default, waits an
hour for a request head that never completes. Here every accepted socket passes
a ``ConnectionLimiter`` first (over a cap: ``503`` and close, before aiohttp sees
it); aiohttp's keep-alive timer, armed at connect and after each response, is set
to ``http.header_timeout`` so a partial or absent request head is closed then; and
``body_deadline`` gives a one-click POST ``http.body_timeout`` to deliver its body
(then ``408``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from relay.eventlog import EventLog
from relay.limits import ConnectionLimiter, client_key
from relay.metrics import Metrics

log = EventLog(__name__)

_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Retry-After: 5\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 47\r\n\r\n"
    b"Too many connections, please try again later.\r\n"
)


class _Gate(asyncio.Protocol):
    """Admits the connection into aiohttp's protocol, or answers 503 and closes it."""

    def __init__(
        self,
        server: Callable[[], asyncio.Protocol],
        limiter: ConnectionLimiter,
        metrics: Metrics,
    ) -> None:
        self._server = server
        self._limiter = limiter
        self._metrics = metrics
        self._inner: asyncio.Protocol | None = None
        self._client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        client = client_key(transport.get_extra_info("peername"))
        refusal = self._limiter.admit(client)
        if refusal is not None:
            self._metrics.connections_refused.labels("http", refusal).inc()
            self._metrics.http_rejected.labels("503").inc()
            log.warning("http refused", client=client, reason="too-many-connections", cap=refusal)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_REFUSAL)
            transport.close()
            return
        self._client = client
        self._inner = self._server()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        self._limiter.release(self._client)
        inner, self._inner = self._inner, None
        inner.connection_lost(exc)


def gated(
    server: Callable[[], asyncio.Protocol], limiter: ConnectionLimiter, metrics: Metrics
) -> Callable[[], asyncio.Protocol]:
    """A protocol factory for ``loop.create_server`` in front of aiohttp's ``web.Server``."""
    return lambda: _Gate(server, limiter, metrics)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def body_deadline(seconds: float, metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware: a public request with a body has ``seconds`` to send it and be answered."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.body_exists or request.path.startswith("/admin"):
            return await handler(request)
        try:
            async with asyncio.timeout(seconds):
                return await handler(request)
        except TimeoutError:
            metrics.http_rejected.labels("408").inc()
            log.info("http refused", path=request.path[:64], reason="body-timeout")
            return web.Response(
                text="Request body not received in time.\n",
                status=408,
                headers={"Connection": "close"},
            )

    return middleware
