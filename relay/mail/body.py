"""Each recipient's unsubscribe link in the body, in place of a placeholder.

Google asks for a visible unsubscribe link in the message as well as the headers,
and only the relay knows each recipient's token. The application writes a
placeholder (``unsubscribe.placeholder``, default ``%unsubscribe_url%``) in its
``text/plain`` and ``text/html`` parts; each copy gets its recipient's https URL
there (HTML-escaped in HTML), before signing.

The hot path stays byte-only: a message whose body neither contains the placeholder
nor declares a quoted-printable or base64 part (where it could hide) is never
parsed (``BodyLinks.find`` answers None after two byte searches). Otherwise the
MIME tree is walked once per message — part headers only, nesting followed,
``message/rfc822`` and attachments left alone — into a template of unchanged byte
runs and *slots*: the decoded content of each text part that holds the
placeholder, split at it. Each copy is then the runs joined with its slots
re-encoded in the part's own Content-Transfer-Encoding (7bit, 8bit, binary,
quoted-printable, base64). Everything outside the rewritten parts keeps its bytes.

Work is bounded whatever the input: at most ``MAX_PARTS`` parts and ``MAX_DEPTH``
levels of nesting are looked at (the rest passes through unchanged), and every
search is a plain bytes search.
"""

from __future__ import annotations

import base64
import binascii
import html
from dataclasses import dataclass

from relay.mail.message import MessageError, split_fields

MAX_PARTS = 200
MAX_DEPTH = 10
_TEXT_TYPES = frozenset({"text/plain", "text/html"})
_ASCII_INCOMPATIBLE = ("utf-16", "utf-32", "utf_16", "utf_32", "utf16", "utf32")
_BODY_END = b"</body>"


@dataclass(frozen=True, slots=True)
class Footer:
    """Appended to the first text/plain and text/html part when no placeholder is present."""

    text: str
    html: str


@dataclass(frozen=True, slots=True)
class _Leaf:
    raw: bytes
    encoding: str
    html: bool


@dataclass(frozen=True, slots=True)
class _Slot:
    pieces: tuple[bytes, ...]
    """The decoded content split at the placeholder: the URL goes between pieces."""
    encoding: str
    html: bool
    trail: bytes
    """The line break the encoded content ended with, kept after re-encoding."""

    def render(self, url: str) -> bytes:
        link = (html.escape(url, quote=True) if self.html else url).encode("ascii")
        return _encode(link.join(self.pieces), self.encoding) + self.trail


@dataclass(frozen=True, slots=True)
class BodyLinks:
    """A body as unchanged byte runs and slots, built once per message."""

    segments: tuple[bytes | _Slot, ...]
    slots: int
    footer: bool
    """True: no placeholder was found and the footer carries the link."""

    @classmethod
    def find(
        cls, header_block: bytes, body: bytes, placeholder: str, footer: Footer | None = None
    ) -> BodyLinks | None:
        """The template, or None when the body has no placeholder (and no footer is wanted)."""
        mark = placeholder.encode("ascii")
        if footer is None and mark not in body and not _may_hide(header_block, body):
            return None
        walker = _Walker()
        segments = walker.walk(header_block, body, 0)
        found = [s for s in segments if isinstance(s, _Leaf) and mark in _decode(s)]
        chosen: dict[int, bytes] = {}
        if found:
            chosen = {id(leaf): b"" for leaf in found}
        elif footer is not None:
            firsts: dict[bool, _Leaf] = {}
            for s in segments:
                if isinstance(s, _Leaf) and s.html not in firsts:
                    firsts[s.html] = s
            chosen = {
                id(leaf): (footer.html if is_html else footer.text).encode("utf-8")
                for is_html, leaf in firsts.items()
            }
        if not chosen:
            return None
        out: list[bytes | _Slot] = []
        for s in segments:
            if isinstance(s, _Leaf):
                if id(s) in chosen:
                    out.append(_slot(s, mark, chosen[id(s)]))
                else:
                    out.append(s.raw)
            elif out and isinstance(out[-1], bytes):
                out[-1] += s
            else:
                out.append(s)
        return cls(tuple(out), sum(1 for s in out if isinstance(s, _Slot)), not found)

    def render(self, url: str) -> bytes:
        """This recipient's body."""
        return b"".join(s if isinstance(s, bytes) else s.render(url) for s in self.segments)


def has_https_link(header_block: bytes, body: bytes) -> bool:
    """Whether a text part of the body holds an ``https://`` link (decoded where encoded)."""
    if b"https://" in body:
        return True
    if not _may_hide(header_block, body):
        return b"https://" in body.lower()
    leaves = _Walker().walk(header_block, body, 0)
    return any(isinstance(s, _Leaf) and b"https://" in _decode(s).lower() for s in leaves)


def _may_hide(header_block: bytes, body: bytes) -> bool:
    """Whether a quoted-printable or base64 part could hold the placeholder out of sight.

    Plain byte searches over a lower-cased copy (a case-insensitive regex is slower).
    """
    for block in (header_block, body):
        lowered = block.lower()
        if b"quoted-printable" in lowered or b"base64" in lowered:
            return True
    return False


