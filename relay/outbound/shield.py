"""Pipeline calls run as their own tasks, shielded from the connection that asked.

A front end's connection can be cut (the SMTP client hangs up after the final dot,
the MTA drops the milter connection) while a delivery is already under way; the
delivery must still finish and be counted. Shutdown waits for these tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Shielded:
    def __init__(self) -> None:
        self.inflight: set[asyncio.Task[Any]] = set()

    async def run_shielded(self, coro: Coroutine[Any, Any, T]) -> T:
        task = asyncio.get_running_loop().create_task(coro)
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        return await asyncio.shield(task)

    async def drain(self, timeout: float) -> int:
        """Wait for in-flight calls; answers how many were still running after."""
        if not self.inflight:
            return 0
        _, pending = await asyncio.wait(set(self.inflight), timeout=timeout)
        return len(pending)
