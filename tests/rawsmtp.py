"""A raw SMTP client over asyncio streams, for input that client libraries refuse to send.

``RawSMTP`` writes exactly the bytes it is given (no line-ending repair, no dot
stuffing, no address quoting) and parses replies strictly: every line must be
three digits followed by ``-`` or a space. ``Reply.enhanced`` is the RFC 3463
code that starts the text, or ``None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass

_LINE = re.compile(rb"^(\d{3})([ -])(.*)\r\n$", re.DOTALL)
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


class ProtocolError(AssertionError):
    """The server wrote something that is not an SMTP reply line."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return self.lines[-1]

    @property
    def enhanced(self) -> str | None:
        m = _ENHANCED.match(self.text)
        return m.group(0).strip() if m else None

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class RawSMTP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.greeting: Reply | None = None

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> RawSMTP:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=4 * 1024 * 1024), timeout
        )
        client = cls(reader, writer, timeout)
        client.greeting = await client.reply()
        return client

    async def reply(self) -> Reply:
        """One complete (possibly multi-line) reply; ``ProtocolError`` if malformed."""
        code: bytes | None = None
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not raw:
                raise ConnectionResetError(f"connection closed after {lines!r}")
            m = _LINE.match(raw)
            if m is None:
                raise ProtocolError(f"not an SMTP reply line: {raw!r}")
            if code is not None and m.group(1) != code:
                raise ProtocolError(f"reply code changed inside a reply: {raw!r}")
            code = m.group(1)
            lines.append(m.group(3).decode("utf-8", errors="replace"))
            if m.group(2) == b" ":
                return Reply(int(code), tuple(lines))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: bytes | str) -> Reply:
        """Send ``line`` followed by CRLF and read the reply."""
        if isinstance(line, str):
            line = line.encode("utf-8")
        await self.send(line + b"\r\n")
        return await self.reply()

    async def closed_by_server(self, within: float) -> bool:
        """True if the server closes the connection within ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
