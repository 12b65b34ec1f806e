"""``relay.outbound.upstream`` without a network: the bytes it writes match aiosmtplib's."""

from __future__ import annotations

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from relay.outbound.upstream import _command, _dot_stuffed


def aiosmtplib_body(data: bytes) -> bytes:
    """What ``SMTPProtocol.execute_data_command`` writes after 354."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b".",
        b".\r\n",
        b"..\r\n.\r\n",
        b"a\r\n.b\r\n..c\r\n.\r\nend",
        b"bare\nlf\n.dot\n",
        b"bare\rcr\r.dot\r\n\r\r\n\n\r",
        b"\r\n.",
    ],
)
def test_dot_stuffing_is_aiosmtplibs(data: bytes) -> None:
    assert _dot_stuffed(data) == aiosmtplib_body(data)


@given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"x", b" "])).map(b"".join))
def test_dot_stuffing_is_aiosmtplibs_for_any_mix(data: bytes) -> None:
    assert _dot_stuffed(data) == aiosmtplib_body(data)


def test_commands_quote_like_aiosmtplib() -> None:
    assert _command(b"MAIL FROM:", "", [], "ascii") == b"MAIL FROM:<>\r\n"
    assert _command(b"MAIL FROM:", "A <a@x.org>", ["SIZE=9"], "ascii") == (
        b"MAIL FROM:<a@x.org> SIZE=9\r\n"
    )
    assert _command(b"RCPT TO:", "dörte@bücher.example", [], "utf-8") == (
        "RCPT TO:<dörte@bücher.example>\r\n".encode()
    )
    # parsed as aiosmtplib parses it (email.utils.parseaddr): nothing can be smuggled in
    assert _command(b"RCPT TO:", "a@x.org> NOTIFY=NEVER", [], "ascii") == b"RCPT TO:<a@x.org>\r\n"
    for unsafe in ("<a b@x.org>", "a\x00@x.org", "a@x.org\x7f"):
        with pytest.raises(ValueError, match=r"not permitted|control character"):
            _command(b"RCPT TO:", unsafe, [], "ascii")
    with pytest.raises(UnicodeEncodeError):
        _command(b"RCPT TO:", "dörte@bücher.example", [], "ascii")
