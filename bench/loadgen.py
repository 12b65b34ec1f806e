"""Load generator for the benchmark: N concurrent SMTP sessions, one JSON result line.

Runs in its own process (``python bench/loadgen.py ...``) so that its CPU is not the
relay's. Each session connects and says EHLO before the clock starts, then sends
messages over the same connection (like ``smtp-source -d``). With ``--new-connection``
each message has a connection of its own instead (like ``smtp-source`` without ``-d``):
connect, EHLO, the transaction, QUIT. MAIL, RCPT and DATA are pipelined when the server
advertises PIPELINING; a message's latency is from the first command written (with
``--new-connection``: from the connect) to the final reply after the dot.

Two modes:

* closed loop (default): every session sends its next message as soon as the
  previous one is answered, until ``--count`` messages or ``--duration`` seconds;
* open loop (``--rate R``): message *i* is due at ``start + i/R``; a free session
  takes the next due message and waits for its time. Latency is measured from the
  due time, so time spent waiting for a free session counts (no coordinated omission).

Messages look like ``smtp-source``'s: From/To/Date/Message-Id headers and a body of
80-character lines, ``--size`` bytes. Recipient *n* (numbered from ``--seq-start``
across all sessions, like ``smtp-source -N``) is ``<n><local>@<domain>`` of ``--to``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import sys
import time
from email.utils import formatdate


def body_bytes(size: int) -> bytes:
    """``size`` bytes of 80-column lines (78 characters and CRLF), no leading dots."""
    lines = []
    total = 0
    for n in itertools.count(1):
        if total >= size:
            break
        line = (str(n % 10) + "X" * 77)[: max(1, min(78, size - total - 2))] + "\r\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()


class Reply(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    code = int(lines[-1][:3])
    return code, b"".join(lines).decode("ascii", "replace")


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.trace: list[tuple[float, float]] = []
        self.ok = 0
        self.failed = 0
        self.codes: dict[str, int] = {}
        self.errors: list[str] = []

    def fail(self, what: str) -> None:
        self.failed += 1
        if len(self.errors) < 10:
            self.errors.append(what)


class Session:
    def __init__(self, args: argparse.Namespace, stats: Stats, seq: itertools.count[int]) -> None:
        self.args = args
        self.stats = stats
        self.seq = seq
        local, _, self.domain = args.to.rpartition("@")
        self.local = local
        self.body = body_bytes(args.size)
        self.pipelining = False
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.args.host, self.args.port)
        code, _ = await read_reply(self.reader)
        if code != 220:
            raise Reply(code, "greeting")
        self.writer.write(b"EHLO loadgen.bench.local\r\n")
        code, text = await read_reply(self.reader)
        if code != 250:
            raise Reply(code, "EHLO")
        self.pipelining = "PIPELINING" in text.upper()

    async def close(self) -> None:
        if self.writer is None:
            return
        with contextlib.suppress(OSError, ConnectionError, asyncio.TimeoutError):
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.writer.drain(), 2)
            assert self.reader is not None
            await asyncio.wait_for(read_reply(self.reader), 2)
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()

    async def connect_and_send(self) -> int:
        """A connection for this message: connect, EHLO, the transaction (``close`` after
        the reply, outside the message's latency, sends the QUIT)."""
        await self.connect()
        return await self.send_one()

    async def send_one(self) -> int:
        """One transaction; returns the final reply code (raises on a broken connection)."""
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        args = self.args
        rcpts = [f"{next(self.seq)}{self.local}@{self.domain}" for _ in range(args.rcpts)]
        header = (
            f"From: <{args.sender}>\r\nTo: <{args.to}>\r\n"
            f"Date: {formatdate(localtime=False)}\r\n"
            f"Message-Id: <{rcpts[0].replace('@', '.')}.{time.monotonic_ns()}@loadgen>\r\n\r\n"
        ).encode()
        envelope = [f"MAIL FROM:<{args.sender}>\r\n".encode()]
        envelope += [f"RCPT TO:<{r}>\r\n".encode() for r in rcpts]
        envelope.append(b"DATA\r\n")
        if self.pipelining:
            writer.write(b"".join(envelope))
            codes = [(await read_reply(reader))[0] for _ in envelope]
        else:
            codes = []
            for command in envelope:
                writer.write(command)
                codes.append((await read_reply(reader))[0])
                if codes[-1] >= 400:
                    break
        if codes[0] != 250 or codes[-1] != 354:
            if codes[-1] == 354:  # pipelined DATA was accepted after all: abort it
                writer.write(b".\r\n")
                await read_reply(reader)
            writer.write(b"RSET\r\n")
            await read_reply(reader)
            return next((c for c in codes if c >= 400), codes[-1])
        writer.write(header + self.body + b".\r\n")
        code, _ = await read_reply(reader)
        return code


async def run(args: argparse.Namespace) -> dict[str, object]:
    stats = Stats()
    seq = itertools.count(args.seq_start)
    sessions = [Session(args, stats, seq) for _ in range(args.sessions)]
    if not args.new_connection:
        await asyncio.gather(*(s.connect() for s in sessions))
    index = itertools.count()
    count = args.count if args.count > 0 else math.inf
    start = time.perf_counter()
    deadline = start + args.duration if args.duration > 0 else math.inf
    rate = args.rate

    async def loop(session: Session) -> None:
        while True:
            i = next(index)
            if i >= count:
                return
            free = time.perf_counter()
            due = start + i / rate if rate > 0 else free
            if due >= deadline or free >= deadline:
                return
            if due > free:
                # the session waits for the message's time; the loop's timer slack (libuv
                # timers have 1 ms resolution) is the generator's, not the server's
                await asyncio.sleep(due - free)
                begin = time.perf_counter()
            else:
                # late: no session was free at the due time, and that wait counts
                begin = due
            try:
                if args.new_connection:
                    code = await asyncio.wait_for(session.connect_and_send(), args.timeout)
                else:
                    code = await asyncio.wait_for(session.send_one(), args.timeout)
            except (TimeoutError, OSError, ConnectionError, ValueError, Reply) as exc:
                stats.fail(f"{type(exc).__name__}: {exc}")
                return
            stats.codes[str(code)] = stats.codes.get(str(code), 0) + 1
            if 200 <= code < 300:
                stats.ok += 1
                stats.latencies.append(time.perf_counter() - begin)
                stats.trace.append((begin - start, stats.latencies[-1]))
            else:
                stats.fail(f"reply {code}")
            if args.new_connection:
                await session.close()
                session.reader = session.writer = None

    await asyncio.gather(*(loop(s) for s in sessions))
    elapsed = time.perf_counter() - start
    await asyncio.gather(*(s.close() for s in sessions))
    lat = sorted(stats.latencies)

    def pct(p: float) -> float | None:
        if not lat:
            return None
        return lat[min(len(lat) - 1, max(0, math.ceil(p / 100 * len(lat)) - 1))]

    return {
        "ok": stats.ok,
        "failed": stats.failed,
        "codes": stats.codes,
        "errors": stats.errors,
        "elapsed": elapsed,
        "rate": stats.ok / elapsed if elapsed > 0 else 0.0,
        "recipients_used": next(seq) - args.seq_start,
        "trace": sorted(stats.trace) if args.trace else None,
        "latency": {
            "n": len(lat),
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "max": lat[-1] if lat else None,
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--count", type=int, default=0, help="messages in total (0: use --duration)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds (0: use --count)")
    p.add_argument("--rate", type=float, default=0.0, help="open loop at R msg/s (0: closed)")
    p.add_argument("--from", dest="sender", default="news@rsa.bench.test")
    p.add_argument("--to", default="rcpt@bench.test")
    p.add_argument("--rcpts", type=int, default=1)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--seq-start", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument(
        "--new-connection",
        action="store_true",
        help="a connection per message (connect, EHLO, transaction, QUIT), like smtp-source"
        " without -d",
    )
    p.add_argument("--trace", help="write '<start s> <latency s>' per message to this file")
    args = p.parse_args(argv)
    if args.count <= 0 and args.duration <= 0:
        p.error("give --count or --duration")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(run(args))
    trace = result.pop("trace")
    if args.trace and isinstance(trace, list):
        with open(args.trace, "w") as f:
            f.writelines(f"{t:.6f} {lat:.6f}\n" for t, lat in trace)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
