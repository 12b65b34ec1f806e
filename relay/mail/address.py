"""Envelope and header addresses: the one normaliser and the envelope syntax check."""

from __future__ import annotations

import contextlib
import re


def normalize_address(address: str) -> str:
    """The one place addresses are normalised for comparison and storage.

    Angle brackets and surrounding space go; the domain is lower-cased and
    converted to its ASCII (IDNA) form; the local part is compared
    case-insensitively, as every large mailbox provider does, so it is
    lower-cased too.
    """
    text = address.strip().strip("<>").strip()
    local, at, domain = text.rpartition("@")
    if not at:
        return text.lower()
    with contextlib.suppress(UnicodeError):
        domain = domain.encode("idna").decode("ascii")
    return f"{local.lower()}@{domain.lower()}"


_SPECIALS = frozenset('"(),:;<>@[\\]')
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def address_problem(address: str, smtputf8: bool = False) -> str | None:
    """Why ``address`` cannot be relayed as an envelope address, or None if it can.

    A dot-atom local part (RFC 5321 4.1.2, quoted local parts refused) and a domain
    of LDH labels or an address literal; UTF-8 only with SMTPUTF8 (RFC 6531). Bytes
    that are not UTF-8 arrive as surrogates and are refused.
    """
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "address must be local-part@domain"
    if (
        len(address.encode("utf-8", "surrogatepass")) > 254
        or len(local.encode("utf-8", "surrogatepass")) > 64
    ):
        return "address too long (RFC 5321 4.5.3.1)"
    for ch in address:
        if ord(ch) <= 32 or ord(ch) == 127 or 0xD800 <= ord(ch) <= 0xDFFF:
            return "address contains a control character, space or invalid UTF-8"
    if any(ch in _SPECIALS for ch in local) or ".." in local or local[0] == "." or local[-1] == ".":
        return "local part is not a dot-atom"
    if not address.isascii() and not smtputf8:
        return "non-ASCII address needs the SMTPUTF8 parameter"
    if domain.startswith("[") and domain.endswith("]"):
        return None
    for label in domain.split("."):
        if label.isascii() and not _LABEL.match(label):
            return "domain is not a valid host name"
        if not label or any(ch in _SPECIALS for ch in label):
            return "domain is not a valid host name"
    return None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()
