"""relay.mail.body: each copy's URL in place of the placeholder, in any encoding and nesting."""

from __future__ import annotations

import base64
import binascii
import email
from email.message import Message as EmailMessage

from helpers import DATA

from relay.mail.body import BodyLinks, Footer
from relay.mail.message import Message

PH = "%unsubscribe_url%"
URL = "https://unsub.example.com/u/k1.AbC-d_e&x=1"


def parts(data: bytes) -> dict[str, bytes]:
    """Each leaf part's decoded payload, by content type (the first of each)."""
    found: dict[str, bytes] = {}
    for part in email.message_from_bytes(data).walk():
        assert isinstance(part, EmailMessage)
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found.setdefault(part.get_content_type(), payload)
    return found


def rewrite(data: bytes, url: str = URL, footer: Footer | None = None) -> bytes | None:
    message = Message.parse(data)
    links = BodyLinks.find(message.header_bytes(), message.body, PH, footer)
    if links is None:
        return None
    return message.with_body(links.render(url)).to_bytes()


def mime(ctype: str, cte: str, payload: bytes, extra: str = "") -> bytes:
    head = f"From: n@example.com\r\nMIME-Version: 1.0\r\nContent-Type: {ctype}\r\n"
    return f"{head}Content-Transfer-Encoding: {cte}\r\n{extra}\r\n".encode() + payload


def test_alternative_with_quoted_printable_html() -> None:
    data = (DATA / "body" / "alternative-qp-html.eml").read_bytes()
    out = rewrite(data)
    assert out is not None
    decoded = parts(out)
    assert f"Unsubscribe: {URL}\r\n".encode() in decoded["text/plain"]
    assert b'<a href="https://unsub.example.com/u/k1.AbC-d_e&amp;x=1">' in decoded["text/html"]
    assert "Café".encode() in decoded["text/html"]  # the rest decodes as before
    assert PH.encode() not in out
    # everything but the two part bodies keeps its bytes
    head, _, _ = data.partition(b"\r\n\r\n")
    assert out.startswith(head + b"\r\n\r\nThis is a MIME message.\r\n\r\n--=_alt_7f3a\r\n")
    assert out.endswith(b"\r\n--=_alt_7f3a--\r\n")
    assert max(len(line) for line in out.split(b"\r\n")) <= 78


def test_no_placeholder_no_parse() -> None:
    message = Message.parse(mime("text/plain; charset=utf-8", "7bit", b"Hello.\r\n"))
    assert BodyLinks.find(message.header_bytes(), message.body, PH) is None
    # declared QP or base64 is looked into (the placeholder could hide there), and is absent
    qp = Message.parse(mime("text/html", "quoted-printable", b"<p>hi=3D</p>\r\n"))
    assert BodyLinks.find(qp.header_bytes(), qp.body, PH) is None


def test_placeholder_across_a_soft_line_break_and_in_base64() -> None:
    soft = mime("text/plain", "quoted-printable", b"Leave: %unsub=\r\nscribe_url% now\r\n")
    out = rewrite(soft)
    assert out is not None
    assert parts(out)["text/plain"] == f"Leave: {URL} now\r\n".encode()
    text = f"Bye {PH}\r\n".encode() * 20
    b64 = mime("text/plain; charset=utf-8", "base64", base64.encodebytes(text))
    out = rewrite(b64)
    assert out is not None
    assert parts(out)["text/plain"] == text.replace(PH.encode(), URL.encode())
    assert all(len(line) <= 76 for line in out.split(b"\r\n\r\n", 1)[1].split(b"\r\n"))


