"""Event-loop lag: how late a periodic timer fires, i.e. how long some step blocked the loop."""

from __future__ import annotations

import asyncio
import time

from relay.metrics import Metrics


class LoopLagMonitor:
    def __init__(self, metrics: Metrics, interval: float = 0.25) -> None:
        self._metrics = metrics
        self._interval = interval
        self._stopped = asyncio.Event()
        self.worst = 0.0

    async def run(self) -> None:
        while not self._stopped.is_set():
            started = time.perf_counter()
            await asyncio.sleep(self._interval)
            lag = max(0.0, time.perf_counter() - started - self._interval)
            self._metrics.loop_lag.observe(lag)
            if lag > self.worst:
                self.worst = lag
                self._metrics.loop_lag_max.set(lag)

    def stop(self) -> None:
        self._stopped.set()
