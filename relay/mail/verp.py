"""The VERP return path: which recipient, group and message a bounce is about, unforgeably.

With ``bounces.return_path_domain`` set, every copy goes upstream with its own
envelope sender::

    bounces+<code>[.<local>=<domain>]@<return_path_domain>

``<code>`` is 24 characters of lower-case base32 (RFC 4648, no padding) of 15 bytes:

====== ===== ==========================================================
sent    4    Unix seconds when the copy was relayed
msg     2    the first 2 bytes of the relay's queue id (grep the log for ``id=XXXX``)
group   2    the first 2 bytes of SHA-256 of the group name (``-``: transactional)
tag     7    HMAC-SHA256(key, the 8 bytes above || normalised recipient), truncated
====== ===== ==========================================================

An AES token (~90 characters, as in the unsubscribe URL) cannot be used: RFC 5321
allows 64 octets of local part. The recipient follows the code VERP-style
(``local=domain``) when it fits, so a bounce that does not name the recipient
(forwarding, terse MTAs) is still attributed; when it does not fit, only the code
is sent and the recipient is the one the bounce names whose tag matches. Either way
the tag covers the recipient, so a code only ever speaks for the address it was
made for, and a recipient who copies the Return-Path of their own mail can at
most bounce themselves. The key is derived with HKDF from ``tokens.keys[0]``;
every configured key verifies, so keys rotate as unsubscribe tokens do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relay.config import Config, TokensConfig
from relay.errors import RelayError
from relay.mail.address import normalize_address

MAX_LOCAL_PART = 64
CODE_LENGTH = 24
NO_GROUP = "-"
_TAG = 7
_INLINE_LOCAL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_INLINE_DOMAIN = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+$")
_CODE = re.compile(rf"^[a-z2-7]{{{CODE_LENGTH}}}$")
_STOP = frozenset('@<>"') | frozenset(" \t\r\n\v\f")
MAX_SCANNED = 4 * 1024 * 1024
"""Characters of a bounce's text searched for return paths (the listener's size limit is lower)."""
MAX_FOUND = 32
MAX_CANDIDATES = 64
"""Distinct return paths taken from one bounce; a real one quotes one or two."""


def _local_before(text: str, at: int) -> str:
    """The run of local-part characters just before ``text[at]`` (at most 64 of them)."""
    begin = at
    floor = max(0, at - MAX_LOCAL_PART)
    while begin > floor and text[begin - 1] not in _STOP:
        begin -= 1
    return text[begin:at]


def _word(ch: str) -> bool:
    """A character that continues a domain name (so ``@domain.evil`` is not ours)."""
    return ch.isalnum() or ch == "_"


class ForgedCode(RelayError):
    """A return-path code whose tag matches no recipient under any configured key."""


@dataclass(frozen=True, slots=True)
class VerpRef:
    """A return path of ours, read but not yet verified."""

    code: str
    recipient: str | None
    """The recipient written after the code, or None when it did not fit."""


@dataclass(frozen=True, slots=True)
class VerpClaims:
    recipient: str
    group: str
    sent: int
    message: str
    """The queue id's first four hex digits."""


def _derive(secret: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"oneclick-relay verp v1")
    return hkdf.derive(secret)


def _group_ref(group: str) -> bytes:
    return hashlib.sha256(group.encode("utf-8")).digest()[:2]


def _inline(recipient: str) -> str | None:
    local, _, domain = recipient.rpartition("@")
    if _INLINE_LOCAL.match(local) and _INLINE_DOMAIN.match(domain):
        return f"{local}={domain}"
    return None