def test_nesting_attachments_and_forwarded_messages() -> None:
    inner = (
        b"--in\r\nContent-Type: text/plain\r\n\r\nplain " + PH.encode() + b"\r\n"
        b"--in\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(f'<a href="{PH}">x</a>'.encode()).replace(b"\n", b"\r\n")
        + b"--in--\r\n"
    )
    body = (
        b"--out\r\nContent-Type: multipart/alternative; boundary=in\r\n\r\n" + inner + b"\r\n"
        b"--out\r\nContent-Type: text/plain\r\nContent-Disposition: attachment;"
        b" filename=a.txt\r\n\r\nattached " + PH.encode() + b"\r\n"
        b"--out\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: x@example.org\r\nSubject: fwd\r\n\r\nforwarded " + PH.encode() + b"\r\n"
        b"--out--\r\n"
    )
    data = b"From: n@example.com\r\nContent-Type: multipart/mixed; boundary=out\r\n\r\n" + body
    out = rewrite(data)
    assert out is not None
    assert f"plain {URL}".encode() in out
    assert out.count(PH.encode()) == 2  # the attachment and the forwarded message
    assert b"attached " + PH.encode() in out and b"forwarded " + PH.encode() in out
    html = next(
        p.get_payload(decode=True)
        for p in email.message_from_bytes(out).walk()
        if p.get_content_type() == "text/html"
    )
    assert html == b'<a href="https://unsub.example.com/u/k1.AbC-d_e&amp;x=1">x</a>'


def test_footer_only_when_asked_and_no_placeholder() -> None:
    footer = Footer(f"\r\nUnsubscribe: {PH}\r\n", f'<p><a href="{PH}">Unsubscribe</a></p>')
    html = binascii.b2a_qp(b"<html><body><p>News</p></body></html>\r\n", istext=True)
    data = (
        b"From: n@example.com\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nNews\r\n"
        b"--b\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        + html
        + b"--b--\r\n"
    )
    assert rewrite(data) is None  # off by default
    out = rewrite(data, footer=footer)
    assert out is not None
    decoded = parts(out)
    assert decoded["text/plain"] == f"News\r\n\r\nUnsubscribe: {URL}\r\n".encode()
    assert decoded["text/html"] == (
        b'<html><body><p>News</p><p><a href="https://unsub.example.com/u/k1.AbC-d_e&amp;x=1">'
        b"Unsubscribe</a></p></body></html>"  # the CRLF before "--b--" is the delimiter's
    )
    # with the placeholder present, the footer is not added
    with_ph = data.replace(b"News\r\n--b", f"News {PH}\r\n--b".encode())
    out = rewrite(with_ph, footer=footer)
    assert out is not None and out.count(URL.encode()) == 1


def test_non_mime_and_single_part() -> None:
    data = f"From: n@example.com\r\nSubject: s\r\n\r\nLeave: {PH}\r\n".encode()
    assert rewrite(data) == data.replace(PH.encode(), URL.encode())
    html = mime("text/html; charset=utf-8", "8bit", f'<a href="{PH}">x</a>\r\n'.encode())
    out = rewrite(html)
    assert out is not None and b'href="https://unsub.example.com/u/k1.AbC-d_e&amp;x=1"' in out


def test_malformed_and_hostile_structure_passes_through() -> None:
    # no closing delimiter; a boundary that only starts alike; an undeclared charset
    data = (
        b"From: n@example.com\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--bb\r\nnot a part\r\n--b\r\nContent-Type: text/plain\r\n\r\nx " + PH.encode() + b"\r\n"
    )
    out = rewrite(data)
    assert out is not None and out.endswith(f"x {URL}\r\n".encode())
    assert b"--bb\r\nnot a part\r\n" in out
    # deep nesting is bounded: the parts below the limit pass through unchanged
    body = b""
    for depth in range(300):
        body = (
            f"--d{depth}\r\nContent-Type: multipart/mixed; boundary=d{depth + 1}\r\n\r\n".encode()
            + body
            + f"\r\n--d{depth}--\r\n".encode()
        )
    deep = b"From: n@example.com\r\nContent-Type: multipart/mixed; boundary=d0\r\n\r\n"
    deep += body.replace(b"\r\n\r\n\r\n", f"\r\n\r\n{PH}\r\n".encode(), 1)
    assert PH.encode() in deep
    assert rewrite(deep) is None
    # a UTF-16 part is not rewritten (the placeholder is not ASCII there)
    utf16 = mime("text/plain; charset=utf-16", "base64", base64.encodebytes(PH.encode("utf-16")))
    assert rewrite(utf16) is None
