"""SMTP AUTH users: a file of ``name:scrypt$N$r$p$salt$hash`` lines, one per user.

``oneclick-relay passwd FILE USER`` adds or changes a user. Verification uses
scrypt (about 40 ms); a successful check is remembered for the life of the
process as an HMAC under a random per-process key, so a busy application that
authenticates on every connection does not stall the event loop each time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

from relay.errors import ConfigError

_N, _R, _P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def _check(encoded: str, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


class Users:
    def __init__(self, hashes: dict[str, str]) -> None:
        self._hashes = hashes
        self._dummy = hash_password(os.urandom(8).hex())
        self._cache_key = os.urandom(32)
        self._verified: set[bytes] = set()

    @classmethod
    def load(cls, path: Path, key: str = "smtp.auth.users_file") -> Users:
        hashes: dict[str, str] = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, encoded = line.partition(":")
            if not sep or not name or not encoded.startswith("scrypt$"):
                raise ConfigError(key, f"line {number} is not 'user:scrypt$…'")
            hashes[name] = encoded
        if not hashes:
            raise ConfigError(key, f"no users in {path}")
        return cls(hashes)

    def verify(self, username: str, password: str) -> bool:
        encoded = self._hashes.get(username)
        if encoded is None:
            _check(self._dummy, password)  # same cost for unknown users
            return False
        mark = hmac.digest(self._cache_key, f"{username}\0{password}".encode(), "sha256")
        if mark in self._verified:
            return True
        if _check(encoded, password):
            self._verified.add(mark)
            return True
        return False


def set_password(path: Path, username: str, password: str) -> None:
    """Add or replace ``username`` in the users file (created mode 0600)."""
    if not username or ":" in username or any(ch.isspace() for ch in username):
        raise ValueError("user names cannot contain ':' or white space")
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    lines = [line for line in lines if line.partition(":")[0] != username]
    lines.append(f"{username}:{hash_password(password)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
