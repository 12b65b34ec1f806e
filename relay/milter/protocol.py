"""The Sendmail milter wire protocol, version 6 (Postfix >= 2.6, Sendmail 8.14): bytes only.

A packet is a 4-byte big-endian length, one command byte and its data; strings are
NUL-terminated. The MTA sends commands (``SMFIC_*``), the filter answers with
replies (``SMFIR_*``); at end-of-message it may first send modifications. This
module reads and builds packets; it knows nothing of the relay.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

VERSION = 6
MAX_READ = 1 << 16
"""Octets asked of the stream per read."""
MAX_PACKET = 1024 * 1024
"""Postfix sends body chunks of at most 64 KiB; anything far larger is a broken peer."""

# Commands from the MTA.
OPTNEG = b"O"
MACRO = b"D"
CONNECT = b"C"
HELO = b"H"
MAIL = b"M"
RCPT = b"R"
DATA = b"T"
HEADER = b"L"
EOH = b"N"
BODY = b"B"
BODYEOB = b"E"
ABORT = b"A"
QUIT = b"Q"
QUIT_NC = b"K"
UNKNOWN = b"U"

# Replies and modifications from the filter.
ACCEPT = b"a"
CONTINUE = b"c"
DISCARD = b"d"
REJECT = b"r"
TEMPFAIL = b"t"
REPLYCODE = b"y"
PROGRESS = b"p"
ADDHEADER = b"h"
INSHEADER = b"i"
CHGHEADER = b"m"
DELRCPT = b"-"
CHGFROM = b"e"

# Actions the filter may take (SMFIF_*).
ACT_ADDHDRS = 0x01
ACT_DELRCPT = 0x08
ACT_CHGHDRS = 0x10
ACT_CHGFROM = 0x40
ACTIONS = ACT_ADDHDRS | ACT_DELRCPT | ACT_CHGHDRS | ACT_CHGFROM

# Protocol steps (SMFIP_*): events the filter does not need, replies it will not send.
P_NOUNKNOWN = 0x100
P_NODATA = 0x200
P_NR_CONN = 0x1000
P_NR_HELO = 0x2000
P_NR_MAIL = 0x4000
P_NR_RCPT = 0x8000
P_NR_DATA = 0x10000
P_NR_UNKN = 0x20000
P_NR_EOH = 0x40000
P_NR_BODY = 0x80000
P_NR_HDR = 0x80
P_HDR_LEADSPC = 0x100000


class ProtocolError(Exception):
    """The MTA sent something that is not milter protocol; the connection is dropped."""


@dataclass(frozen=True, slots=True)
class Packet:
    command: bytes
    data: bytes


class PacketReader:
    """Packets out of the stream, split from whole reads: a message is a dozen packets or
    more, and two ``readexactly`` awaits apiece cost more than the splitting."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = bytearray()

    async def next(self, timeout: float) -> Packet | None:
        """The next packet, or None at a clean end of stream between packets.

        The whole packet arrives within ``timeout`` or ``TimeoutError`` is raised.
        """
        buffer = self._buffer
        async with asyncio.timeout(timeout):
            while True:
                if len(buffer) >= 4:
                    (length,) = struct.unpack_from("!I", buffer)
                    if not 1 <= length <= MAX_PACKET:
                        raise ProtocolError(f"packet length {length} out of range")
                    if len(buffer) >= 4 + length:
                        packet = Packet(bytes(buffer[4:5]), bytes(buffer[5 : 4 + length]))
                        del buffer[: 4 + length]
                        return packet
                chunk = await self._reader.read(MAX_READ)
                if not chunk:
                    if not buffer:
                        return None
                    where = "packet length" if len(buffer) < 4 else "packet"
                    raise ProtocolError(f"connection closed inside a {where}")
                buffer += chunk


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def strings(data: bytes) -> list[bytes]:
    """NUL-terminated strings; a trailing part without NUL is kept too."""
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


def cstr(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", errors="surrogateescape") if isinstance(value, str) else value
    if b"\0" in raw:
        raise ValueError("NUL inside a milter string")
    return raw + b"\0"


@dataclass(frozen=True, slots=True)
class Negotiation:
    version: int
    actions: int
    protocol: int


def parse_optneg(data: bytes) -> Negotiation:
    if len(data) < 12:
        raise ProtocolError("short option negotiation")
    version, actions, protocol = struct.unpack("!III", data[:12])
    return Negotiation(version, actions, protocol)


def optneg_reply(actions: int, protocol: int) -> bytes:
    return packet(OPTNEG, struct.pack("!III", VERSION, actions, protocol))


@dataclass(frozen=True, slots=True)
class Connect:
    hostname: str
    address: str
    """The client's IP address, or "" for a Unix socket or an unknown family."""


def parse_connect(data: bytes) -> Connect:
    host, sep, rest = data.partition(b"\0")
    if not sep or not rest:
        raise ProtocolError("malformed connect")
    family = rest[:1]
    address = ""
    if family in (b"4", b"6") and len(rest) >= 3:
        address = rest[3:].split(b"\0", 1)[0].decode("ascii", errors="replace")
        if address.startswith("IPv6:"):
            address = address[5:]
    return Connect(host.decode("utf-8", errors="replace"), address)


def reply_code(code: int, enhanced: str, text: str) -> bytes:
    """SMFIR_REPLYCODE: the MTA sends exactly this reply to the client."""
    line = f"{code} {enhanced} {text}"
    return packet(REPLYCODE, cstr(line.replace("\r", " ").replace("\n", " ")))


def add_header(name: str, value: str) -> bytes:
    return packet(ADDHEADER, cstr(name) + cstr(value))


def insert_header(index: int, name: str, value: str) -> bytes:
    return packet(INSHEADER, struct.pack("!I", index) + cstr(name) + cstr(value))


def change_header(index: int, name: str, value: str) -> bytes:
    """Replace the ``index``-th (1-based) field called ``name``; an empty value deletes it."""
    return packet(CHGHEADER, struct.pack("!I", index) + cstr(name) + cstr(value))


def delete_recipient(rcpt: str) -> bytes:
    return packet(DELRCPT, cstr(f"<{rcpt}>"))


def change_from(sender: str) -> bytes:
    return packet(CHGFROM, cstr(f"<{sender}>"))
