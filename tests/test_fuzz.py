"""Property tests with hypothesis: garbage in never gets anything but a proper refusal out.

Three layers, each with random bytes and with *structured* garbage (header fields
with random names, values, folding and line endings; SMTP sessions built from
real verbs with mangled addresses and parameters; unsubscribe requests with
tampered tokens and odd bodies):

- ``Message.parse`` + ``from_address`` raise nothing but ``SmtpError`` subclasses,
  and a message they accept is rebuilt byte for byte;
- the real relay over SMTP answers every command with a well-formed reply
  (three digits; an RFC 3463 enhanced code of the same class on every 4xx/5xx),
  never an "internal error", and whatever it relays has CRLF line endings only
  and a DKIM signature that verifies;
- the real HTTP handler never answers 5xx to a bad token or body and never
  changes Redis.

The network properties share one relay for all examples (hypothesis runs every
example of an async test in the fixture's event loop through pytest-asyncio), so
the function-scoped-fixture health check is switched off on purpose.
"""

from __future__ import annotations

import asyncio
import base64
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import dkim
import pytest
import redis.asyncio as aioredis
from conftest import Keys, Sink
from helpers import build_config, message, smtp_send
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawsmtp import ProtocolError, RawSMTP, Reply
from yarl import URL

from relay.errors import SmtpError
from relay.mail.message import Message, from_address, normalize_line_endings
from relay.mail.tokens import TokenCodec
from relay.runtime.app import Relay
from relay.suppression.store import group_scope

PERL_VERIFIER = Path(__file__).parent / "tools" / "dkim_verify.pl"
NETWORK = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ---------------------------------------------------------------------------
# strategies: message bytes

EOLS = [b"\r\n", b"\n", b"\r", b"\r\r\n", b"\n\r"]
eol = st.one_of(st.just(b"\r\n"), st.sampled_from(EOLS))
name_chars = st.sampled_from(
    [bytes([c]) for c in range(0x21, 0x7F) if c != 0x3A] + [b" ", b"\t", b"\xc3\xa9", b"\0"]
)
field_name = st.one_of(
    st.sampled_from(
        [
            b"From",
            b"FROM",
            b"from",
            b"To",
            b"Subject",
            b"Date",
            b"Message-ID",
            b"Received",
            b"List-Unsubscribe",
            b"List-Unsubscribe-Post",
            b"DKIM-Signature",
            b"Content-Type",
        ]
    ),
    st.lists(name_chars, min_size=0, max_size=12).map(b"".join),
)
value_bytes = st.one_of(
    st.binary(max_size=80),
    st.text(max_size=60).map(lambda s: s.encode("utf-8", errors="surrogateescape")),
    st.sampled_from(
        [
            b"<a@example.com>",
            b"Name <news@example.com>",
            b"a@example.com, b@example.com",
            b'"quoted, name" <x@promo.example.com>',
            b"<>",
            b"@",
            b"undisclosed-recipients:;",
            b"=?utf-8?q?J=C3=B6rg?= <j@example.com>",
            b"(comment) a@b.c",
            b"a@[127.0.0.1]",
        ]
    ),
)


@st.composite
def header_field(draw: st.DrawFn) -> bytes:
    name = draw(field_name)
    colon = draw(st.sampled_from([b":", b": ", b" : ", b"", b"::"]))
    parts = draw(st.lists(value_bytes, min_size=1, max_size=3))
    out = name + colon + parts[0]
    for part in parts[1:]:  # random folding, some of it broken
        out += draw(eol) + draw(st.sampled_from([b" ", b"\t", b"", b"  "])) + part
    return out + draw(eol)


@st.composite
def structured_message(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(header_field(), max_size=8))
    if draw(st.booleans()):
        position = draw(st.integers(0, len(fields)))
        fields.insert(position, b"From: " + draw(value_bytes) + draw(eol))
    separator = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\n\r\n"]))
    body = draw(
        st.one_of(
            st.binary(max_size=300),
            st.lists(st.binary(max_size=40)).map(lambda lines: b"\r\n".join(lines)),
        )
    )
    return b"".join(fields) + separator + body


message_bytes = st.one_of(st.binary(max_size=2000), structured_message())


# ---------------------------------------------------------------------------
# 1. the parser


