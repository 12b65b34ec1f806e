"""relay.message (bytes in, header block only) and relay.model.normalize_address."""

from __future__ import annotations

from email.utils import getaddresses

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.errors import PermFail
from relay.mail.address import (
    _PLAIN,
    AddressError,
    _problem,
    address_problem,
    canonical_address,
    canonical_domain,
    domain_of,
    normalize_address,
)
from relay.mail.message import (
    MAX_HEADER_BLOCK,
    MAX_LINE,
    Header,
    Message,
    MessageError,
    _simple_from,
    fold,
    from_address,
    normalize_line_endings,
)

SAMPLE = (
    b"From: Example News <news@example.com>\r\n"
    b"To: alice@example.net,\r\n"
    b"\tbob@example.org\r\n"
    b"Subject:   folded   subject\r\n"
    b"  continues here  \r\n"
    b"X-Odd-Spacing :value\r\n"
    b"\r\n"
    b"Body line 1\r\n"
    b"\r\n"
    b"Body line 3 after a blank line\r\n"
)


# ---------------------------------------------------------------------------
# Line endings


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a\nb\n\nc\n", b"a\r\nb\r\n\r\nc\r\n"),
        (b"a\rb\r\rc\r", b"a\r\nb\r\n\r\nc\r\n"),
        (b"a\r\nb\nc\rd\r\n", b"a\r\nb\r\nc\r\nd\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb"),
        (b"a\n\rb", b"a\r\n\r\nb"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"no line ending", b"no line ending"),
        (b"", b""),
    ],
)
def test_normalize_line_endings(data: bytes, expected: bytes) -> None:
    assert normalize_line_endings(data) == expected


@settings(max_examples=300)
@given(st.lists(st.sampled_from([b"x", b"yz", b"\r", b"\n", b"\r\n", b" "]), max_size=40))
def test_normalized_has_only_crlf(parts: list[bytes]) -> None:
    out = normalize_line_endings(b"".join(parts))
    assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")
    assert normalize_line_endings(out) == out
    assert out.replace(b"\r\n", b"") == b"".join(parts).replace(b"\r", b"").replace(b"\n", b"")


def test_bare_lf_message_is_parsed_as_crlf() -> None:
    msg = Message.parse(SAMPLE.replace(b"\r\n", b"\n"))
    assert msg.to_bytes() == SAMPLE
    msg = Message.parse(SAMPLE.replace(b"\r\n", b"\r"))
    assert msg.to_bytes() == SAMPLE


# ---------------------------------------------------------------------------
# Parsing: header fields byte-exact, body untouched


def test_fields_kept_byte_exact_including_folding() -> None:
    msg = Message.parse(SAMPLE)
    assert [h.name for h in msg.headers] == ["From", "To", "Subject", "X-Odd-Spacing"]
    assert msg.headers[1].raw == b"To: alice@example.net,\r\n\tbob@example.org\r\n"
    assert msg.headers[2].raw == b"Subject:   folded   subject\r\n  continues here  \r\n"
    assert msg.headers[3].raw == b"X-Odd-Spacing :value\r\n"
    assert msg.body == b"Body line 1\r\n\r\nBody line 3 after a blank line\r\n"
    assert msg.to_bytes() == SAMPLE
    assert msg.header_bytes() == SAMPLE.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def test_header_value_is_unfolded() -> None:
    msg = Message.parse(SAMPLE)
    assert msg.get_all("subject")[0].value == "folded subject continues here"
    assert msg.get_all("TO")[0].value == "alice@example.net, bob@example.org"
    assert msg.has("x-odd-spacing")
    assert not msg.has("Cc")


def test_message_without_body() -> None:
    msg = Message.parse(b"From: a@example.com\r\nSubject: x")
    assert msg.body == b""
    assert [h.raw for h in msg.headers] == [b"From: a@example.com\r\n", b"Subject: x\r\n"]


