"""relay.mail.mailto: codes fit the local part, verify only for their own record, rotate."""

from __future__ import annotations

import pytest

from relay.config import Secret, TokenKey, TokensConfig
from relay.mail.mailto import CODE_LENGTH, MailtoCodec, code_in, with_code
from relay.mail.tokens import MalformedToken, UnknownKey

NOW = 1_750_000_000


def codec(*ids: str) -> MailtoCodec:
    secrets = {"k1": b"1" * 32, "k2": b"2" * 32}
    return MailtoCodec(TokensConfig(tuple(TokenKey(i, Secret(secrets[i])) for i in ids)))


def test_round_trip_and_the_address() -> None:
    c = codec("k1")
    code, record = c.issue("Alice@Example.NET", "newsletter", "group", None, NOW)
    assert len(code) == CODE_LENGTH and code.islower()
    address = with_code("unsubscribe@unsub.example.com", code)
    assert len(address.partition("@")[0]) <= 64
    assert code_in(address) == code
    assert code_in(address.upper()) == code  # MTAs that change the case of local parts
    claims = c.verify(code, record)
    assert (claims.recipient, claims.group, claims.scope, claims.sender, claims.issued) == (
        "alice@example.net",
        "newsletter",
        "group",
        None,
        NOW,
    )
    assert claims.key_id == "k1"


def test_deterministic_per_recipient_and_list_so_records_are_refreshed() -> None:
    c = codec("k1")
    a1, _ = c.issue("alice@example.net", "newsletter", "group", None, NOW)
    a2, _ = c.issue("ALICE@example.net", "newsletter", "group", None, NOW + 86400)
    assert a1 == a2
    assert c.issue("bob@example.net", "newsletter", "group", None, NOW)[0] != a1
    assert c.issue("alice@example.net", "promotions", "group", None, NOW)[0] != a1
    sender = c.issue("alice@example.net", "newsletter", "sender", "news@example.com", NOW)
    assert sender[0] != a1
    assert c.verify(*sender).sender == "news@example.com"


def test_altered_code_or_record_and_removed_key_are_refused() -> None:
    c = codec("k1")
    code, record = c.issue("alice@example.net", "newsletter", "group", None, NOW)
    altered = ("a" if code[0] != "a" else "b") + code[1:]
    with pytest.raises(MalformedToken):
        c.verify(altered, record)
    with pytest.raises(MalformedToken):  # a record rewritten to name someone else
        c.verify(code, record.replace(b"alice", b"mallory"))
    with pytest.raises(MalformedToken):
        c.verify(code, b"garbage")
    # rotation: a new first key issues, the old one still verifies, removing it revokes
    rotated = codec("k2", "k1")
    assert rotated.verify(code, record).recipient == "alice@example.net"
    assert rotated.issue("alice@example.net", "newsletter", "group", None, NOW)[0] != code
    with pytest.raises(UnknownKey):
        codec("k2").verify(code, record)


@pytest.mark.parametrize(
    "address",
    [
        "unsubscribe@unsub.example.com",
        "unsubscribe+short@unsub.example.com",
        "unsubscribe+abcdefghijklmnop0@unsub.example.com",
        "unsubscribe+abcdefghijklmno1@unsub.example.com",
        "unsubscribe+abcdefghijklmnop",
    ],
)
def test_what_is_not_a_code(address: str) -> None:
    assert code_in(address) is None