def _check_parse(data: bytes) -> None:
    refused: SmtpError | None = None
    try:
        parsed = Message.parse(data)
        sender = from_address(parsed)
    except SmtpError as exc:  # anything else propagates and fails the test
        refused = exc
    if refused is not None:
        reply = refused.reply
        assert 400 <= reply.code < 600
        assert re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", reply.enhanced)
        assert reply.enhanced[0] == str(reply.code)[0]
        return
    local, _, domain = sender.rpartition("@")
    assert local and "." in domain
    assert not set(sender) & set("\r\n\0"), sender
    normalized = normalize_line_endings(data)
    head = parsed.header_bytes()
    if normalized.startswith(head + b"\r\n"):  # the blank line ended the header block
        assert parsed.to_bytes() == normalized
    elif b"\r\n\r\n" in normalized:
        # a non-field line ended it (Postfix's rule): nothing lost, the separator put in
        assert head + parsed.body == normalized
        assert parsed.to_bytes() == head + b"\r\n" + parsed.body


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=3000))
def test_parse_random_bytes_raises_only_smtp_errors(data: bytes) -> None:
    _check_parse(data)


@settings(max_examples=400, deadline=None)
@given(data=structured_message())
def test_parse_structured_garbage_raises_only_smtp_errors(data: bytes) -> None:
    _check_parse(data)


# ---------------------------------------------------------------------------
# strategies: SMTP sessions

local_part = st.one_of(
    st.from_regex(rb"\A[a-z0-9][a-z0-9.+_-]{0,15}\Z"),
    st.sampled_from(
        [
            b"",
            b"a b",
            b'"a b"',
            b"j\xc3\xb6rg",
            b"a\xff",
            b"a\0b",
            b"a\rb",
            b"<",
            b">",
            b"a,b",
            b"a@b",
            b"(c)a",
            b".",
            b"a..b",
            b"x" * 70,
        ]
    ),
    st.binary(max_size=12),
)
domain = st.one_of(
    st.sampled_from(
        [
            b"example.net",
            b"example.com",
            b"promo.example.com",
            b"c",
            b"",
            b"[127.0.0.1]",
            b"[IPv6:::1]",
            b"exa mple.net",
            b"\xc3\xa9x.net",
        ]
    ),
    st.binary(max_size=12),
)
address = st.builds(
    lambda lp, at, dom: lp + at + dom, local_part, st.sampled_from([b"@", b"", b"@@"]), domain
)
path = st.one_of(
    address.map(lambda a: b"<" + a + b">"),
    address,
    st.just(b"<>"),
    st.builds(lambda a: b"<@relay.example:" + a + b">", address),
)
params = st.lists(
    st.sampled_from(
        [
            b"SMTPUTF8",
            b"BODY=8BITMIME",
            b"BODY=7BIT",
            b"SIZE=100",
            b"SIZE=x",
            b"SIZE=99999999999",
            b"FOO=bar",
            b"RET=FULL",
            b"NOTIFY=NEVER",
            b"=",
        ]
    ),
    max_size=3,
).map(lambda ps: b"".join(b" " + p for p in ps))
verb = st.sampled_from(
    [
        b"HELO",
        b"EHLO",
        b"NOOP",
        b"RSET",
        b"VRFY",
        b"EXPN",
        b"HELP",
        b"QUIT",
        b"STARTTLS",
        b"AUTH",
        b"BDAT",
        b"XCLIENT",
        b"ETRN",
        b"DATA",
        b"MAIL",
        b"RCPT",
        b"helo",
        b"MaIl",
    ]
)


def oneline(line: bytes) -> bytes:
    """A bare LF would end the command line early (and get a second reply): keep it out."""
    return line.replace(b"\n", b"")


no_newline = st.binary(max_size=80).map(oneline)
command = st.one_of(
    st.builds(lambda p, x: b"MAIL FROM:" + p + x, path, params),
    st.builds(lambda p, x: b"RCPT TO:" + p + x, path, params),
    st.builds(
        lambda v, sep, arg: v + sep + arg, verb, st.sampled_from([b" ", b"", b"\t"]), no_newline
    ),
    st.binary(max_size=600).map(oneline),
)
SENDERS = [b"news@example.com", b"receipts@example.com", b"x@promo.example.com", b"a@other.org"]
GOOD_RCPTS = [b"a@example.net", b"b@example.org", b"c@example.com"]
one_line_value = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def wellformed_message(draw: st.DrawFn) -> bytes:
    """One From, sane field names; random values, folding, line endings and body bytes."""
    per_line = draw(st.booleans())
    fixed = draw(eol)

    def end() -> bytes:
        return draw(eol) if per_line else fixed

    display = draw(st.sampled_from([b"", b"Name ", b'"Q, R" ', b"J\xc3\xb6rg "]))
    fields = [b"From: " + display + b"<" + draw(st.sampled_from(SENDERS)) + b">"]
    fields.append(b"To: " + draw(st.sampled_from(GOOD_RCPTS)))
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,20}\Z"))
        if name.lower() == b"from":
            continue
        value = draw(one_line_value)
        for part in draw(st.lists(one_line_value, max_size=2)):
            value += end() + draw(st.sampled_from([b" ", b"\t"])) + part
        fields.append(name + b":" + draw(st.sampled_from([b" ", b""])) + value)
    fields = draw(st.permutations(fields))
    body = draw(st.one_of(st.binary(max_size=500), st.just(b"")))
    return b"".join(f + end() for f in fields) + end() + body


