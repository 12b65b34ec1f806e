"""The mailto unsubscribe code: who and which list, in the local part of the address.

Apple Mail, iOS Mail and older Outlook unsubscribe by sending mail to the
``mailto:`` URI of List-Unsubscribe with an empty Subject and a stock body, so the
address alone must say who is leaving which list::

    <mailto:unsubscribe+<code>@<unsubscribe.mailto_domain>?subject=unsubscribe%20TOKEN>

``<code>`` is 16 characters of lower-case base32 (RFC 4648, no padding; MTAs that
fold local parts to lower case keep it) of 10 bytes::

    HMAC-SHA256(key, key id NUL scope NUL recipient NUL group NUL sender)[:10]

A token naming an arbitrary address cannot fit in 64 octets of local part, so the
code is a *reference*: the relay stores what it names (key id, scope, recipient,
group, sender, last issue time) under the code in Redis when it sends the copy,
for ``tokens.max_age_days``. The code is deterministic per (recipient, list, key),
so each newsletter refreshes the same record instead of adding one: storage is one
record per subscriber and list, not per message. A request is honoured only when
the stored record exists *and* its HMAC under the key it names is the code: a
guessed or altered code names no record (80 bits), and removing a key from
``tokens.keys`` revokes every code it issued. The first key issues, every key
verifies, as for tokens; the key is derived with HKDF, so it differs from the
token and VERP keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relay.config import TokensConfig
from relay.config.schema import MAX_MAILTO_LOCAL_PART
from relay.mail.address import normalize_address
from relay.mail.tokens import MalformedToken, TokenClaims, UnknownKey
from relay.model import UnsubscribeScope

CODE_LENGTH = 16
assert MAX_MAILTO_LOCAL_PART == 64 - 1 - CODE_LENGTH
_TAG = 10
_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_SCOPES: frozenset[str] = frozenset({"group", "sender", "all_marketing"})


def _derive(secret: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"oneclick-relay mailto v1")
    return hkdf.derive(secret)


def is_code(text: str) -> bool:
    return len(text) == CODE_LENGTH and set(text) <= _ALPHABET


def code_in(address: str) -> str | None:
    """The code in ``local+CODE@domain`` (any case), else None."""
    local, at, _ = address.strip().strip("<>").rpartition("@")
    _, plus, tail = local.rpartition("+")
    tail = tail.lower()
    return tail if at and plus and is_code(tail) else None


def with_code(address: str, code: str) -> str:
    """``local@domain`` → ``local+code@domain``."""
    local, _, domain = address.rpartition("@")
    return f"{local}+{code}@{domain}"


class MailtoCodec:
    """Codes and the records stored under them (no I/O: the store keeps the records)."""

    def __init__(self, config: TokensConfig) -> None:
        self._keys = {key.id: _derive(key.secret.reveal()) for key in config.keys}
        self._issuer = config.keys[0].id

    def _tag(self, key: bytes, key_id: str, fields: list[str]) -> str:
        message = "\0".join([key_id, *fields]).encode("utf-8")
        digest = hmac.new(key, message, hashlib.sha256).digest()[:_TAG]
        return base64.b32encode(digest).decode("ascii").lower()

    def issue(
        self,
        recipient: str,
        group: str,
        scope: UnsubscribeScope,
        sender: str | None,
        issued: float,
    ) -> tuple[str, bytes]:
        """The code for one recipient and list, and the record to store under it."""
        fields = [scope, normalize_address(recipient), group, sender or ""]
        code = self._tag(self._keys[self._issuer], self._issuer, fields)
        record = "\0".join([self._issuer, str(int(issued)), *fields]).encode("utf-8")
        return code, record

    def verify(self, code: str, record: bytes) -> TokenClaims:
        """The claims of a stored record, if ``code`` is its HMAC (raises ``TokenError``)."""
        try:
            key_id, issued, scope, recipient, group, sender = record.decode("utf-8").split("\0")
            when = int(issued)
        except ValueError:
            raise MalformedToken("mailto record has the wrong shape") from None
        key = self._keys.get(key_id)
        if key is None:
            raise UnknownKey("mailto code was issued under a key that is not configured")
        expected = self._tag(key, key_id, [scope, recipient, group, sender])
        if scope not in _SCOPES or not hmac.compare_digest(expected, code):
            raise MalformedToken("mailto code failed authentication")
        checked: UnsubscribeScope = "group"
        if scope == "sender":
            checked = "sender"
        elif scope == "all_marketing":
            checked = "all_marketing"
        return TokenClaims(recipient, group, when, key_id, checked, sender or None)