@pytest.mark.parametrize("data", [b"\r\njust a body\r\n", b"just a body\r\nSubject: x\r\n"])
def test_no_header_block_is_all_body(data: bytes) -> None:
    """As Postfix: no header field first means no header block; nothing is refused."""
    msg = Message.parse(data)
    assert msg.headers == ()
    assert msg.body.endswith(b"just a body\r\n" + data.split(b"just a body\r\n")[1])


def test_8bit_header_bytes_survive_round_trip() -> None:
    data = (
        b"From: =?utf-8?q?J=C3=BCrgen?= <news@example.com>\r\n"
        b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
        b"X-Latin1: caf\xe9\r\n"
        b"\r\n"
        b"body \xff\xfe\r\n"
    )
    msg = Message.parse(data)
    assert msg.to_bytes() == data
    assert msg.get_all("Subject")[0].value == "Grüße aus Köln"
    latin = msg.get_all("X-Latin1")[0]
    assert latin.value.encode("utf-8", "surrogateescape") == b"caf\xe9"
    rebuilt = msg.replace(prepend=[Header.build("X-New", "added")])
    assert rebuilt.to_bytes() == b"X-New: added\r\n" + data


def test_line_of_998_octets_is_accepted_999_refused() -> None:
    ok = b"From: a@example.com\r\nX-Long: " + b"a" * (MAX_LINE - 8) + b"\r\n\r\nbody\r\n"
    assert max(len(line) for line in ok.split(b"\r\n")) == MAX_LINE
    Message.parse(ok)
    too_long = ok.replace(b"X-Long: ", b"X-Long:  ")
    with pytest.raises(MessageError) as err:
        Message.parse(too_long)
    assert (err.value.reply.code, err.value.reply.enhanced) == (550, "5.6.0")
    assert "998" in err.value.reply.text


def test_long_body_line_is_refused() -> None:
    data = b"From: a@example.com\r\n\r\n" + b"b" * (MAX_LINE + 1) + b"\r\n"
    with pytest.raises(MessageError):
        Message.parse(data)


def test_long_line_with_bare_lf_is_refused() -> None:
    data = b"From: a@example.com\n\n" + b"b" * (MAX_LINE + 1) + b"\n"
    with pytest.raises(MessageError):
        Message.parse(data)


