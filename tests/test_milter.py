"""relay.milter at the protocol level: a test client plays the MTA against a running relay.

The client (``tests/milterclient.py``) is written from the protocol description; the
actions the relay answers are applied to the header block here the way an MTA does,
and the result must verify with dkimpy against the test keys.
"""

from __future__ import annotations

import asyncio
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dkim
import pytest
from conftest import Keys, Sink
from hypothesis import given, settings
from hypothesis import strategies as st
from milterclient import MilterClient, Reply

from relay.mail.message import Header
from relay.milter import protocol as p
from relay.milter.server import HeaderEdits
from relay.runtime.app import Relay
from relay.suppression.store import GLOBAL, group_scope

MakeRelay = Callable[[dict[str, Any]], Awaitable[Relay]]
HEADERS = [
    ("From", "Example <news@example.com>"),
    ("To", "alice@example.net"),
    ("Subject", "Hello"),
    ("Message-ID", "<m1@example.com>"),
    ("Date", "Tue, 01 Dec 2026 10:00:00 +0000"),
    ("List-Unsubscribe", "<https://app.example.com/old>"),
    ("MIME-Version", "1.0"),
]
BODY = b"Hello there.\r\n"


def milter_config(config_dict: dict[str, Any], **milter: Any) -> dict[str, Any]:
    raw = dict(config_dict)
    raw["smtp"] = {**config_dict["smtp"], "listen": None}
    raw["milter"] = {"listen": "127.0.0.1:0", **milter}
    return raw


async def client_for(relay: Relay) -> MilterClient:
    client = MilterClient(*await asyncio.open_connection("127.0.0.1", relay.milter_port))
    await client.negotiate()
    return client


def apply(headers: list[tuple[str, str]], replies: list[Reply], leading: bool) -> bytes:
    """The header block an MTA writes after these actions, then the body."""
    fields = [(n, (v if leading else " " + v)) for n, v in headers]
    for reply in replies:
        if reply.command == "m":
            (index,) = struct.unpack("!I", reply.data[:4])
            name, value = reply.data[4:].split(b"\0")[:2]
            same = [i for i, (n, _) in enumerate(fields) if n.lower() == name.decode().lower()]
            assert value == b"", "the relay only deletes fields"
            del fields[same[index - 1]]
        elif reply.command == "i":
            (index,) = struct.unpack("!I", reply.data[:4])
            name, value = reply.data[4:].split(b"\0")[:2]
            text = value.decode() if leading else " " + value.decode()
            fields.insert(index, (name.decode(), text))
        elif reply.command == "h":
            name, value = reply.data.split(b"\0")[:2]
            text = value.decode() if leading else " " + value.decode()
            fields.append((name.decode(), text))
    block = "".join(f"{n}:{v.replace(chr(10), chr(13) + chr(10))}\r\n" for n, v in fields)
    return block.encode() + b"\r\n" + BODY


async def test_negotiation_asks_for_no_reply_steps(
    make_relay: MakeRelay, config_dict: dict[str, Any]
) -> None:
    relay = await make_relay(milter_config(config_dict))
    client = MilterClient(*await asyncio.open_connection("127.0.0.1", relay.milter_port))
    reply = await client.negotiate()
    assert reply.command == "O"
    version, actions, steps = struct.unpack("!III", reply.data)
    assert version == 6
    assert actions == 0x01 | 0x08 | 0x10 | 0x40  # add/insert, delrcpt, change headers, from
    assert steps & 0x80 and steps & 0x80000 and steps & 0x8000  # no reply to header/body/rcpt
    assert steps & 0x100000  # header values with their leading space
    await client.close()

    relay2 = await make_relay(milter_config(config_dict, multi_recipient="tempfail"))
    client = MilterClient(*await asyncio.open_connection("127.0.0.1", relay2.milter_port))
    _, _, steps = struct.unpack("!III", (await client.negotiate()).data)
    assert not steps & 0x8000  # RCPT is answered: the second marketing one gets 452
    await client.close()


@pytest.mark.parametrize("leading", [True, False])
async def test_marketing_edits_verify_after_the_mta_applies_them(
    make_relay: MakeRelay, config_dict: dict[str, Any], keys: Keys, leading: bool
) -> None:
    relay = await make_relay(milter_config(config_dict))
    client = MilterClient(*await asyncio.open_connection("127.0.0.1", relay.milter_port))
    steps = 0x1FFFFF if leading else 0x1FFFFF & ~0x100000
    await client.negotiate(steps=steps)
    replies = await client.message("news@example.com", ["alice@example.net"], HEADERS, BODY)
    await client.close()
    commands = [r.command for r in replies]
    assert commands[-1] == "a"
    assert "-" not in commands  # one recipient: nothing removed
    change = next(r for r in replies if r.command == "m")
    assert change.data[4:].split(b"\0")[0] == b"List-Unsubscribe"  # the app's own, removed
    first_insert = next(r for r in replies if r.command == "i")
    assert struct.unpack("!I", first_insert.data[:4]) == (0,)
    assert first_insert.data[4:].startswith(b"DKIM-Signature\0")  # on top, as signed
    data = apply(HEADERS, replies, leading)
    assert data.count(b"List-Unsubscribe:") == 1
    assert b"app.example.com" not in data
    assert dkim.verify(data, dnsfunc=keys.dnsfunc)


