"""A milter protocol client for the tests (importable as ``milterclient``): plays the MTA.

It speaks protocol version 6 the way Postfix does (option negotiation offering every
action and "no reply" step, then connect, helo, mail, rcpt, headers, body, end of
message) and returns every packet the filter sends back, so tests can assert the
exact actions. Written from the protocol description, independent of relay.milter.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from pathlib import Path

ALL_ACTIONS = 0x1FF
ALL_STEPS = 0x1FFFFF  # every SMFIP_ flag a version-6 MTA knows


@dataclass(frozen=True)
class Reply:
    command: str
    data: bytes

    def strings(self) -> list[str]:
        return [p.decode() for p in self.data.split(b"\0") if p]


class MilterClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = 0
        self.actions = 0

    @classmethod
    async def connect(cls, where: int | Path) -> MilterClient:
        if isinstance(where, Path):
            reader, writer = await asyncio.open_unix_connection(str(where))
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", where)
        return cls(reader, writer)

    def send(self, command: str, data: bytes = b"") -> None:
        self.writer.write(struct.pack("!I", len(data) + 1) + command.encode() + data)

    async def read(self, timeout: float = 10.0) -> Reply:
        head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
        (length,) = struct.unpack("!I", head)
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return Reply(body[:1].decode(), body[1:])

    async def negotiate(self, steps: int = ALL_STEPS, actions: int = ALL_ACTIONS) -> Reply:
        self.send("O", struct.pack("!III", 6, actions, steps))
        reply = await self.read()
        _, self.actions, self.protocol = struct.unpack("!III", reply.data[:12])
        return reply

    def replies_to(self, flag: int) -> bool:
        return not self.protocol & flag

    async def step(self, command: str, data: bytes, no_reply_flag: int) -> Reply | None:
        self.send(command, data)
        if self.replies_to(no_reply_flag):
            return await self.read()
        return None

    async def message(
        self,
        mail_from: str,
        rcpts: list[str],
        headers: list[tuple[str, str]],
        body: bytes,
        macros: dict[str, str] | None = None,
    ) -> list[Reply]:
        """One transaction from CONNECT to end of message; the end-of-message packets."""
        connect = b"client.example\0" + b"4" + struct.pack("!H", 12345) + b"192.0.2.7\0"
        await self.step("C", connect, 0x1000)
        await self.step("H", b"client.example\x00", 0x2000)
        await self.step("M", f"<{mail_from}>\x00".encode(), 0x4000)
        for rcpt in rcpts:
            reply = await self.step("R", f"<{rcpt}>\x00".encode(), 0x8000)
            if reply is not None and reply.command != "c":
                return [reply]
        for name, value in headers:
            lead = " " if self.protocol & 0x100000 else ""
            await self.step("L", f"{name}\x00{lead}{value}\x00".encode(), 0x80)
        await self.step("N", b"", 0x40000)
        for start in range(0, len(body), 65535):  # the MTA's chunk size
            await self.step("B", body[start : start + 65535], 0x80000)
        if macros:
            pairs = b"".join(f"{k}\x00{v}\x00".encode() for k, v in macros.items())
            self.send("D", b"E" + pairs)
        self.send("E")
        out = []
        while True:
            reply = await self.read()
            out.append(reply)
            if reply.command in "acdrty":
                return out

    async def close(self) -> None:
        self.send("Q")
        self.writer.close()
