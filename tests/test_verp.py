"""relay.verp: return paths fit RFC 5321, verify only for their own recipient, and rotate."""

from __future__ import annotations

import pytest
from conftest import Keys

from relay.config import Secret, TokenKey, TokensConfig
from relay.mail.verp import MAX_LOCAL_PART, ForgedCode, Verp

SENT = 1_747_045_881


def codec(*secrets: bytes) -> Verp:
    keys = tuple(TokenKey(f"k{i}", Secret(s)) for i, s in enumerate(secrets))
    return Verp(TokensConfig(keys), "bounces", "bounce.example.com", ["newsletter", "promotions"])


@pytest.fixture
def verp(keys: Keys) -> Verp:
    return codec(keys.token_k1.read_bytes().strip())


def test_round_trip_with_the_recipient_inline(verp: Verp) -> None:
    address = verp.address("Alice@Example.NET", "newsletter", "A06656607EE8", SENT)
    local, _, domain = address.partition("@")
    assert domain == "bounce.example.com"
    assert len(local) <= MAX_LOCAL_PART
    assert local.endswith(".alice=example.net")
    ref = verp.parse(address)
    assert ref is not None
    claims = verp.verify(ref)
    assert (claims.recipient, claims.group, claims.sent, claims.message) == (
        "alice@example.net",
        "newsletter",
        SENT,
        "A066",
    )
    # mail systems may change the case of what they quote
    assert verp.verify(verp.parse(address.upper()) or ref) == claims


def test_long_recipient_is_left_out_and_matched_against_the_report(verp: Verp) -> None:
    rcpt = "firstname.middlename.lastname@mail.subdivision.example.org"
    address = verp.address(rcpt, None, "0123456789AB", SENT)
    assert len(address.partition("@")[0]) <= MAX_LOCAL_PART
    ref = verp.parse(address)
    assert ref is not None and ref.recipient is None
    claims = verp.verify(ref, ["someone@else.example", rcpt.upper()])
    assert (claims.recipient, claims.group) == (rcpt, "-")
    with pytest.raises(ForgedCode):
        verp.verify(ref, ["someone@else.example"])


@pytest.mark.parametrize(
    "rcpt", ['"john smith"@example.com', "jörg@example.com", "user@xn--bcher-kva.example"]
)
def test_unusual_recipients_are_not_inlined(verp: Verp, rcpt: str) -> None:
    address = verp.address(rcpt, "newsletter", "ABCDEF012345", SENT)
    assert address.isascii()
    ref = verp.parse(address)
    assert ref is not None
    assert verp.verify(ref, [rcpt]).group == "newsletter"


def test_tampering_is_detected(verp: Verp) -> None:
    address = verp.address("alice@example.net", "newsletter", "A06656607EE8", SENT)
    local = address.partition("@")[0]
    code = local[len("bounces+") : len("bounces+") + 24]
    for i in (0, 5, 12, 23):
        flipped = code[:i] + ("a" if code[i] != "a" else "b") + code[i + 1 :]
        ref = verp.parse(address.replace(code, flipped))
        assert ref is not None
        with pytest.raises(ForgedCode):
            verp.verify(ref)
    other = verp.parse(address.replace("alice=", "mallory="))
    assert other is not None
    with pytest.raises(ForgedCode):
        verp.verify(other)


def test_key_rotation_and_foreign_keys(keys: Keys) -> None:
    k1, k2 = keys.token_k1.read_bytes().strip(), keys.token_k2.read_bytes().strip()
    old = codec(k1).address("alice@example.net", "newsletter", "A06656607EE8", SENT)
    ref = codec(k2, k1).parse(old)
    assert ref is not None
    assert codec(k2, k1).verify(ref).recipient == "alice@example.net"
    with pytest.raises(ForgedCode):
        codec(k2).verify(ref)


@pytest.mark.parametrize(
    "address",
    [
        "bounces@bounce.example.com",
        "bounces+short@bounce.example.com",
        "bounces+" + "a" * 24 + "@other.example.com",
        "news+" + "a" * 24 + "@bounce.example.com",
        "bounces+" + "a" * 24 + ".nodomain@bounce.example.com",
        "bounces+" + "1" * 24 + "@bounce.example.com",
    ],
)
def test_parse_refuses_what_is_not_ours(verp: Verp, address: str) -> None:
    assert verp.parse(address) is None


def test_find_in_text_and_is_own(verp: Verp) -> None:
    a = verp.address("alice@example.net", "newsletter", "A06656607EE8", SENT)
    b = verp.address("x" * 40 + "@example.org", None, "A06656607EE8", SENT)
    text = f"Return-Path: <{a}>\nX-Postfix-Sender: rfc822; {b}\nTo: {a}\n"
    assert [r.recipient for r in verp.find(text)] == ["alice@example.net", None]
    assert verp.is_own("Bounces@Bounce.Example.com")
    assert verp.is_own(a)
    assert not verp.is_own("bouncesx@bounce.example.com")


def test_find_reads_a_bounded_window_around_each_candidate(verp: Verp) -> None:
    """Runs of ``bounces+aaaa…`` (quadratic for the old regex) and junk around a real path."""
    a = verp.address("alice@example.net", "newsletter", "A06656607EE8", SENT)
    run = ("bounces+" + "a" * 24) * 12_500
    assert verp.find(run) == []
    assert verp.find(run + f" <{a}>\n") == [verp.parse(a)]
    assert verp.find(f"{a.upper()}.") == [verp.parse(a)]
    assert verp.find(f"x{a}evil.example") == []  # another domain that merely starts alike
    many = "".join(
        verp.address(f"u{i}@example.net", None, "A06656607EE8", SENT) + "\n" for i in range(100)
    )
    assert len(verp.find(many)) == 32
