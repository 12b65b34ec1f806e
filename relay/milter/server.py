"""The milter front end: an MTA (Postfix, Sendmail) hands over each message, we answer actions.

One ``MilterSession`` per MTA connection collects the envelope, the header fields and
the body, then at end-of-message calls ``Pipeline.handle_in_place`` and turns its
result into milter actions: recipients the MTA must not deliver to (suppressed, or
re-injected with their own copy) are removed with ``SMFIR_DELRCPT``, the header
block is changed into the signed copy's (removed fields with ``SMFIR_CHGHEADER``,
new ones inserted with ``SMFIR_INSHEADER`` at their signed position, the signatures
on top), and the reply is accept, discard, or the pipeline's 4xx/5xx text. Nothing
here decides anything about mail: that is the pipeline's.

Every event but RCPT and end-of-message is negotiated "no reply" when the MTA
offers it, so a message costs the MTA few round trips. An unexpected error
answers tempfail, or drops the connection so the MTA's ``milter_default_action``
applies: a message is never accepted unsigned because of us.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from relay.config import MilterConfig, SmtpConfig
from relay.config.schema import HostPort
from relay.eventlog import EventLog
from relay.mail.message import Header
from relay.metrics import Metrics
from relay.milter import protocol as p
from relay.model import Envelope
from relay.outbound.pipeline import InPlace, Pipeline
from relay.outbound.shield import Shielded

log = EventLog(__name__)

_NO_REPLY = (
    p.P_NR_CONN
    | p.P_NR_HELO
    | p.P_NR_MAIL
    | p.P_NR_DATA
    | p.P_NR_UNKN
    | p.P_NR_EOH
    | p.P_NR_BODY
    | p.P_NR_HDR
    | p.P_NOUNKNOWN
    | p.P_NODATA
)
_REPLY_FLAG = {
    p.CONNECT: p.P_NR_CONN,
    p.HELO: p.P_NR_HELO,
    p.MAIL: p.P_NR_MAIL,
    p.RCPT: p.P_NR_RCPT,
    p.DATA: p.P_NR_DATA,
    p.HEADER: p.P_NR_HDR,
    p.EOH: p.P_NR_EOH,
    p.BODY: p.P_NR_BODY,
    p.UNKNOWN: p.P_NR_UNKN,
}


def _address(arg: bytes) -> str:
    text = arg.decode("utf-8", errors="surrogateescape").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text


class HeaderEdits:
    """The milter actions that turn header block ``old`` into ``new``.

    ``new`` is ``old`` with some fields removed and others added anywhere (the
    pipeline only prepends and appends); unchanged fields are matched by their
    exact bytes, in order. Deletions go last-first so the per-name indexes the
    MTA counts stay right; insertions go in final order, each at its final position.
    """

    def __init__(self, old: Sequence[Header], new: Sequence[Header], leading_space: bool) -> None:
        self.leading_space = leading_space
        positions: dict[bytes, list[int]] = {}
        for index, field in enumerate(new):
            positions.setdefault(field.raw, []).append(index)
        matched = [False] * len(new)
        self.deletions: list[tuple[str, int]] = []
        occurrence: dict[str, int] = {}
        cursor = 0
        for field in old:
            nth = occurrence[field.lname] = occurrence.get(field.lname, 0) + 1
            found = next((i for i in positions.get(field.raw, ()) if i >= cursor), None)
            if found is None:
                self.deletions.append((field.name, nth))
                continue
            matched[found] = True
            cursor = found + 1
        self.deletions.reverse()
        last = max((i for i, m in enumerate(matched) if m), default=-1)
        self.inserts = [(i, new[i]) for i in range(last + 1) if not matched[i]]
        self.appends = [new[i] for i in range(last + 1, len(new))]

    def value(self, field: Header) -> str:
        """The field's value as the MTA wants it: folds as LF, no CRLF at the end."""
        raw = field.raw.decode("utf-8", errors="surrogateescape")
        value = raw[len(field.name) + 1 :].removesuffix("\r\n").replace("\r\n", "\n")
        if not self.leading_space and value.startswith(" "):
            value = value[1:]
        return value

    def packets(self) -> list[bytes]:
        out = [p.change_header(nth, name, "") for name, nth in self.deletions]
        out += [p.insert_header(i, f.name, self.value(f)) for i, f in self.inserts]
        out += [p.add_header(f.name, self.value(f)) for f in self.appends]
        return out


