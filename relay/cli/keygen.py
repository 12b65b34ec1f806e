"""Key generation for operators: DKIM key pairs and token secrets, written mode 0600."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.mail.dkim import DkimKey


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def dkim_keygen(
    domain: str, selector: str, key_type: str, bits: int, out: Path
) -> tuple[Path, str]:
    """Write ``out/DOMAIN.SELECTOR.pem``; returns the path and the DNS TXT record line."""
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if key_type == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = out / f"{domain}.{selector}.pem"
    write_private(path, pem)
    record = DkimKey(domain, selector, private).dns_record()
    return path, f"{selector}._domainkey.{domain}. IN TXT {_txt_strings(record)}"


def _txt_strings(record: str) -> str:
    """DNS TXT strings are at most 255 octets each: split long records."""
    parts = [record[i : i + 250] for i in range(0, len(record), 250)]
    return " ".join(f'"{p}"' for p in parts)


def token_keygen(path: Path) -> None:
    write_private(path, base64.b64encode(os.urandom(48)) + b"\n")