async def test_suppressed_recipient_deleted_and_all_suppressed_discarded(
    make_relay: MakeRelay, config_dict: dict[str, Any], sink: Sink
) -> None:
    relay = await make_relay(milter_config(config_dict))
    assert relay.store is not None
    await relay.store.add("bob@example.org", group_scope("newsletter"), "unsubscribe", "t")
    client = await client_for(relay)
    replies = await client.message(
        "news@example.com", ["alice@example.net", "bob@example.org"], HEADERS, BODY
    )
    deleted = [r.strings() for r in replies if r.command == "-"]
    assert deleted == [["<bob@example.org>"]]
    assert replies[-1].command == "a"
    replies = await client.message("news@example.com", ["bob@example.org"], HEADERS, BODY)
    assert [r.command for r in replies] == ["d"]
    await client.close()
    assert sink.handler.messages == []  # nothing re-injected: one kept recipient


async def test_second_recipient_reinjected_before_the_answer(
    make_relay: MakeRelay, config_dict: dict[str, Any], sink: Sink, keys: Keys
) -> None:
    relay = await make_relay(milter_config(config_dict))  # upstream: the capture sink
    client = await client_for(relay)
    replies = await client.message(
        "news@example.com", ["alice@example.net", "bob@example.org"], HEADERS, BODY
    )
    await client.close()
    assert [r.strings() for r in replies if r.command == "-"] == [["<bob@example.org>"]]
    assert replies[-1].command == "a"
    (captured,) = sink.handler.messages  # already there when end-of-message was answered
    assert captured.rcpt_tos == ("bob@example.org",)
    assert dkim.verify(captured.data, dnsfunc=keys.dnsfunc)


async def test_transactional_never_split_and_hard_bounce_removed(
    make_relay: MakeRelay, config_dict: dict[str, Any], sink: Sink, keys: Keys
) -> None:
    relay = await make_relay(milter_config(config_dict))
    assert relay.store is not None
    await relay.store.add("bob@example.org", GLOBAL, "hard-bounce", "t")
    client = await client_for(relay)
    headers = [("From", "receipts@example.com"), *HEADERS[1:5]]
    rcpts = ["alice@example.net", "carol@example.org", "bob@example.org"]
    replies = await client.message("receipts@example.com", rcpts, headers, BODY)
    await client.close()
    assert [r.strings() for r in replies if r.command == "-"] == [["<bob@example.org>"]]
    assert not any(b"List-Unsubscribe" in r.data for r in replies)
    assert dkim.verify(apply(headers, replies, True), dnsfunc=keys.dnsfunc)
    assert sink.handler.messages == []


async def test_rcpt_tempfail_mode_refuses_second_marketing_recipient(
    make_relay: MakeRelay, config_dict: dict[str, Any]
) -> None:
    relay = await make_relay(milter_config(config_dict, multi_recipient="tempfail"))
    client = await client_for(relay)
    replies = await client.message(
        "news@example.com", ["alice@example.net", "bob@example.org"], HEADERS, BODY
    )
    assert replies[0].command == "y"
    assert replies[0].strings()[0].startswith("452 4.5.3 ")
    await client.close()


async def test_unsigned_marketing_is_never_accepted(
    make_relay: MakeRelay, config_dict: dict[str, Any]
) -> None:
    raw = milter_config(config_dict)
    raw["dkim"] = {"require_for_marketing": True, "keys": []}
    relay = await make_relay(raw)
    client = await client_for(relay)
    replies = await client.message("news@example.com", ["alice@example.net"], HEADERS, BODY)
    assert [r.command for r in replies] == ["y"]
    assert replies[0].strings()[0].startswith("451 4.7.5 ")
    await client.close()


async def test_oversized_message_refused_and_garbage_drops_the_connection(
    make_relay: MakeRelay, config_dict: dict[str, Any]
) -> None:
    relay = await make_relay(milter_config(config_dict))
    client = await client_for(relay)
    big = b"x" * 1000 + b"\r\n"
    replies = await client.message(
        "news@example.com", ["alice@example.net"], HEADERS, big * 1100
    )  # > smtp.max_message_size (1 MiB in the test config)
    assert replies[0].strings()[0].startswith("552 5.3.4 ")
    client.writer.write(struct.pack("!I", 0xFFFFFFF0) + b"X")
    with pytest.raises(asyncio.IncompleteReadError):
        await client.read()
    client.writer.close()
    client = await client_for(relay)  # the listener is unaffected
    replies = await client.message("news@example.com", ["alice@example.net"], HEADERS, BODY)
    assert replies[-1].command == "a"
    await client.close()


