"""relay.tokens: properties of the opaque unsubscribe tokens (hypothesis)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import Secret, TokenKey, TokensConfig
from relay.mail.tokens import (
    ExpiredToken,
    MalformedToken,
    TokenClaims,
    TokenCodec,
    TokenError,
    UnknownKey,
)

K1 = TokenKey("k1", Secret(b"k1-secret-0123456789abcdef0123456789abcdef"))
K2 = TokenKey("k2", Secret(b"k2-secret-fedcba9876543210fedcba9876543210"))
K1_OTHER_SECRET = TokenKey("k1", Secret(b"another-secret-but-same-id-0123456789abcdef"))
NOW = 1_750_000_000.0
DAY = 86400


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def codec(*keys: TokenKey, clock: Clock | None = None, max_age_days: int = 60) -> TokenCodec:
    config = TokensConfig(keys=keys or (K1,), max_age_days=max_age_days)
    return TokenCodec(config, clock=clock or Clock())


def split(token: str) -> tuple[str, bytes]:
    key_id, _, payload = token.partition(".")
    return key_id, base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))


def join(key_id: str, raw: bytes) -> str:
    return f"{key_id}." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# Address parts: printable, no NUL (the field separator), UTF-8 allowed. Sizes are kept
# to what real mail uses; the RFC maximum lengths have their own test below.
_local_chars = st.characters(blacklist_categories=("Cs", "Cc", "Zs"), blacklist_characters="@\0")
locals_ = st.text(_local_chars, min_size=1, max_size=20)
labels = st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
domains = st.lists(labels, min_size=2, max_size=3).map(".".join)
addresses = st.builds(lambda lp, d: f"{lp}@{d}", locals_, domains)
groups = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
scopes = st.sampled_from(["group", "sender", "all_marketing"])

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(recipient=addresses, group=groups, scope=scopes, sender=st.none() | addresses)
def test_round_trip(recipient: str, group: str, scope: str, sender: str | None) -> None:
    c = codec(K1)
    token = c.issue(recipient, group, scope, sender)  # type: ignore[arg-type]
    assert token.startswith("k1.")
    assert token.isascii()
    assert all(ch.isalnum() or ch in "-_." for ch in token)  # URL-safe as is
    claims = c.verify(token)
    assert claims == TokenClaims(recipient, group, int(NOW), "k1", scope, sender)  # type: ignore[arg-type]


def test_tokens_differ_each_time() -> None:
    c = codec(K1)
    first = c.issue("jane@example.com", "newsletter")
    second = c.issue("jane@example.com", "newsletter")
    assert first != second
    assert c.verify(first) == c.verify(second)


def test_round_trip_at_rfc_address_length_limits() -> None:
    """RFC 5321 allows 64-octet local parts and 254-octet addresses; such tokens must verify."""
    local = "l" * 64
    domain = f"{'d' * 61}.{'d' * 61}.{'d' * 57}.example"
    recipient = f"{local}@{domain}"
    sender = f"{'s' * 64}@{domain}"
    assert len(recipient) == len(sender) == 254
    group = "g" * 64
    c = codec(K1)
    for scope, who in (("group", None), ("sender", sender)):
        token = c.issue(recipient, group, scope, who)  # type: ignore[arg-type]
        claims = c.verify(token)
        assert (claims.recipient, claims.group, claims.sender) == (recipient, group, who)


@SETTINGS
@given(data=st.data())
def test_any_single_bit_flip_is_rejected(data: st.DataObject) -> None:
    c = codec(K1)
    token = c.issue(data.draw(addresses), data.draw(groups))
    key_id, raw = split(token)
    bit = data.draw(st.integers(min_value=0, max_value=len(raw) * 8 - 1))
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(MalformedToken) as err:
        c.verify(join(key_id, bytes(flipped)))
    assert err.value.status == 400


@SETTINGS
@given(data=st.data())
def test_truncated_or_extended_payload_is_rejected(data: st.DataObject) -> None:
    c = codec(K1)
    key_id, raw = split(c.issue("jane.doe@example.com", "newsletter"))
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    with pytest.raises(MalformedToken):
        c.verify(join(key_id, raw[:cut]))
    with pytest.raises(MalformedToken):
        c.verify(join(key_id, raw + data.draw(st.binary(min_size=1, max_size=8))))


@pytest.mark.parametrize(
    "token",
    ["", "k1", "k1.", "k1.!!!!", "k1." + "A" * 600, "k1.abc=", "k1.é"],
)
def test_garbage_is_rejected_as_malformed(token: str) -> None:
    with pytest.raises(MalformedToken) as err:
        codec(K1).verify(token)
    assert err.value.status == 400


def test_wrong_secret_same_key_id_is_rejected() -> None:
    token = codec(K1).issue("jane@example.com", "newsletter")
    with pytest.raises(MalformedToken) as err:
        codec(K1_OTHER_SECRET).verify(token)
    assert err.value.status == 400


def test_key_id_is_authenticated() -> None:
    """Relabelling a k1 token as k2 must not verify, even where both keys are configured."""
    both = codec(K1, K2)
    _, raw = split(both.issue("jane@example.com", "newsletter"))
    with pytest.raises(MalformedToken):
        both.verify(join("k2", raw))


def test_unknown_key_id_is_404() -> None:
    token = codec(K2).issue("jane@example.com", "newsletter")
    with pytest.raises(UnknownKey) as err:
        codec(K1).verify(token)
    assert err.value.status == 404
    assert isinstance(err.value, TokenError)


def test_expired_token() -> None:
    clock = Clock()
    c = codec(K1, clock=clock, max_age_days=60)
    token = c.issue("jane@example.com", "newsletter")
    clock.now = NOW + 61 * DAY
    with pytest.raises(ExpiredToken) as err:
        c.verify(token)
    assert err.value.status == 400


def test_expiry_boundary_is_exactly_max_age() -> None:
    clock = Clock()
    c = codec(K1, clock=clock, max_age_days=60)
    token = c.issue("jane@example.com", "newsletter")
    clock.now = NOW + 60 * DAY  # exactly max_age old: still valid
    assert c.verify(token).recipient == "jane@example.com"
    clock.now = NOW + 60 * DAY + 1
    with pytest.raises(ExpiredToken):
        c.verify(token)


def test_valid_for_at_least_60_days_with_defaults() -> None:
    clock = Clock()
    c = TokenCodec(TokensConfig(keys=(K1,)), clock=clock)
    token = c.issue("jane@example.com", "newsletter")
    clock.now = NOW + 60 * DAY
    assert c.verify(token).group == "newsletter"


def test_token_from_the_future_is_rejected() -> None:
    clock = Clock(NOW + 2 * 3600)
    token = codec(K1, clock=clock).issue("jane@example.com", "newsletter")
    with pytest.raises(MalformedToken):
        codec(K1, clock=Clock(NOW)).verify(token)
    # small clock skew between relays is tolerated
    token = codec(K1, clock=Clock(NOW + 60)).issue("jane@example.com", "newsletter")
    assert codec(K1, clock=Clock(NOW)).verify(token).issued == int(NOW + 60)


def test_key_rotation() -> None:
    old = codec(K1)
    new = codec(K2, K1)
    old_token = old.issue("jane@example.com", "newsletter")
    claims = new.verify(old_token)
    assert (claims.recipient, claims.key_id) == ("jane@example.com", "k1")
    new_token = new.issue("jane@example.com", "newsletter")
    assert new_token.startswith("k2.")
    assert new.verify(new_token).key_id == "k2"
    with pytest.raises(UnknownKey):
        old.verify(new_token)


@SETTINGS
@given(recipient=addresses, group=groups)
def test_recipient_is_not_readable(recipient: str, group: str) -> None:
    token = codec(K1).issue(recipient, group)
    _, raw = split(token)
    local, _, domain = recipient.rpartition("@")
    for part in (recipient, domain, local):
        if len(part) < 6:  # shorter strings can turn up in random bytes by chance
            continue
        assert part.encode() not in raw
        assert part.lower() not in token.lower()
        assert base64.urlsafe_b64encode(part.encode()).decode().rstrip("=")[:8] not in token


def test_typical_url_is_short() -> None:
    token = codec(K1).issue("jane.doe@example.com", "newsletter")
    url = f"https://unsubscribe.example.com/u/{token}"
    print(f"typical unsubscribe URL: {len(url)} characters: {url}")
    assert len(url) < 150
    assert "jane" not in url


def test_fingerprint_is_keyed_and_stable() -> None:
    a, b = codec(K1), codec(K1)
    assert a.fingerprint("192.0.2.1") == b.fingerprint("192.0.2.1")
    assert a.fingerprint("192.0.2.1") != a.fingerprint("192.0.2.2")
    assert codec(K2).fingerprint("192.0.2.1") != a.fingerprint("192.0.2.1")
    assert "192.0.2.1" not in a.fingerprint("192.0.2.1")