class MilterSession:
    """One MTA connection: any number of messages, one at a time."""

    def __init__(
        self,
        front: MilterFrontEnd,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._front = front
        self._packets = p.PacketReader(reader)
        self._writer = writer
        self._protocol = 0
        self._leading_space = False
        self._macros: dict[str, str] = {}
        self._client = ""
        self._helo = ""
        self._reset()

    def _reset(self) -> None:
        self._mail_from = ""
        self._marketing_envelope = False
        self._rcpts: list[str] = []
        self._headers: list[bytes] = []
        self._body: list[bytes] = []
        self._size = 0
        self._too_big = False

    def _replies(self, command: bytes) -> bool:
        flag = _REPLY_FLAG.get(command)
        return flag is None or not self._protocol & flag

    async def run(self) -> None:
        timeout = self._front.config.timeout
        command = b""
        try:
            while True:
                packet = await self._packets.next(timeout)
                if packet is None:
                    return
                command = packet.command
                if command == p.QUIT:
                    return
                answer = await self._dispatch(packet)
                if answer:
                    self._writer.write(b"".join(answer))
                    await self._writer.drain()
        except (TimeoutError, p.ProtocolError) as exc:
            log.warning("milter connection dropped", error=str(exc) or type(exc).__name__)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("milter session error", command=command.decode("latin-1"))
            self._front.metrics.rejected.labels("451", "4.3.0").inc()
            if self._replies(command):
                # A reply is due: tempfail it; after that the connection is dropped and
                # the MTA's milter_default_action decides for anything else under way.
                self._writer.write(p.packet(p.TEMPFAIL))
        finally:
            self._writer.close()

    async def _dispatch(self, packet: p.Packet) -> list[bytes]:
        command, data = packet.command, packet.data
        if command == p.OPTNEG:
            return [self._negotiate(data)]
        if command == p.MACRO:
            for name, value in zip(*[iter(p.strings(data[1:]))] * 2, strict=False):
                self._macros[name.decode("ascii", errors="replace").strip("{}")] = value.decode(
                    "utf-8", errors="replace"
                )
            return []
        if command == p.ABORT:
            self._reset()
            return []
        if command == p.QUIT_NC:
            self._reset()
            self._macros.clear()
            return []
        reply = p.packet(p.CONTINUE)
        if command == p.CONNECT:
            connect = p.parse_connect(data)
            self._client = connect.address  # the MTA's client, for the log and Received
        elif command == p.HELO:
            self._helo = p.strings(data)[0].decode("utf-8", errors="replace") if data else ""
        elif command == p.MAIL:
            self._reset()
            args = p.strings(data)
            self._mail_from = _address(args[0]) if args else ""
            self._marketing_envelope = self._front.marketing_sender(self._mail_from)
        elif command == p.RCPT:
            args = p.strings(data)
            if not args:
                raise p.ProtocolError("RCPT without an address")
            if self._replies(command):  # negotiated: RCPT may be refused here
                refusal = self._front.refuse_rcpt(self._marketing_envelope, len(self._rcpts))
                if refusal is not None:
                    return [refusal]
            self._rcpts.append(_address(args[0]))
        elif command == p.HEADER:
            self._header(data)
        elif command == p.BODY:
            self._add_body(data)
        elif command == p.BODYEOB:
            if data:
                self._add_body(data)
            answer = await self._end_of_message()
            self._reset()
            return answer
        return [reply] if self._replies(command) else []

    def _negotiate(self, data: bytes) -> bytes:
        offer = p.parse_optneg(data)
        if offer.version < 2:
            raise p.ProtocolError(f"milter protocol version {offer.version} is too old")
        wanted = _NO_REPLY | p.P_HDR_LEADSPC
        if self._front.config.multi_recipient != "tempfail":
            wanted |= p.P_NR_RCPT
        self._protocol = offer.protocol & wanted
        self._leading_space = bool(self._protocol & p.P_HDR_LEADSPC)
        missing = p.ACTIONS & ~offer.actions
        if missing:
            log.warning("milter actions not offered", missing=hex(missing), effect="edits may fail")
        return p.optneg_reply(p.ACTIONS & offer.actions, self._protocol)

    def _header(self, data: bytes) -> None:
        parts = data.split(b"\0")
        if len(parts) < 2:
            raise p.ProtocolError("malformed header")
        name, value = parts[0], parts[1]
        sep = b":" if self._leading_space else b": "
        self._add(name + sep + value + b"\r\n", self._headers)

    def _add_body(self, chunk: bytes) -> None:
        self._add(chunk, self._body)

    def _add(self, chunk: bytes, into: list[bytes]) -> None:
        self._size += len(chunk)
        if self._size > self._front.smtp.max_message_size:
            self._too_big = True
            self._headers.clear()
            self._body.clear()
            return
        if not self._too_big:
            into.append(chunk)

    async def _end_of_message(self) -> list[bytes]:
        front = self._front
        queue_id = self._macros.get("i", "")
        if self._too_big:
            limit = front.smtp.max_message_size
            front.metrics.rejected.labels("552", "5.3.4").inc()
            log.info("milter message refused", id=queue_id or "-", reason="size")
            return [p.reply_code(552, "5.3.4", f"message larger than {limit} bytes")]
        if len(self._rcpts) > front.smtp.max_recipients:  # RCPT was not ours to refuse
            front.metrics.rejected.labels("452", "4.5.3").inc()
            log.info("milter message refused", id=queue_id or "-", reason="recipients")
            text = f"too many recipients (at most {front.smtp.max_recipients})"
            return [p.reply_code(452, "4.5.3", text)]
        envelope = Envelope(
            mail_from=self._mail_from,
            rcpt_tos=tuple(self._rcpts),
            data=b"".join(self._headers) + b"\r\n" + b"".join(self._body),
            client=self._client,
            helo=self._helo,
        )
        result = await front.run_shielded(
            front.pipeline.handle_in_place(
                envelope, queue_id, reinject=front.config.multi_recipient == "reinject"
            )
        )
        return self._actions(envelope, result)

    def _actions(self, envelope: Envelope, result: InPlace) -> list[bytes]:
        reply = result.reply
        if not reply.is_success:
            self._front.metrics.rejected.labels(str(reply.code), reply.enhanced).inc()
            return [p.reply_code(reply.code, reply.enhanced, reply.text)]
        if result.discard:
            return [p.packet(p.DISCARD)]
        out = [p.delete_recipient(r) for r in envelope.rcpt_tos if r not in result.keep]
        if result.mail_from and result.mail_from != envelope.mail_from:
            out.append(p.change_from(result.mail_from))
        out += HeaderEdits(result.original, result.headers, self._leading_space).packets()
        out.append(p.packet(p.ACCEPT))
        return out


class MilterFrontEnd(Shielded):
    """Shared by every session: the pipeline (swapped on reload), config and metrics."""

    def __init__(
        self, pipeline: Pipeline, config: MilterConfig, smtp: SmtpConfig, metrics: Metrics
    ) -> None:
        self.pipeline = pipeline
        self.config = config
        self.smtp = smtp
        self.metrics = metrics
        super().__init__()

    def marketing_sender(self, address: str) -> bool:
        if self.config.multi_recipient != "tempfail" or not address:
            return False
        return self.pipeline.is_marketing_sender(address)

    def refuse_rcpt(self, marketing: bool, count: int) -> bytes | None:
        """``milter.multi_recipient: tempfail``: one marketing recipient per transaction."""
        if marketing and count >= 1:
            self.metrics.rejected.labels("452", "4.5.3").inc()
            return p.reply_code(
                452, "4.5.3", "marketing mail is sent one recipient per transaction"
            )
        if count >= self.smtp.max_recipients:
            self.metrics.rejected.labels("452", "4.5.3").inc()
            return p.reply_code(
                452, "4.5.3", f"too many recipients (at most {self.smtp.max_recipients})"
            )
        return None

    def peer_allowed(self, address: str) -> bool:
        """The MTA connecting to us (not its client) must be in ``smtp.allowed_networks``."""
        if not address:
            return True  # a Unix socket: protected by its file mode
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.smtp.allowed_networks)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else ""
        if not self.peer_allowed(address):
            log.warning("milter refused", peer=address, reason="not-in-allowed-networks")
            writer.close()
            return
        await MilterSession(self, reader, writer).run()

    async def start(self, reuse_port: bool = False) -> asyncio.Server:
        listen = self.config.listen
        if isinstance(listen, Path):
            sock = await asyncio.to_thread(_unix_socket, listen)
            return await asyncio.start_unix_server(self._connected, sock=sock)
        assert isinstance(listen, HostPort)
        return await asyncio.start_server(
            self._connected, listen.host, listen.port, reuse_port=reuse_port or None
        )


def _unix_socket(path: Path) -> socket.socket:
    """A Unix socket the owner and group may use (add the MTA's user to our group)."""
    if path.is_socket():
        path.unlink()  # left over from a process that did not stop cleanly
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o660)
    return sock
