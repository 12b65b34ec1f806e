"""Settings that load but can hurt, checked by ``serve`` and ``check-config`` as ssh checks keys.

``refusals`` are fatal (exit 2) unless the operator overrides them; ``warnings`` are
printed by ``check-config`` and logged at start. The open-relay and empty
``smtp.allowed_networks`` refusals are in the loader: no flag overrides those.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from relay.config.schema import Config


@dataclass(frozen=True, slots=True)
class Finding:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def _too_open(path: Path) -> int | None:
    """The mode when others may read it, or group too while we own it (OpenSSH's rule)."""
    try:
        st = path.stat()
    except OSError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    mask = 0o077 if st.st_uid == os.geteuid() else 0o007
    return mode if mode & mask else None


def permission_refusals(config: Config) -> list[Finding]:
    """Key, secret and password files (and the embedded store's folder) others can read.

    A file owned by the relay's own user must be 0600 (0700 for the folder); a file owned
    by someone else (root, with the relay in its group) may be group-readable, as in the
    systemd deployment (root:oneclick-relay 0640), but never readable by others.
    """
    found: list[Finding] = []
    for key, path in config.secret_files:
        mode = _too_open(path)
        if mode is not None:
            found.append(
                Finding(
                    key,
                    f"permissions {mode:04o} for '{path}' are too open: a key or secret file"
                    f" must not be accessible by others (chmod 600 '{path}',"
                    " or 640 with the relay's group when root owns it)",
                )
            )
    data_dir = config.redis.data_dir
    if data_dir is not None:
        mode = _too_open(data_dir)
        if mode is not None:
            found.append(
                Finding(
                    "redis.data_dir",
                    f"permissions {mode:04o} for '{data_dir}' are too open: the suppression"
                    f" list is personal data (chmod 700 '{data_dir}')",
                )
            )
    return found


def warnings(config: Config, ed25519_only: Sequence[tuple[str, str]] = ()) -> list[Finding]:
    """Settings that work but that mailbox providers or operators will regret.

    ``ed25519_only``: (sender rule key, domain) of marketing senders whose domain has only
    Ed25519 keys (the caller loads the keys; this layer does not parse them).
    """
    found: list[Finding] = []
    if urlsplit(config.http.public_url).scheme == "http":
        found.append(
            Finding(
                "http.public_url",
                f"{config.http.public_url} is plain http://: the one-click URL must be https"
                " (RFC 8058 section 3.1); mailbox providers do not POST to http:// links",
            )
        )
    for key, domain in ed25519_only:
        found.append(
            Finding(
                key,
                f"{domain} has only Ed25519 DKIM keys: Gmail and SpamAssassin do not verify"
                " Ed25519-only mail; add an RSA key for the domain and dual-sign",
            )
        )
    return found


def store_notice(config: Config) -> str | None:
    """The loud line for an embedded store (``redis.url: embedded``, or the demo's)."""
    redis = config.redis
    if redis.embedded:
        return (
            f"redis: EMBEDDED server, persisting to an append-only file in {redis.data_dir};"
            " single host only: every relay host needs the same Redis (a redis:// URL)"
        )
    if redis.url is None and redis.sentinel is None:
        return "redis: EMBEDDED throwaway server: nothing survives a restart (demo only)"
    return None