async def test_unix_socket_listener(
    make_relay: MakeRelay, config_dict: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "milter.sock"
    relay = await make_relay(milter_config(config_dict, listen=f"unix:{path}"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    client = await MilterClient.connect(path)
    await client.negotiate()
    replies = await client.message("news@example.com", ["alice@example.net"], HEADERS, BODY)
    assert replies[-1].command == "a"
    await client.close()
    await relay.stop()
    assert not path.exists()


async def test_mta_outside_allowed_networks_is_refused(
    make_relay: MakeRelay, config_dict: dict[str, Any]
) -> None:
    raw = milter_config(config_dict)
    raw["smtp"]["allowed_networks"] = ["192.0.2.0/24"]
    relay = await make_relay(raw)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.milter_port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


def test_header_edits_delete_last_first_and_insert_at_final_positions() -> None:
    def field(name: str, value: str) -> Header:
        return Header(name, f"{name}: {value}\r\n".encode())

    a, b, z = field("A", "1"), field("B", "2"), field("Z", "9")
    lu1, lu2 = field("List-Unsubscribe", "<x>"), field("List-Unsubscribe", "<y>")
    sig, new_lu = field("DKIM-Signature", "v=1"), field("List-Unsubscribe", "<mine>")
    edits = HeaderEdits([a, lu1, b, lu2], [sig, new_lu, a, b, z], leading_space=True)
    assert edits.deletions == [("List-Unsubscribe", 2), ("List-Unsubscribe", 1)]
    assert edits.inserts == [(0, sig), (1, new_lu)]
    assert edits.appends == [z]
    assert edits.value(sig) == " v=1"
    folded = Header("X", b"X: one\r\n two\r\n")
    assert HeaderEdits([], [], leading_space=False).value(folded) == "one\n two"


async def test_too_many_recipients_refused_at_end_of_message(
    make_relay: MakeRelay, config_dict: dict[str, Any]
) -> None:
    raw = milter_config(config_dict)
    raw["smtp"]["max_recipients"] = 2
    relay = await make_relay(raw)
    client = await client_for(relay)  # RCPT negotiated without replies: counted at the end
    rcpts = [f"u{i}@example.net" for i in range(3)]
    headers = [("From", "receipts@example.com"), *HEADERS[1:]]
    replies = await client.message("receipts@example.com", rcpts, headers, BODY)
    assert [r.command for r in replies] == ["y"]
    assert replies[0].strings()[0].startswith("452 4.5.3 ")
    await client.close()


async def test_verp_return_path_set_with_chgfrom_for_marketing_only(
    make_relay: MakeRelay, config_dict: dict[str, Any]
) -> None:
    raw = milter_config(config_dict)
    raw["bounces"] = {"return_path_domain": "bounce.example.com"}
    relay = await make_relay(raw)
    client = await client_for(relay)
    replies = await client.message("news@example.com", ["alice@example.net"], HEADERS, BODY)
    (change,) = [r.strings()[0] for r in replies if r.command == "e"]
    assert change.startswith("<bounces+") and change.endswith("@bounce.example.com>")
    headers = [("From", "receipts@example.com"), *HEADERS[1:5]]
    replies = await client.message("receipts@example.com", ["alice@example.net"], headers, BODY)
    assert not [r for r in replies if r.command == "e"]  # transactional: unchanged
    await client.close()


# ---------------------------------------------------------------------------
# Packets split from whole reads (relay.milter.protocol.PacketReader)


async def packets_from(chunks: list[bytes], eof: bool = True) -> list[p.Packet | None]:
    reader = asyncio.StreamReader()
    packets = p.PacketReader(reader)
    out: list[p.Packet | None] = []

    async def feed() -> None:
        for chunk in chunks:
            await asyncio.sleep(0)
            reader.feed_data(chunk)
        if eof:
            reader.feed_eof()

    feeder = asyncio.ensure_future(feed())
    while True:
        packet = await packets.next(5)
        out.append(packet)
        if packet is None:
            break
    await feeder
    return out


@settings(max_examples=200, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
async def test_any_split_of_the_stream_gives_the_same_packets(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(p.packet(p.HEADER, body) for body in bodies)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    got = await packets_from([c for c in chunks if c])
    assert got == [p.Packet(p.HEADER, body) for body in bodies] + [None]


@pytest.mark.parametrize("cut", [2, 7])
async def test_a_stream_that_ends_inside_a_packet_is_a_protocol_error(cut: int) -> None:
    with pytest.raises(p.ProtocolError, match="connection closed inside"):
        await packets_from([p.packet(p.BODY, b"hello world")[:cut]])


async def test_an_absurd_length_is_refused_before_anything_is_read_for_it() -> None:
    with pytest.raises(p.ProtocolError, match="out of range"):
        await packets_from([struct.pack("!I", p.MAX_PACKET + 1) + b"B"], eof=False)


async def test_a_packet_that_never_completes_times_out() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(p.packet(p.BODY, b"x" * 100)[:50])
    with pytest.raises(TimeoutError):
        await p.PacketReader(reader).next(0.2)