def _slot(leaf: _Leaf, mark: bytes, footer: bytes) -> _Slot:
    content = _decode(leaf)
    if footer:
        if leaf.html:
            at = content.lower().rfind(_BODY_END)
            content = content + footer if at < 0 else content[:at] + footer + content[at:]
        else:
            content += footer if content.endswith(b"\r\n") or not content else b"\r\n" + footer
    trail = b"\r\n" if leaf.raw.endswith(b"\r\n") and leaf.encoding in _REENCODED else b""
    return _Slot(tuple(content.split(mark)), leaf.encoding, leaf.html, trail)


_REENCODED = frozenset({"quoted-printable", "base64"})


def _decode(leaf: _Leaf) -> bytes:
    if leaf.encoding == "quoted-printable":
        return binascii.a2b_qp(leaf.raw)
    if leaf.encoding == "base64":
        try:
            return base64.b64decode(leaf.raw, validate=False)
        except (binascii.Error, ValueError):
            return b""
    return leaf.raw


def _encode(data: bytes, encoding: str) -> bytes:
    if encoding == "quoted-printable":
        return binascii.b2a_qp(data, istext=True).rstrip(b"\r\n")
    if encoding == "base64":
        return base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")
    return data


def _delimiter(text: bytes, boundary: bytes, start: int) -> tuple[int, int, bool]:
    """The next delimiter line from ``start``: (its CRLF, the end of its line, closing).

    A delimiter is ``CRLF--boundary`` followed by ``--`` or only white space up to the
    line's end (RFC 2046 5.1.1); a longer boundary that merely starts alike is not one.
    """
    marker = b"\r\n--" + boundary
    at = text.find(marker, start)
    while at >= 0:
        after = at + len(marker)
        eol = text.find(b"\r\n", after)
        rest = text[after : len(text) if eol < 0 else eol]
        closing = rest.startswith(b"--")
        if closing or not rest.strip(b" \t"):
            return at, len(text) if eol < 0 else eol + 2, closing
        at = text.find(marker, after)
    return -1, -1, False


def _parameters(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype; name=value; name="quoted"`` → (lower-cased first token, params).

    One linear pass (quotes and backslash escapes honoured); RFC 2231 continuations
    are not needed for the parameters read here (boundary, charset).
    """
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    params = {}
    for item in items[1:]:
        name, eq, val = item.partition("=")
        if eq:
            params[name.strip().lower()] = val.strip()
    return items[0].strip().lower(), params


class _Walker:
    def __init__(self) -> None:
        self.parts = 0

    def walk(self, header_block: bytes, body: bytes, depth: int) -> list[bytes | _Leaf]:
        """The part's body as byte runs and text leaves, in order; the bytes are kept."""
        self.parts += 1
        if self.parts > MAX_PARTS or depth > MAX_DEPTH:
            return [body]
        try:
            fields = {h.lname: h.value for h in reversed(split_fields(header_block))}
        except MessageError:  # a part whose header block is not one: left alone
            return [body]
        ctype, params = _parameters(fields.get("content-type", "text/plain"))
        if ctype.startswith("multipart/"):
            boundary = params.get("boundary", "")
            if boundary and boundary.isascii():
                return self._multipart(body, boundary.encode("ascii"), depth)
            return [body]
        disposition, _ = _parameters(fields.get("content-disposition", "inline"))
        if ctype not in _TEXT_TYPES or disposition == "attachment":
            return [body]
        charset = params.get("charset", "us-ascii").lower()
        if charset.startswith(_ASCII_INCOMPATIBLE):
            return [body]
        encoding = fields.get("content-transfer-encoding", "7bit").strip().lower()
        if encoding not in ("7bit", "8bit", "binary", "quoted-printable", "base64"):
            return [body]
        return [_Leaf(body, encoding, ctype == "text/html")]

    def _multipart(self, body: bytes, boundary: bytes, depth: int) -> list[bytes | _Leaf]:
        """Split at ``CRLF--boundary``; preamble, delimiters and epilogue kept as bytes."""
        text = b"\r\n" + body  # a first delimiter at the very start has no CRLF of its own
        at, line_end, closing = _delimiter(text, boundary, 0)
        if at < 0:
            return [body]
        out: list[bytes | _Leaf] = [text[2:at] if at >= 2 else b"", text[max(at, 2) : line_end]]
        while not closing:
            nxt, nxt_end, closing = _delimiter(text, boundary, line_end)
            if nxt < 0:  # no closing delimiter: the rest is the last part's
                out.extend(self._part(text[line_end:], depth + 1))
                return out
            out.extend(self._part(text[line_end:nxt], depth + 1))
            out.append(text[nxt:nxt_end])
            line_end = nxt_end
        out.append(text[line_end:])
        return out

    def _part(self, part: bytes, depth: int) -> list[bytes | _Leaf]:
        if part.startswith(b"\r\n"):
            block, body = b"", part[2:]
            head = b"\r\n"
        else:
            end = part.find(b"\r\n\r\n")
            if end < 0:
                return [part]
            block, body = part[: end + 2], part[end + 4 :]
            head = part[: end + 4]
        return [head, *self.walk(block, body, depth)]