class Verp:
    def __init__(
        self,
        tokens: TokensConfig,
        local_part: str,
        domain: str,
        groups: Iterable[str] = (),
    ) -> None:
        self._keys = [_derive(key.secret.reveal()) for key in tokens.keys]
        self.local_part = local_part.lower()
        self.domain = domain.lower()
        self._groups = {_group_ref(g): g for g in (NO_GROUP, *groups)}
        self._room = MAX_LOCAL_PART - len(self.local_part) - 1 - CODE_LENGTH - 1
        self._needle = f"{self.local_part}+"
        self._at_domain = f"@{self.domain}"

    @classmethod
    def from_config(cls, config: Config) -> Verp | None:
        """The codec for ``bounces.return_path_domain``; None when VERP is off."""
        domain = config.bounces.return_path_domain
        if domain is None:
            return None
        policy = config.policy
        groups = {policy.default_group, *policy.groups}
        groups.update(rule.group for rule in policy.senders if rule.group)
        return cls(config.tokens, config.bounces.local_part, domain, sorted(groups))

    def _tag(self, key: bytes, head: bytes, recipient: str) -> bytes:
        return hmac.new(key, head + recipient.encode("utf-8"), hashlib.sha256).digest()[:_TAG]

    def address(self, recipient: str, group: str | None, queue_id: str, sent: float) -> str:
        """The envelope sender for one copy to ``recipient``."""
        rcpt = normalize_address(recipient)
        try:
            msg = bytes.fromhex(queue_id[:4])
        except ValueError:
            msg = b"\0\0"
        head = struct.pack(">I", int(sent) & 0xFFFFFFFF) + msg + _group_ref(group or NO_GROUP)
        raw = head + self._tag(self._keys[0], head, rcpt)
        code = base64.b32encode(raw).decode("ascii").lower()
        inline = _inline(rcpt)
        local = f"{self.local_part}+{code}"
        if inline is not None and len(inline) <= self._room:
            local = f"{local}.{inline}"
        return f"{local}@{self.domain}"

    def parse(self, address: str) -> VerpRef | None:
        """A return path of ours (syntax only), else None."""
        local, at, domain = normalize_address(address).rpartition("@")
        if not at or domain != self.domain:
            return None
        base, plus, rest = local.partition("+")
        if not plus or base != self.local_part:
            return None
        code, dot, inline = (
            rest[:CODE_LENGTH],
            rest[CODE_LENGTH : CODE_LENGTH + 1],
            rest[CODE_LENGTH + 1 :],
        )
        if not _CODE.match(code) or (rest[CODE_LENGTH:] and (dot != "." or "=" not in inline)):
            return None
        recipient = None
        if inline:
            rlocal, _, rdomain = inline.rpartition("=")
            recipient = f"{rlocal}@{rdomain}"
        return VerpRef(code, recipient)

    def is_own(self, address: str) -> bool:
        """The plain return path or any ``local_part+…`` at the return-path domain."""
        local, at, domain = normalize_address(address).rpartition("@")
        return bool(at) and domain == self.domain and local.split("+", 1)[0] == self.local_part

    def find(self, text: str) -> list[VerpRef]:
        """Every return path of ours quoted in ``text`` (a bounce's headers and body).

        Linear, with no regex over attacker text: each ``@return_path_domain`` is
        found by plain string search and only the local part's 64 characters before
        it are read. At most ``MAX_CANDIDATES`` places are looked at and
        ``MAX_FOUND`` distinct paths kept, since each is then checked with an HMAC.
        """
        lower = text[:MAX_SCANNED].lower()
        refs: dict[VerpRef, None] = {}
        seen: set[str] = set()
        candidates = 0
        at = lower.find(self._at_domain)
        while at >= 0 and candidates < MAX_CANDIDATES and len(refs) < MAX_FOUND:
            tail = at + len(self._at_domain)
            if tail == len(lower) or not _word(lower[tail]):
                candidates += 1
                local = _local_before(lower, at)
                start = local.find(self._needle)
                if start >= 0 and local not in seen:
                    seen.add(local)
                    if (ref := self.parse(local[start:] + self._at_domain)) is not None:
                        refs[ref] = None
            at = lower.find(self._at_domain, tail)
        return list(refs)

    def verify(self, ref: VerpRef, reported: Iterable[str] = ()) -> VerpClaims:
        """The claims of ``ref``, checked against its own recipient or the reported ones."""
        try:
            raw = base64.b32decode(ref.code.upper() + "=" * (-len(ref.code) % 8))
        except (binascii.Error, ValueError):
            raise ForgedCode("return-path code is not base32") from None
        head, tag = raw[:8], raw[8:]
        candidates = [ref.recipient] if ref.recipient else [normalize_address(r) for r in reported]
        for recipient in dict.fromkeys(candidates):
            for key in self._keys:
                if hmac.compare_digest(self._tag(key, head, recipient), tag):
                    (sent,) = struct.unpack(">I", head[:4])
                    group = self._groups.get(head[6:8], NO_GROUP)
                    return VerpClaims(recipient, group, sent, head[4:6].hex().upper())
        raise ForgedCode("return-path code matches no recipient")
