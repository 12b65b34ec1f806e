"""Opaque, unforgeable unsubscribe tokens.

A token is ``KEYID.PAYLOAD``: PAYLOAD is base64url (no padding) of
``nonce(12) || AES-256-GCM(issued uint32 || scope || recipient NUL group [NUL sender])``
with the key id as associated data. Nobody can read the recipient out of a URL,
change a bit without the tag failing, or mint a token without the secret. The AES
key is derived with HKDF from the key file, so any 32+ bytes of randomness do.

``tokens.keys``: the first key issues, every key verifies, so a new key can be put
first while mail signed under the old one is still being clicked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relay.config import TokensConfig
from relay.errors import RelayError
from relay.model import UnsubscribeScope

MAX_TOKEN_LENGTH = 1024
"""Room for a sender-scoped token of two 254-octet addresses and a 64-character group."""
_NONCE = 12
_CLOCK_SKEW = 3600
_SCOPE_CODES: dict[UnsubscribeScope, bytes] = {"group": b"g", "sender": b"s", "all_marketing": b"a"}
_SCOPES_BY_CODE = {code[0]: scope for scope, code in _SCOPE_CODES.items()}


class TokenError(RelayError):
    """The token cannot be honoured; ``status`` is the HTTP status to answer."""

    status = 400


class MalformedToken(TokenError):
    pass


class UnknownKey(TokenError):
    status = 404


class ExpiredToken(TokenError):
    pass


@dataclass(frozen=True, slots=True)
class TokenClaims:
    recipient: str
    group: str
    issued: int
    key_id: str
    scope: UnsubscribeScope = "group"
    sender: str | None = None


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


class TokenCodec:
    def __init__(self, config: TokensConfig, clock: Callable[[], float] = time.time) -> None:
        self._ciphers = {
            key.id: AESGCM(_derive(key.secret.reveal(), b"oneclick-relay token v1"))
            for key in config.keys
        }
        self._issuer = config.keys[0].id
        self._max_age = config.max_age_days * 86400
        self._clock = clock
        self._fingerprint_key = _derive(config.keys[0].secret.reveal(), b"oneclick-relay fp v1")

    def issue(
        self,
        recipient: str,
        group: str,
        scope: UnsubscribeScope = "group",
        sender: str | None = None,
    ) -> str:
        fields = [recipient, group] if sender is None else [recipient, group, sender]
        plain = (
            struct.pack(">I", int(self._clock()))
            + _SCOPE_CODES[scope]
            + "\0".join(fields).encode("utf-8")
        )
        nonce = os.urandom(_NONCE)
        kid = self._issuer.encode("ascii")
        sealed = self._ciphers[self._issuer].encrypt(nonce, plain, kid)
        payload = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")
        return f"{self._issuer}.{payload}"

    def verify(self, token: str) -> TokenClaims:
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise MalformedToken("token too long or not ASCII")
        key_id, dot, payload = token.partition(".")
        if not dot or not payload:
            raise MalformedToken("not a token")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise UnknownKey("token was issued under a key that is not configured")
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        except (binascii.Error, ValueError):
            raise MalformedToken("token is not base64url") from None
        if len(raw) < _NONCE + 16 + 5:
            raise MalformedToken("token too short")
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != payload:
            raise MalformedToken("token is not in canonical base64url")
        try:
            plain = cipher.decrypt(raw[:_NONCE], raw[_NONCE:], key_id.encode("ascii"))
        except InvalidTag:
            raise MalformedToken("token failed authentication") from None
        (issued,) = struct.unpack(">I", plain[:4])
        now = self._clock()
        if issued > now + _CLOCK_SKEW:
            raise MalformedToken("token issued in the future")
        if now - issued > self._max_age:
            raise ExpiredToken("unsubscribe link has expired")
        scope = _SCOPES_BY_CODE.get(plain[4])
        fields = plain[5:].decode("utf-8").split("\0")
        if scope is None or len(fields) not in (2, 3):
            raise MalformedToken("token payload has the wrong shape")
        sender = fields[2] if len(fields) == 3 else None
        return TokenClaims(fields[0], fields[1], issued, key_id, scope, sender)

    def fingerprint(self, value: str) -> str:
        """A keyed hash for logging client IPs without storing them."""
        mac = hmac.new(self._fingerprint_key, value.encode("utf-8"), hashlib.sha256)
        return mac.hexdigest()[:16]
