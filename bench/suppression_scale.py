"""Suppression lookups at scale: Redis memory per address and lookup latency, 1 k to 10 M.

    python bench/suppression_scale.py [--sizes 1000,1000000,10000000] [--lookups 2000]

For each size, a fresh real Redis (relay.embedded) is filled through
``redis-cli --pipe`` with one unsubscribe entry per address in the relay's own key
layout, then ``SuppressionStore.blocked()`` — the per-message call — is timed for
1-recipient and 100-recipient messages (half of the recipients stored, half not).
Prints used memory per address and p50/p99 latency; the smallest size is the
baseline the others are compared with. Also the suppression statistics two ways at
each size: a full scan (``suppress stats --scan``, and ``--reconcile``, which also
rewrites the kept counts) against the counts kept as entries change (``stats()``,
what the dashboard and ``suppress stats`` read).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import subprocess
import sys
import time

from relay.model import Route
from relay.store import client as redis_client
from relay.store.embedded import EmbeddedRedis
from relay.suppression.store import SuppressionStore
from relay.suppression.transfer import stats

ROUTE = Route("marketing", "newsletter", "news@example.com")


def resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def load(port: int, size: int) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(
        ["redis-cli", "-p", str(port), "--pipe"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    value = f"{int(time.time())}|0|bench"
    chunk: list[bytes] = []
    for i in range(size):
        chunk.append(
            resp("HSET", f"ocr:sup:{{user{i}@example.net}}", "g:newsletter|unsubscribe", value)
        )
        if len(chunk) == 10000:
            proc.stdin.write(b"".join(chunk))
            chunk.clear()
    proc.stdin.write(b"".join(chunk))
    proc.stdin.close()
    proc.wait()
    return time.perf_counter() - started


async def measure(url: str, size: int, lookups: int) -> dict[str, float]:
    client = redis_client.connect(url, 5)
    store = SuppressionStore(client, "ocr")
    info = await client.info("memory")
    empty_baseline = 900_000  # a fresh server's used_memory, subtracted below
    result: dict[str, float] = {"bytes_per_address": (info["used_memory"] - empty_baseline) / size}
    rng = random.Random(7)
    for rcpts in (1, 100):
        timings = []
        for _ in range(lookups // (1 if rcpts == 1 else 10)):
            batch = [
                f"user{rng.randrange(size)}@example.net"
                if rng.random() < 0.5
                else f"new{rng.randrange(10**9)}@x.org"
                for _ in range(rcpts)
            ]
            t = time.perf_counter()
            await store.blocked(batch, ROUTE)
            timings.append((time.perf_counter() - t) * 1000)
        timings.sort()
        result[f"p50_{rcpts}"] = statistics.median(timings)
        result[f"p99_{rcpts}"] = timings[int(len(timings) * 0.99) - 1]
    t = time.perf_counter()
    await store.reconcile()  # the full scan the dashboard ran every 5 minutes before
    result["scan_s"] = time.perf_counter() - t
    timings = []
    for _ in range(200):
        t = time.perf_counter()
        await stats(store)
        timings.append((time.perf_counter() - t) * 1000)
    result["kept_ms"] = statistics.median(timings)
    await client.aclose()
    return result


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,1000000,10000000")
    parser.add_argument("--lookups", type=int, default=2000)
    args = parser.parse_args()
    if shutil.which("redis-cli") is None:
        print("needs redis-cli (apt-get install redis-tools)", file=sys.stderr)
        return 1
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        with EmbeddedRedis() as server:
            seconds = load(server.port, size)
            rows.append((size, seconds, await measure(server.url, size, args.lookups)))
    base = rows[0][2]
    print("suppression lookups, one real Redis, entries in the relay's key layout")
    print(
        f"{'entries':>10} {'load s':>7} {'B/addr':>7} {'1 rcpt p50':>11} {'p99':>7}"
        f" {'100 rcpt p50':>13} {'p99':>7} {'p50 vs base':>12} {'stats: scan':>12}"
        f" {'kept':>9}"
    )
    for size, seconds, r in rows:
        print(
            f"{size:>10} {seconds:>7.1f} {r['bytes_per_address']:>7.0f} {r['p50_1']:>9.3f}ms"
            f" {r['p99_1']:>5.3f}ms {r['p50_100']:>11.3f}ms {r['p99_100']:>5.3f}ms"
            f" {r['p50_1'] / base['p50_1']:>11.2f}x {r['scan_s']:>11.2f}s {r['kept_ms']:>7.3f}ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
