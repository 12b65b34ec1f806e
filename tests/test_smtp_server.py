"""DATA framing in ``relay.smtp.server._CrlfReader.read_data``, against a line-by-line reference.

The reader takes the message out of the stream buffer in one piece instead of one
``readuntil`` per line. Each case feeds a real ``asyncio.StreamReader`` the bytes a
client sends, split at arbitrary points (as TCP may split them), and compares with
what RFC 5321 4.5.2 says the message is: the lines before the ``.`` line, each with
one leading dot removed. End to end over sockets: tests/e2e/test_bad_input.py.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import SmtpConfig
from relay.limits import ConnectionLimiter
from relay.smtp.server import (
    TOO_LONG,
    TOO_MUCH,
    BareLineFeedTerminator,
    RelayHandler,
    RelaySMTP,
    _CrlfReader,
)


def reference(stream: bytes) -> tuple[bytes, bytes]:
    """The message and what follows the end of data, one CRLF line at a time."""
    lines, rest = [], stream
    while True:
        line, sep, rest = rest.partition(b"\r\n")
        assert sep, "the stream has no end of data"
        if line == b".":
            return b"".join(lines), rest
        lines.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


async def read(
    chunks: list[bytes], max_size: int | None = None, max_line: int = 1 << 20, eof: bool = False
) -> tuple[bytes | str, bytes]:
    """Feed ``chunks`` one by one as the reader waits; the result and what is left unread."""
    reader = _CrlfReader(limit=1 << 20)
    task = asyncio.ensure_future(reader.read_data(max_size, max_line))
    for chunk in chunks:
        await asyncio.sleep(0)
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    result = await asyncio.wait_for(task, 5)
    reader.feed_eof()
    return result, await reader.read()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
dotted = st.one_of(line, line.map(lambda b: b"." + b), st.just(b"."), st.just(b".."))


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(dotted.filter(lambda b: b != b"."), max_size=30),
    after=st.sampled_from(
        [b"", b"RSET\r\n", b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"]
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
async def test_any_split_gives_the_reference_message(
    lines: list[bytes], after: bytes, cuts: list[int]
) -> None:
    # no line of the message may be "." itself: that is the end of data
    stream = b"".join(b"." + x + b"\r\n" if x.startswith(b".") else x + b"\r\n" for x in lines)
    stream += b".\r\n" + after
    message, rest = reference(stream)
    got, unread = await read(split(stream, cuts))
    assert got == message
    assert unread == rest == after


async def test_every_split_of_the_end_of_data() -> None:
    stream = b"Subject: x\r\n\r\n..leading dot\r\nbody\r\n.\r\nQUIT\r\n"
    for cut in range(1, len(stream)):
        got, unread = await read([stream[:cut], stream[cut:]])
        assert got == b"Subject: x\r\n\r\n.leading dot\r\nbody\r\n", cut
        assert unread == b"QUIT\r\n", cut


async def test_one_byte_at_a_time() -> None:
    stream = b"a\r\n.b\r\n\r\n.\r\n"
    got, unread = await read([bytes([c]) for c in stream])
    assert got == b"a\r\nb\r\n\r\n"
    assert unread == b""


async def test_empty_message() -> None:
    assert await read([b".\r\nQUIT\r\n"]) == (b"", b"QUIT\r\n")


@pytest.mark.parametrize("stream", [b"a\r\n. \r\n.\r\n", b"a\r\n.x.\r\n\r\n.\r\n", b"x.\r\n.\r\n"])
async def test_dots_that_do_not_end_data(stream: bytes) -> None:
    assert (await read([stream]))[0] == reference(stream)[0]


async def test_over_max_size_is_552_after_the_dot_and_nothing_kept() -> None:
    body = b"x" * 70 + b"\r\n"
    chunks = [body * 100] * 50  # 360 KB, in 50 chunks
    reader_result, unread = await read([*chunks, b".\r\nRSET\r\n"], max_size=10_000)
    assert reader_result == TOO_MUCH
    assert unread == b"RSET\r\n"


async def test_exactly_max_size_is_kept() -> None:
    data = b"y" * 98 + b"\r\n"
    assert (await read([data + b".\r\n"], max_size=100))[0] == data
    assert (await read([data + b".\r\n"], max_size=99))[0] == TOO_MUCH


@pytest.mark.parametrize("pieces", [1, 3, 200])
async def test_line_over_max_line_is_500(pieces: int) -> None:
    long_line = b"a\r\n" + b"z" * 5000 + b"\r\nb\r\n.\r\nNOOP\r\n"
    size = -(-len(long_line) // pieces)
    chunks = [long_line[i : i + size] for i in range(0, len(long_line), size)]
    assert await read(chunks, max_line=1000) == (TOO_LONG, b"NOOP\r\n")


@pytest.mark.parametrize("split_at", [None, 500])
@pytest.mark.parametrize(("length", "kept"), [(1000, True), (1001, False)])
async def test_the_line_limit_counts_the_crlf(
    split_at: int | None, length: int, kept: bool
) -> None:
    # between short lines, so the stretch read at once is longer than a line may be
    data = b"a\r\n" * 300 + b"q" * (length - 2) + b"\r\n" + b"b\r\n" * 300
    chunks = (
        [data + b".\r\n"] if split_at is None else [data[:split_at], data[split_at:] + b".\r\n"]
    )
    assert (await read(chunks, max_line=1000))[0] == (data if kept else TOO_LONG)


async def test_bare_lf_terminator_raises_even_when_split() -> None:
    for stream in (b"a\n.\n", b"a\r\nb\n.\nmore"):
        for cut in range(1, len(stream)):
            with pytest.raises(BareLineFeedTerminator):
                await read([stream[:cut], stream[cut:]])


async def test_eof_before_the_end_of_data_is_a_lost_connection() -> None:
    with pytest.raises(ConnectionResetError):
        await read([b"Subject: cut\r\n\r\nhalf"], eof=True)


async def test_aiosmtpd_finds_every_command_and_hook_through_the_cached_names() -> None:
    handler = RelayHandler.__new__(RelayHandler)  # only its methods are looked at
    handler.limiter = ConnectionLimiter(1, 1)
    server = RelaySMTP(handler, SmtpConfig())
    every = object.__dir__(server)
    assert set(server._smtp_methods) == {n[5:] for n in every if n.startswith("smtp_")}
    assert {n for n in object.__dir__(handler) if n.startswith("handle_")} == {
        f"handle_{n}" for n in server._handle_hooks
    }
    assert {"DATA", "EHLO", "MAIL", "RCPT"} <= set(server._handle_hooks)
    assert {"PLAIN", "LOGIN"} <= set(server._auth_methods)


async def test_a_multi_line_reply_is_one_write() -> None:
    """EHLO's seven lines leave in one write (one segment), not one system call per line."""
    writes: list[bytes] = []

    class Recording(RelaySMTP):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.WriteTransport)
            real = transport.write

            def write(data: bytes | bytearray | memoryview) -> None:
                writes.append(bytes(data))
                real(data)

            transport.write = write  # type: ignore[method-assign]
            super().connection_made(transport)

    handler = RelayHandler.__new__(RelayHandler)  # EHLO looks only at users and limiter
    handler.limiter, handler.users = ConnectionLimiter(4, 4), None
    config = SmtpConfig(hostname="relay.test")
    server = await asyncio.get_running_loop().create_server(
        lambda: Recording(handler, config), "127.0.0.1", 0
    )
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"EHLO client.test\r\n")
        lines = [await reader.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(await asyncio.wait_for(reader.readline(), 5))
        writer.close()
    finally:
        server.close()
    assert len(lines) >= 5 and b"PIPELINING" in b"".join(lines)
    assert writes[1] == b"".join(lines)  # writes[0] is the greeting
