"""The pieces a lifecycle is made of: background tasks and listeners as async context managers.

Each is entered into the relay's ``AsyncExitStack`` when it starts and left in
reverse order, so a start that fails half-way undoes exactly what had started,
and a stop is the same unwinding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from relay.config import HostPort
from relay.errors import RelayError

log = logging.getLogger(__name__)

STOP_GRACE = 5.0
"""How long a background task may take to notice its stop flag before it is cancelled."""


class StartError(RelayError):
    """A part could not start for a reason outside the config file (a port in use).

    The message names the key whose value could not be used; the process exits 1
    (runtime), where a ``ConfigError`` exits 2.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@contextlib.asynccontextmanager
async def background(
    name: str,
    run: Callable[[], Coroutine[Any, Any, None]],
    stop: Callable[[], None] | None = None,
    grace: float = STOP_GRACE,
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``run()`` as a task; on exit call ``stop()`` and wait ``grace``, else cancel.

    Without ``stop`` the task is cancelled at once (it has no clean way to end).
    """
    task = asyncio.get_running_loop().create_task(run(), name=name)
    try:
        yield task
    finally:
        if stop is not None and not task.done():
            stop()
            await asyncio.wait({task}, timeout=grace)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped with error=%s", name, type(task.exception()).__name__)


class Drained:
    """Transactions that were still running when a listener's drain timed out."""

    def __init__(self) -> None:
        self.cut = 0


@contextlib.asynccontextmanager
async def listening(
    key: str,
    listen: HostPort | Path,
    create: Callable[[], Awaitable[asyncio.Server]],
    drain: Callable[[float], Awaitable[int]],
    drain_timeout: float,
    drained: Drained,
    what: str,
) -> AsyncIterator[asyncio.Server]:
    """A listening server: on exit stop accepting, then let what runs finish.

    ``what`` names the transactions in the line logged when some were cut.
    """
    try:
        server = await create()
    except OSError as exc:
        raise cannot_listen(key, listen, exc) from None
    try:
        yield server
    finally:
        server.close()
        left = await drain(drain_timeout)
        if left:
            drained.cut += left
            log.error("shutdown: %d %s still running were cut", left, what)


def cannot_listen(key: str, listen: HostPort | Path, exc: OSError) -> StartError:
    """``smtp.listen: cannot listen on 127.0.0.1:25: Address already in use``."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return StartError(key, f"cannot listen on {listen}: {reason}")


def check_port(key: str, listen: HostPort) -> None:
    """Bind ``listen`` once (as the workers will, with SO_REUSEPORT) and let it go.

    The supervisor of several workers calls it before any fork, so a port that
    another program holds is one line from one process, not one per worker.
    """
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((listen.host, listen.port))
        except OSError as exc:
            raise cannot_listen(key, listen, exc) from None


def bound_port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])
