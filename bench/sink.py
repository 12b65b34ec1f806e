"""A fast SMTP sink for the benchmark when Postfix's ``smtp-sink`` is not installed.

``python bench/sink.py PORT`` accepts every message and throws it away. It is a bare
asyncio ``Protocol`` (no aiosmtpd: that costs ~1 ms of CPU per message, more than the
relay under test would) that answers pipelined commands, advertises PIPELINING,
8BITMIME and SIZE, and counts messages. Like ``smtp-sink -c`` it writes a running
counter ``mesg=N`` to stdout (at most every 5 ms, ``\\r``-separated) for the bench
to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import cast

EHLO = (
    b"250-sink.bench.local\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
    b"250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n"
)


class Counter:
    def __init__(self) -> None:
        self.messages = 0
        self.shown = -1

    async def report(self) -> None:
        out = sys.stdout.buffer
        while True:
            if self.messages != self.shown:
                self.shown = self.messages
                out.write(f"mesg={self.shown}\r".encode())
                out.flush()
            await asyncio.sleep(0.005)


class SinkProtocol(asyncio.Protocol):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.buffer = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(b"220 sink.bench.local ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out: list[bytes] = []
        while self.buffer:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    break  # wait for more; the search starts again from the front
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                self.counter.messages += 1
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                break
            line = self.buffer[:line_end]
            self.buffer = self.buffer[line_end + 2 :]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"LHLO"):
                out.append(EHLO)
            elif verb == b"HELO":
                out.append(b"250 sink.bench.local\r\n")
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
                # a CRLF in front lets one search find the terminator even when the
                # message is empty (the body is then just ".\r\n")
                self.buffer = b"\r\n" + self.buffer
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                if self.transport is not None:
                    self.transport.write(b"".join(out))
                    self.transport.close()
                return
            else:  # MAIL, RCPT, RSET, NOOP, ...
                out.append(b"250 2.0.0 Ok\r\n")
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def serve(port: int) -> None:
    counter = Counter()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SinkProtocol(counter), "127.0.0.1", port, backlog=512, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reporter = loop.create_task(counter.report())
    await stop.wait()
    reporter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reporter
    server.close()
    sys.stdout.buffer.write(f"mesg={counter.messages}\r\n".encode())
    sys.stdout.buffer.flush()


def main() -> int:
    port = int(sys.argv[1])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
