"""Envelope and header addresses: the one normaliser and the envelope syntax check."""

from __future__ import annotations

import functools
import re

import idna


class AddressError(ValueError):
    """An address that has no canonical form (a domain IDNA 2008 refuses, no domain)."""


_ATOM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~")


def canonical_address(address: str) -> str:
    """The one canonical form of an address, for comparison, policy, signing and storage.

    * angle brackets and surrounding space go;
    * a quoted local part whose content is a dot-atom is unquoted (``"news"@x`` is
      ``news@x``, RFC 5321 4.1.2 calls them the same mailbox); other quoted local
      parts keep their quotes, with escapes reduced to the minimum;
    * the local part is lower-cased: every large mailbox provider compares it
      case-insensitively;
    * the domain loses one trailing dot (the DNS root) and is converted with
      IDNA 2008 and the UTS #46 mapping (non-transitional), so ``straße.de`` stays
      ``xn--strae-oqa.de`` and is never folded to ``strasse.de`` as IDNA 2003 does.

    Raises ``AddressError`` when there is no domain or IDNA 2008 refuses it.
    """
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise AddressError("address must be local-part@domain")
    return f"{_canonical_local(local)}@{canonical_domain(domain)}"


def normalize_address(address: str) -> str:
    """``canonical_address``, or for input that has none the lower-cased text as it is.

    For stored and looked-up addresses, where the caller has validated the syntax
    already (envelope checks) and must not fail: an address that cannot be made
    canonical still gets one stable key. The policy uses ``canonical_address`` and
    refuses a From that has no canonical form.
    """
    try:
        return canonical_address(address)
    except AddressError:
        return address.strip().strip("<>").strip().lower()


def canonical_domain(domain: str) -> str:
    """A domain in its ASCII form, lower-case, without the trailing root dot (IDNA 2008)."""
    name = domain.strip()
    if name.endswith("."):
        name = name[:-1]
    if name.startswith("[") and name.endswith("]"):
        return name.lower()  # an address literal
    lowered = name.lower()
    if lowered.isascii() and "xn--" not in lowered and _is_ldh(lowered):
        return lowered  # the common case: no IDNA work
    return _idna(name)


_LDH_NAME = re.compile(r"(?:(?!-)[a-z0-9-]{1,63}(?<!-)\.)*(?!-)[a-z0-9-]{1,63}(?<!-)")


def _is_ldh(domain: str) -> bool:
    """Labels of 1 to 63 letters, digits and inner hyphens (lower case), dot-separated."""
    return _LDH_NAME.fullmatch(domain) is not None


@functools.lru_cache(maxsize=4096)
def _idna(name: str) -> str:
    try:
        return idna.encode(name, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise AddressError(f"domain {name[:80]!r} is not a valid IDNA 2008 name: {exc}") from None


def _canonical_local(local: str) -> str:
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        content = _unquote(local[1:-1]).lower()
        if _is_dot_atom(content):
            return content
        escaped = content.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return local.lower()


def _unquote(text: str) -> str:
    out: list[str] = []
    chars = iter(text)
    for ch in chars:
        out.append(next(chars, "") if ch == "\\" else ch)
    return "".join(out)


def _is_dot_atom(text: str) -> bool:
    return bool(text) and all(
        atom and all(ch in _ATOM or ord(ch) > 127 for ch in atom) for atom in text.split(".")
    )


_SPECIALS = frozenset('"(),:;<>@[\\]')
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
"""An ASCII dot-atom (RFC 5322 3.2.3) as a regular expression, for local parts."""
_PLAIN = re.compile(
    rf"{DOT_ATOM}@(?:(?!-)[A-Za-z0-9-]{{1,63}}(?<!-)\.)*(?!-)[A-Za-z0-9-]{{1,63}}(?<!-)"
)
"""An ASCII dot-atom at a host name: what almost every envelope address is."""


def address_problem(address: str, smtputf8: bool = False) -> str | None:
    """Why ``address`` cannot be relayed as an envelope address, or None if it can.

    A dot-atom local part (RFC 5321 4.1.2, quoted local parts refused) and a domain
    of LDH labels or an address literal; UTF-8 only with SMTPUTF8 (RFC 6531). Bytes
    that are not UTF-8 arrive as surrogates and are refused.
    """
    if len(address) <= 254 and _PLAIN.fullmatch(address) and address.index("@") <= 64:
        return None  # the common case, in one match
    return _problem(address, smtputf8)


def _problem(address: str, smtputf8: bool) -> str | None:
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
    """The domain of an address, canonical (see ``canonical_domain``) where it can be."""
    domain = address.rpartition("@")[2]
    try:
        return canonical_domain(domain)
    except AddressError:
        return domain.lower()