def test_header_block_over_256k_is_552() -> None:
    line = b"X-Filler: " + b"f" * 90 + b"\r\n"
    block = b"From: a@example.com\r\n" + line * (MAX_HEADER_BLOCK // len(line) + 10)
    assert len(block) > MAX_HEADER_BLOCK
    for data in (block + b"\r\nbody\r\n", block):
        with pytest.raises(PermFail) as err:
            Message.parse(data)
        assert (err.value.reply.code, err.value.reply.enhanced) == (552, "5.3.4")


def test_large_body_with_small_header_is_fine() -> None:
    body = (b"x" * 100 + b"\r\n") * 5000
    msg = Message.parse(b"From: a@example.com\r\n\r\n" + body)
    assert msg.body == body


def test_nul_in_header_is_refused() -> None:
    with pytest.raises(MessageError) as err:
        Message.parse(b"From: a@example.com\r\nSubject: a\0b\r\n\r\nbody\r\n")
    assert err.value.reply.code == 550
    assert "NUL" in err.value.reply.text


def test_continuation_line_first_starts_the_body() -> None:
    data = b" From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    msg = Message.parse(data)
    assert (msg.headers, msg.body) == ((), data)


@pytest.mark.parametrize(
    "line", [b"no colon here", b": empty name", b"Bad Name: x", b"Caf\xc3\xa9: x"]
)
def test_header_line_that_is_not_a_field_starts_the_body(line: bytes) -> None:
    """Postfix's rule: the first line that is not a header field starts the body; what is
    sent gets the blank separator, so a signature covers exactly the bytes sent."""
    msg = Message.parse(b"From: a@example.com\r\n" + line + b"\r\nSubject: y\r\n\r\nbody\r\n")
    assert [h.name for h in msg.headers] == ["From"]
    assert msg.body == line + b"\r\nSubject: y\r\n\r\nbody\r\n"
    assert msg.to_bytes() == b"From: a@example.com\r\n\r\n" + msg.body


def test_header_block_ended_by_a_non_field_line_still_bounded() -> None:
    line = b"X-Filler: " + b"f" * 90 + b"\r\n"
    block = b"From: a@example.com\r\n" + line * (MAX_HEADER_BLOCK // len(line) + 10)
    with pytest.raises(PermFail) as err:
        Message.parse(block + b"not a field\r\nbody\r\n")
    assert err.value.reply.code == 552


# ---------------------------------------------------------------------------
# From address


def parse(headers: str) -> Message:
    return Message.parse(headers.encode() + b"\r\n\r\nbody\r\n")


@pytest.mark.parametrize(
    ("header", "address"),
    [
        ("From: news@example.com", "news@example.com"),
        ("From: Example News <news@example.com>", "news@example.com"),
        ('From: "News, Example" <news@example.com>', "news@example.com"),
        ("From: news@example.com (Example News)", "news@example.com"),
        ("FROM:\r\n Example\r\n <News@Example.com>", "News@Example.com"),
    ],
)
def test_from_address(header: str, address: str) -> None:
    assert from_address(parse(f"{header}\r\nSubject: x")) == address


@pytest.mark.parametrize(
    ("headers", "text"),
    [
        ("To: a@example.net\r\nSubject: none", "no From header"),
        ("From: a@example.com\r\nFrom: b@example.com", "more than one From header"),
        ("From: a@example.com, b@example.com", "more than one address"),
        ("From: Alice <a@example.com>, Bob <b@example.com>", "more than one address"),
        ("From: alice", "no domain"),
        ("From: alice@", "no parseable address"),
        ("From: alice@localhost", "no domain"),
        ("From: <>", "no parseable address"),
        ("From: undisclosed-recipients:;", "no parseable address"),
        ("From: <<<>>>", "no parseable address"),
    ],
)
def test_from_address_errors(headers: str, text: str) -> None:
    with pytest.raises(MessageError) as err:
        from_address(parse(headers))
    reply = err.value.reply
    assert (reply.code, reply.enhanced) == (550, "5.6.0")
    assert text in reply.text
    assert "From" in reply.text


# ---------------------------------------------------------------------------
# fold() and Header.build


def test_fold_short_value_is_one_line() -> None:
    assert fold("List-Unsubscribe-Post", "List-Unsubscribe=One-Click") == (
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    )


def test_fold_list_unsubscribe_keeps_78() -> None:
    url = "<https://unsubscribe.example.com/u/k1." + "A" * 20 + ">,"
    raw = fold("List-Unsubscribe", f"{url} <mailto:unsubscribe@example.com?subject=u>")
    lines = raw.split(b"\r\n")[:-1]
    assert len(lines) == 2
    assert all(len(line) <= 78 for line in lines)
    assert lines[1].startswith(b" <mailto:")


def test_fold_long_word_stays_on_the_name_line() -> None:
    url = "<https://unsubscribe.example.com/u/k1." + "A" * 200 + ">"
    raw = fold("List-Unsubscribe", url)
    assert raw == f"List-Unsubscribe: {url}\r\n".encode()


def test_fold_word_too_long_to_fold() -> None:
    with pytest.raises(ValueError, match="cannot be folded"):
        fold("X-Long", "a" * 1000)


_words = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=120)


@settings(max_examples=300)
@given(
    name=st.sampled_from(["X", "List-Unsubscribe", "X-A-Rather-Long-Header-Field-Name"]),
    words=st.lists(_words, min_size=1, max_size=30),
)
def test_fold_lines_short_and_unfold_back(name: str, words: list[str]) -> None:
    value = " ".join(words)
    raw = fold(name, value)
    assert raw.endswith(b"\r\n")
    lines = raw[:-2].split(b"\r\n")
    for index, line in enumerate(lines):
        assert len(line) <= MAX_LINE
        assert line.strip(), "no whitespace-only lines"
        if index:
            assert line.startswith(b" ")
        # a line over 78 octets holds a single word that cannot be split
        if len(line) > 78:
            assert len(line.split(b" ")) <= 3
    assert raw[:-2].replace(b"\r\n", b"") == f"{name}: {value}".encode()
    reparsed = Message.parse(b"From: a@example.com\r\n" + raw + b"\r\nbody\r\n")
    assert reparsed.headers[1].raw == raw
    assert reparsed.headers[1].value == value


@settings(max_examples=200)
@given(
    name=st.sampled_from(["X", "List-Unsubscribe", "X-A-Rather-Long-Header-Field-Name"]),
    words=st.lists(
        st.integers(min_value=1, max_value=100) | st.integers(min_value=940, max_value=1000),
        min_size=1,
        max_size=4,
    ),
)
@example(name="X", words=[996])
@example(name="List-Unsubscribe", words=[980])
@example(name="X", words=[10, 996])
def test_fold_never_exceeds_998(name: str, words: list[int]) -> None:
    value = " ".join("w" * n for n in words)
    try:
        raw = fold(name, value)
    except ValueError:
        return  # refusing is allowed; producing an over-long line is not
    assert max(len(line) for line in raw.split(b"\r\n")) <= MAX_LINE, raw[:60]


def test_header_build() -> None:
    header = Header.build("List-Id", "Example News <newsletter.example.com>")
    assert header.name == "List-Id"
    assert header.lname == "list-id"
    assert header.raw == b"List-Id: Example News <newsletter.example.com>\r\n"
    assert header.value == "Example News <newsletter.example.com>"


# ---------------------------------------------------------------------------
# Message.replace


def test_replace_remove_prepend_append() -> None:
    data = (
        b"Received: from a\r\nFrom: news@example.com\r\n"
        b"List-Unsubscribe: <https://app/u>\r\nlist-unsubscribe-post: x\r\n"
        b"Subject: hi\r\n\r\nbody\r\n"
    )
    msg = Message.parse(data)
    new = msg.replace(
        remove=["List-Unsubscribe", "LIST-UNSUBSCRIBE-POST"],
        prepend=[Header.build("Received", "from relay"), Header.build("X-First", "1")],
        append=[
            Header.build("List-Unsubscribe", "<https://u.example.com/u/t>"),
            Header.build("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ],
    )
    assert [h.name for h in new.headers] == [
        "Received",
        "X-First",
        "Received",
        "From",
        "Subject",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
    ]
    assert new.body == msg.body
    assert new.to_bytes().startswith(b"Received: from relay\r\nX-First: 1\r\nReceived: from a\r\n")
    assert new.to_bytes().endswith(
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nbody\r\n"
    )
    # the original is unchanged
    assert msg.to_bytes() == data
    # no-op replace keeps the same fields
    assert msg.replace().to_bytes() == data
    assert msg.replace(remove=["X-Not-There"]).to_bytes() == data


# ---------------------------------------------------------------------------
# normalize_address


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("alice@example.net", "alice@example.net"),
        ("Alice@Example.NET", "alice@example.net"),
        ("ALICE@EXAMPLE.NET", "alice@example.net"),
        ("<alice@example.net>", "alice@example.net"),
        ("  < Alice@Example.net >  ", "alice@example.net"),
        ("user@Bücher.Example", "user@xn--bcher-kva.example"),
        ("user@BÜCHER.example", "user@xn--bcher-kva.example"),
        ("user@xn--bcher-kva.example", "user@xn--bcher-kva.example"),
        ("Ñandú@example.com", "ñandú@example.com"),
        ('"John.Doe"@Example.com', "john.doe@example.com"),  # quotes of a dot-atom go
        ('"John Doe"@Example.com', '"john doe"@example.com'),  # needed quotes stay
        ('"a\\"b"@example.com', '"a\\"b"@example.com'),
        ('"a\\bc"@example.com', "abc@example.com"),  # a needless escape
        ("news@example.com.", "news@example.com"),  # the DNS root
        ("<news@Example.COM.>", "news@example.com"),
        ("user@straße.de", "user@xn--strae-oqa.de"),  # IDNA 2008, not folded to strasse
        ("user@STRASSE.de", "user@strasse.de"),
        ("user@[192.0.2.1]", "user@[192.0.2.1]"),
        ("a@b@Example.com", "a@b@example.com"),
        ("postmaster", "postmaster"),
        ("PostMaster", "postmaster"),
        ("user@" + "x" * 70 + ".example", "user@" + "x" * 70 + ".example"),  # IDNA refuses
    ],
)
def test_normalize_address(address: str, expected: str) -> None:
    assert normalize_address(address) == expected
    assert normalize_address(expected) == expected  # idempotent


def test_idna_2008_keeps_sharp_s_and_final_sigma_distinct() -> None:
    """IDNA 2003 (Python's codec) mapped these to other, existing domains."""
    assert normalize_address("a@straße.de") != normalize_address("a@strasse.de")
    assert canonical_domain("σίσυφος.gr") != canonical_domain("σίσυφοσ.gr")
    assert canonical_domain("Straße.DE.") == canonical_domain("straße.de")


@pytest.mark.parametrize(
    "address",
    ["news@exa..mple.com", "news@-example.com", "news@xn--zz.example", "news@☃.example", "news"],
)
def test_canonical_address_refuses_what_has_no_canonical_form(address: str) -> None:
    with pytest.raises(AddressError):
        canonical_address(address)
    assert normalize_address(address) == address.lower()  # storage still gets a stable key


def test_domain_of() -> None:
    assert domain_of("News@Mail.Example.COM") == "mail.example.com"


# ---------------------------------------------------------------------------
# Fast paths: each gives what the general code gives, wherever it answers

_atext = st.text("abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=6)
_local = st.lists(_atext, min_size=1, max_size=3).map(".".join)
_label = st.text("abz09-", min_size=1, max_size=8)
_domain = st.lists(_label, min_size=1, max_size=3).map(".".join)
_junk = st.text('aZ0 .-_"<>@,;:()\\[]\t\r\n=?é', max_size=12)


@settings(max_examples=800, deadline=None)
@given(
    name=st.one_of(
        st.just(""), st.text('aZ0 ._-,;:()@<"', max_size=10), _junk.map(lambda t: f'"{t}"')
    ),
    local=st.one_of(_local, _junk),
    domain=st.one_of(_domain, _junk),
    form=st.sampled_from(["{l}@{d}", "<{l}@{d}>", "{n} <{l}@{d}>", "{n}<{l}@{d}>", " {l}@{d} "]),
    extra=st.one_of(st.just(""), _junk),
)
@example(name="a, b", local="x", domain="y.z", form="{n} <{l}@{d}>", extra="")
@example(name="a", local="x", domain="y.z", form="{n} <{l}@{d}>", extra=" (c)")
def test_simple_from_agrees_with_the_email_package(
    name: str, local: str, domain: str, form: str, extra: str
) -> None:
    value = form.format(n=name, l=local, d=domain) + extra
    fast = _simple_from(value)
    if fast is not None:
        assert [a for _, a in getaddresses([value]) if a] == [fast]


@settings(max_examples=800, deadline=None)
@given(local=st.one_of(_local, _junk), domain=st.one_of(_domain, _junk), utf8=st.booleans())
def test_address_fast_path_only_accepts_what_the_full_check_accepts(
    local: str, domain: str, utf8: bool
) -> None:
    address = f"{local}@{domain}"
    if address_problem(address, utf8) is None:
        assert _problem(address, utf8) is None
    else:
        assert _problem(address, utf8) == address_problem(address, utf8)


@pytest.mark.parametrize(
    "address",
    ["a@b", "first.last@mail.example.com", "x+tag@sub-domain.example", "o'neil@example.ie"],
)
def test_common_addresses_take_the_fast_path(address: str) -> None:
    assert _PLAIN.fullmatch(address) and address_problem(address) is None
