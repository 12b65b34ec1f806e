"""The dashboard's sign-in session: a cookie that proves the admin token was typed.

A browser cannot send the admin bearer token when a person opens ``/admin/``, so the
page has a login form; a correct token gets a session cookie holding an expiry and an
HMAC of it keyed by the token (nothing to store, and rotating the token ends every
session). The cookie is only good for viewing the page, not for the JSON API.
"""

from __future__ import annotations

import hashlib
import hmac

SESSION_COOKIE = "ocr_admin"
SESSION_SECONDS = 12 * 3600


def _session_mac(token: bytes, expires: int) -> str:
    message = f"oneclick-relay admin session|{expires}".encode()
    return hmac.new(token, message, hashlib.sha256).hexdigest()


def session_value(token: bytes, now: float, lifetime: int = SESSION_SECONDS) -> str:
    """``<expires>.<hmac>``: proves the token was typed, without containing it."""
    expires = int(now) + lifetime
    return f"{expires}.{_session_mac(token, expires)}"


def session_valid(token: bytes, value: str, now: float) -> bool:
    expires, _, mac = value.partition(".")
    if not (expires.isascii() and expires.isdigit()) or len(expires) > 12:
        return False
    if int(expires) <= now:
        return False
    return hmac.compare_digest(mac.encode(), _session_mac(token, int(expires)).encode())