@st.composite
def transaction(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """A plausible transaction with random content: reaches the pipeline most of the time."""
    sender = draw(st.one_of(st.sampled_from(SENDERS), address))
    rcpts = [draw(st.sampled_from(GOOD_RCPTS))]
    rcpts += draw(st.lists(st.one_of(st.sampled_from(GOOD_RCPTS), address), max_size=2))
    content = draw(
        st.one_of(
            wellformed_message(),
            message_bytes,
            st.builds(
                lambda s, extra: b"From: <" + s + b">\r\nTo: a@example.net\r\n" + extra,
                st.sampled_from(SENDERS),
                message_bytes,
            ),
        )
    )
    mail_params = draw(st.one_of(st.just(b""), st.just(b" SMTPUTF8"), params))
    steps = [("cmd", oneline(b"MAIL FROM:<" + sender + b">" + mail_params))]
    steps += [("cmd", oneline(b"RCPT TO:<" + r + b">")) for r in rcpts]
    steps.append(("data", content))
    return steps


step = st.one_of(
    command.map(lambda c: [("cmd", oneline(c))]),
    message_bytes.map(lambda m: [("data", m)]),
    transaction(),
    transaction(),
)
session = st.builds(
    lambda hello, steps: [*hello, *(s for group in steps for s in group)],
    st.one_of(
        st.just([("cmd", b"EHLO client.test")]),
        st.sampled_from([[("cmd", b"HELO client.test")], []]),
    ),
    st.lists(step, min_size=1, max_size=5),
)


def stuff(data: bytes) -> bytes:
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    lines = data.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"


def check_reply(reply: Reply, sent: bytes) -> None:
    where = f"reply {reply} to {sent[:120]!r}"
    assert "internal error" not in " ".join(reply.lines).lower(), where
    if reply.code >= 400:
        assert reply.code < 600, where
        assert reply.enhanced is not None, f"no enhanced status code: {where}"
        assert reply.enhanced[0] == str(reply.code)[0], where


class Session:
    """A raw client that reconnects after QUIT or 421 and checks every reply."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client: RawSMTP | None = None
        self.replies: list[Reply] = []

    async def _connected(self) -> RawSMTP:
        if self.client is None:
            self.client = await RawSMTP.open(self.port, timeout=30)
            assert self.client.greeting is not None and self.client.greeting.code == 220
        return self.client

    async def _answer(self, sent: bytes) -> Reply:
        assert self.client is not None
        try:
            reply = await self.client.reply()
        except ConnectionResetError as exc:
            raise AssertionError(f"relay closed the connection after {sent[:120]!r}") from exc
        except ProtocolError as exc:
            raise AssertionError(f"malformed reply to {sent[:120]!r}: {exc}") from exc
        check_reply(reply, sent)
        self.replies.append(reply)
        if reply.code in (221, 421):
            await self.close()
        return reply

    async def run(self, kind: str, payload: bytes) -> None:
        client = await self._connected()
        if kind == "cmd":
            await client.send(payload + b"\r\n")
            await self._answer(payload)
            return
        await client.send(b"DATA\r\n")
        reply = await self._answer(b"DATA")
        if reply.code == 354:
            await client.send(stuff(payload))
            await self._answer(payload)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None


async def _idle(relay: Relay) -> None:
    assert relay.handler is not None
    for _ in range(3000):
        if not relay.handler.inflight:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(relay.handler.inflight)} transactions still running after 30 s")


class Env:
    """The fixtures a network property needs; a short repr keeps hypothesis' report readable."""

    def __init__(
        self, relay: Relay, sink: Sink, keys: Keys, config: dict[str, Any], dns_file: Path
    ) -> None:
        self.relay = relay
        self.sink = sink
        self.keys = keys
        self.config = config
        self.dns_file = dns_file

    def __repr__(self) -> str:
        return f"Env(smtp={self.relay.smtp_port}, http={self.relay.http_port})"

    def dkim_verifies(self, data: bytes) -> bool:
        """dkimpy; where its parser refuses the message (obsolete but legal header syntax
        such as ``To : x``), the independent Mail::DKIM verifier decides."""
        try:
            return bool(dkim.verify(data, dnsfunc=self.keys.dnsfunc))
        except dkim.MessageFormatError:
            pass
        out = subprocess.run(
            ["perl", str(PERL_VERIFIER), str(self.dns_file)],
            input=data,
            capture_output=True,
            timeout=60,
            check=False,
        )
        results = [line.split("\t", 1)[0] for line in out.stdout.decode().splitlines()]
        return out.returncode == 0 and bool(results) and all(r == "pass" for r in results)


@pytest.fixture
def env(relay: Relay, sink: Sink, keys: Keys, config_dict: dict[str, Any], tmp_path: Path) -> Env:
    return Env(relay, sink, keys, config_dict, keys.write_dns_file(tmp_path / "dns.txt"))


async def run_script(env: Env, script: list[tuple[str, bytes]]) -> None:
    """Play a session; check every reply, what was relayed, and that the relay still serves."""
    relay, sink = env.relay, env.sink
    before = len(sink.handler.messages)
    client = Session(relay.smtp_port)
    try:
        for kind, payload in script:
            await client.run(kind, payload)
        if client.client is not None:
            await client.run("cmd", b"QUIT")
    finally:
        await client.close()
    await _idle(relay)
    for got in sink.handler.messages[before:]:
        data = got.data
        assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r"), data[:300]
        if data.startswith(b"DKIM-Signature:"):
            assert env.dkim_verifies(data), data[:600]
        assert not any(set(r) & set("\r\n\0<>") for r in got.rcpt_tos), got.rcpt_tos
    code, text = await smtp_send(
        relay.smtp_port, "x@example.com", ["a@example.net"], message(sender="receipts@example.com")
    )
    assert code == 250, f"relay no longer serves after {script!r}: {code} {text}"


@NETWORK
@given(script=session)
async def test_smtp_session_garbage_gets_well_formed_replies(
    env: Env, script: list[tuple[str, bytes]]
) -> None:
    await run_script(env, script)


# Sessions this property found; each runs on a fresh relay (so a fresh upstream pool) every
# time, whatever the random search above happens to draw.
KNOWN = {
    "smtputf8-sender-fresh-upstream-connection": [
        ("cmd", b"EHLO client.test"),
        ("cmd", "MAIL FROM:<jörg@example.com> SMTPUTF8".encode()),
        ("cmd", b"RCPT TO:<a@example.net>"),
        ("data", b"From: <receipts@example.com>\r\nTo: a@example.net\r\n\r\nhi\r\n"),
    ],
    "reverse-path-with-space-and-no-at": [
        ("cmd", b"EHLO client.test"),
        ("cmd", b"MAIL FROM:<exa mple.net>"),
        ("cmd", b"RCPT TO:<a@example.net>"),
        ("data", b"From: <news@example.com>\r\nTo: a@example.net\r\n"),
    ],
    "control-character-in-reverse-path": [
        ("cmd", b"EHLO client.test"),
        ("cmd", b"MAIL FROM:<x\x0cy@example.com>"),
        ("cmd", b"RCPT TO:<a@example.net>"),
        ("data", b"From: <receipts@example.com>\r\nTo: a@example.net\r\n\r\nhi\r\n"),
    ],
    "invalid-utf8-in-recipient": [
        ("cmd", b"EHLO client.test"),
        ("cmd", b"MAIL FROM:<receipts@example.com>"),
        ("cmd", b"RCPT TO:<a\xff@example.net>"),
        ("data", b"From: <receipts@example.com>\r\nTo: a@example.net\r\n\r\nhi\r\n"),
    ],
    "obsolete-header-syntax-signed-and-verifiable": [
        ("cmd", b"EHLO client.test"),
        ("cmd", b"MAIL FROM:<news@example.com>"),
        ("cmd", b"RCPT TO:<a@example.net>"),
        ("data", b"From: <news@example.com>\r\nTo : a@example.net\r\nSubject\t: x\r\n\r\nhi\r\n"),
    ],
}


@pytest.mark.parametrize("name", KNOWN.keys())
async def test_smtp_session_found_by_fuzzing(env: Env, name: str) -> None:
    await run_script(env, KNOWN[name])


# ---------------------------------------------------------------------------
# 3. HTTP: /u/{token}

b64 = st.binary(min_size=0, max_size=120).map(
    lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
)
random_token = st.one_of(
    st.text(max_size=80),
    st.builds(lambda kid, p: f"{kid}.{p}", st.sampled_from(["k1", "k2", "zz", "", "K1"]), b64),
    st.text(alphabet="ABCabc012-_.=%/+ ", max_size=600),
    st.just("k1." + "A" * 600),
)
CONTENT_TYPES = [
    None,
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "multipart/form-data",
    "multipart/form-data; boundary=",
    "text/plain",
    "application/json",
    "application/x-www-form-urlencoded; charset=utf-16",
]
post_body = st.one_of(
    st.just(b""),
    st.just(b"List-Unsubscribe=One-Click"),
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", errors="surrogateescape")),
    st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20)), max_size=4).map(
        lambda kv: "&".join(f"{quote(k)}={quote(v)}" for k, v in kv).encode()
    ),
    st.builds(
        lambda name, value, tail: (
            b'--xyz\r\nContent-Disposition: form-data; name="'
            + name
            + b'"\r\n\r\n'
            + value
            + b"\r\n"
            + tail
        ),
        st.sampled_from([b"List-Unsubscribe", b"via", b"", b'"', b"\xff"]),
        st.binary(max_size=40),
        st.sampled_from([b"--xyz--\r\n", b"--xyz", b"", b"--abc--\r\n", b"--xyz\r\n"]),
    ),
    st.just(b"List-Unsubscribe=One-Click&" + b"x" * 9000),
)


