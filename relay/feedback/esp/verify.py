"""Is this request from the provider? One check per provider, no I/O.

* SES: an SNS message signature (SignatureVersion 1: RSA SHA-1, 2: RSA SHA-256) over
  the documented canonical string, with a certificate that came from an SNS host
  over HTTPS (``sns_url_allowed``) or that the operator pinned.
* SendGrid: ECDSA P-256 / SHA-256 over timestamp + raw body, timestamp fresh.
* Mailgun: HMAC-SHA256 of timestamp + token with the signing key, timestamp fresh
  (the token's single use is checked against the store by the caller).
* Postmark: HTTP basic auth with the configured ``user:password``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from relay.errors import RelayError

SNS_HOST = re.compile(r"^sns\.[a-z0-9-]{1,30}\.amazonaws\.com(\.cn)?$")
_NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_SUBSCRIPTION_FIELDS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)


class Unauthenticated(RelayError):
    """The request is not proven to come from the provider; nothing may change."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = 401 if missing else 403


def sns_url_allowed(url: str) -> bool:
    """An SNS certificate or subscription URL: HTTPS to an SNS host, nothing else."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return (
        parts.scheme == "https"
        and parts.hostname is not None
        and SNS_HOST.match(parts.hostname) is not None
        and parts.port in (None, 443)
        and not parts.username
    )


def sns_string_to_sign(message: Mapping[str, Any]) -> bytes:
    """The canonical string SNS signs, by message type (AWS's published field lists)."""
    kind = message.get("Type")
    fields: tuple[str, ...]
    if kind == "Notification":
        fields = _NOTIFICATION_FIELDS
    elif kind in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
        fields = _SUBSCRIPTION_FIELDS
    else:
        raise Unauthenticated(f"unknown SNS message type {str(kind)[:40]!r}")
    out = []
    for name in fields:
        value = message.get(name)
        if value is None:
            if name == "Subject":
                continue
            raise Unauthenticated(f"SNS message without {name}")
        out.append(f"{name}\n{value}\n")
    return "".join(out).encode("utf-8")


def verify_sns(message: Mapping[str, Any], certificate_pem: bytes) -> None:
    """Raise ``Unauthenticated`` unless ``message`` is signed by the certificate's key."""
    version = str(message.get("SignatureVersion", ""))
    algorithm: hashes.HashAlgorithm
    if version == "1":
        algorithm = hashes.SHA1()  # noqa: S303 - SNS SignatureVersion 1 is SHA1withRSA
    elif version == "2":
        algorithm = hashes.SHA256()
    else:
        raise Unauthenticated(f"unsupported SNS SignatureVersion {version[:8]!r}")
    try:
        signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
        cert = x509.load_pem_x509_certificate(certificate_pem)
    except (binascii.Error, ValueError) as exc:
        raise Unauthenticated(f"unreadable SNS signature or certificate: {exc}") from exc
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise Unauthenticated("SNS certificate without an RSA key")
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise Unauthenticated("SNS signing certificate is not valid now")
    try:
        key.verify(signature, sns_string_to_sign(message), padding.PKCS1v15(), algorithm)
    except InvalidSignature as exc:
        raise Unauthenticated("SNS signature does not verify") from exc


def load_sendgrid_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """SendGrid's verification key: PEM, or the base64 DER string its settings page shows."""
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not an ECDSA public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an ECDSA public key")
    return key


def _fresh(timestamp: str, now: float, max_skew: float) -> None:
    try:
        when = float(timestamp)
    except ValueError as exc:
        raise Unauthenticated("timestamp is not a number") from exc
    if abs(now - when) > max_skew:
        raise Unauthenticated(f"timestamp is {now - when:.0f} s from now (stale or replayed)")


def verify_sendgrid(
    key: ec.EllipticCurvePublicKey,
    signature: str | None,
    timestamp: str | None,
    body: bytes,
    now: float,
    max_skew: float,
) -> None:
    if not signature or not timestamp:
        raise Unauthenticated("signature headers missing", missing=True)
    _fresh(timestamp, now, max_skew)
    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, InvalidSignature, ValueError) as exc:
        raise Unauthenticated("signature does not verify") from exc


def verify_mailgun(
    signing_key: bytes, signature: Mapping[str, Any], now: float, max_skew: float
) -> str:
    """Check ``signature`` {timestamp, token, signature}; answers the token (single use)."""
    timestamp, token = str(signature.get("timestamp", "")), str(signature.get("token", ""))
    given = str(signature.get("signature", ""))
    if not timestamp or not token or not given:
        raise Unauthenticated("signature missing", missing=True)
    _fresh(timestamp, now, max_skew)
    expected = hmac.new(signing_key, (timestamp + token).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, given.lower()):
        raise Unauthenticated("signature does not verify")
    return token


def verify_basic(expected: bytes, authorization: str | None) -> None:
    """HTTP basic auth against ``user:password``, compared in constant time."""
    if not authorization or not authorization.lower().startswith("basic "):
        raise Unauthenticated("basic auth required", missing=True)
    try:
        given = base64.b64decode(authorization[6:].strip(), validate=True)
    except binascii.Error as exc:
        raise Unauthenticated("malformed basic auth") from exc
    if not hmac.compare_digest(given, expected):
        raise Unauthenticated("wrong user or password")