def mutate(token: str, data: st.DataObject) -> str:
    """A tampered copy of a real token: one character changed, cut, or extended."""
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "kid"]))
    if how == "kid":
        return "k2" + token[2:]
    if how == "cut":
        return token[: data.draw(st.integers(0, len(token) - 1))]
    if how == "extend":
        return token + data.draw(st.text(alphabet="A_-0=.", min_size=1, max_size=4))
    position = data.draw(st.integers(3, len(token) - 1))
    alphabet = "ABCDEFabcdef0123456789-_"
    replacement = alphabet[data.draw(st.integers(0, len(alphabet) - 1))]
    if replacement == token[position]:  # keep the draws independent of the token's content
        replacement = alphabet[(alphabet.index(replacement) + 1) % len(alphabet)]
    return token[:position] + replacement + token[position + 1 :]


async def redis_state(client: aioredis.Redis) -> dict[bytes, bytes | None]:
    keys = [key async for key in client.scan_iter(count=1000)]
    return {key: await client.dump(key) for key in sorted(keys)}


@NETWORK
@given(data=st.data())
async def test_unsubscribe_garbage_never_5xx_never_changes_redis(
    env: Env, data: st.DataObject
) -> None:
    relay, config_dict = env.relay, env.config
    assert relay.store is not None
    await relay.store.add("seed@example.net", group_scope("newsletter"), "unsubscribe", "test")
    codec = TokenCodec(build_config(config_dict).tokens)
    real = codec.issue("victim@example.net", "newsletter")
    method = data.draw(st.sampled_from(["GET", "POST"]))
    # a GET must not change anything, even with a valid token; a POST only gets bad ones
    kinds = ["random", "tampered", "real"] if method == "GET" else ["random", "tampered"]
    kind = data.draw(st.sampled_from(kinds))
    if kind == "random":
        token = data.draw(random_token)
    elif kind == "tampered":
        token = mutate(real, data)
    else:
        token = real
    assert method == "GET" or token != real
    body = data.draw(post_body) if method == "POST" else b""
    content_type = data.draw(st.sampled_from(CONTENT_TYPES)) if method == "POST" else None
    headers = {"Content-Type": content_type} if content_type else {}
    url = URL(f"http://127.0.0.1:{relay.http_port}/u/{quote(token, safe='')}", encoded=True)
    client = aioredis.Redis.from_url(relay.redis_url)
    try:
        before = await redis_state(client)
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.request(
                method,
                url,
                data=body,
                headers=headers,
                skip_auto_headers=[] if content_type else ["Content-Type"],
                allow_redirects=False,
            ) as response,
        ):
            await response.read()
            status = response.status
        after = await redis_state(client)
    finally:
        await client.aclose()
    assert status < 500, f"{method} {token!r} {content_type} {body[:100]!r} -> {status}"
    assert status != 200 or method == "GET", f"POST {token!r} was honoured"
    assert after == before, f"{method} {token!r} changed Redis"
