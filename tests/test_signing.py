"""relay.signing: DKIM signatures checked by dkimpy and by an independent Perl verifier."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest
from conftest import Keys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import message, write_yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import DkimConfig, DkimKeyConfig, load_config
from relay.errors import ConfigError
from relay.mail.dkim import (
    OVERSIGNED,
    DkimKey,
    Signer,
    body_hash,
    load_key,
    relaxed_body,
    relaxed_header,
)
from relay.mail.message import Header, Message

PERL_TOOL = Path(__file__).parent / "tools" / "dkim_verify.pl"
PERL_HINT = (
    "the independent DKIM verifier needs Perl with Mail::DKIM and CryptX:"
    " apt-get install libmail-dkim-perl libcryptx-perl"
)
LIST_UNSUBSCRIBE = "<https://unsubscribe.example.com/u/k1.AAAAbbbbCCCCddddEEEE>"
NOW = 1_750_000_000


# ---------------------------------------------------------------------------
# Fixtures and helpers


@dataclass(frozen=True)
class PerlDkim:
    ed25519: bool
    """Whether this Mail::DKIM checks Ed25519 (Debian 12's 1.20230212 does not)."""


@pytest.fixture(scope="module")
def perl_dkim() -> PerlDkim:
    """Fail (never skip) when the Perl verifier cannot run."""
    if shutil.which("perl") is None:
        pytest.fail(f"perl not found; {PERL_HINT}", pytrace=False)
    probe = subprocess.run(
        ["perl", "-MMail::DKIM::Verifier", "-MCryptX", "-e", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        pytest.fail(f"{probe.stderr.strip()}\n{PERL_HINT}", pytrace=False)
    ed25519 = subprocess.run(
        ["perl", "-MMail::DKIM::Algorithm::ed25519_sha256", "-e", "1"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return PerlDkim(ed25519=ed25519.returncode == 0)


@pytest.fixture(scope="module")
def rsa(keys: Keys) -> DkimKey:
    return load_key(DkimKeyConfig("example.com", "s2026", keys.rsa))


@pytest.fixture(scope="module")
def ed(keys: Keys) -> DkimKey:
    return load_key(DkimKeyConfig("example.com", "e2026", keys.ed25519))


@pytest.fixture
def dns_file(keys: Keys, tmp_path: Path) -> Path:
    return keys.write_dns_file(tmp_path / "dns.txt")


def marketing_message(extra: str = "") -> Message:
    msg = Message.parse(message(extra=extra))
    return msg.replace(
        append=[
            Header.build("List-Unsubscribe", LIST_UNSUBSCRIBE),
            Header.build("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ]
    )


def sign(msg: Message, keys: Sequence[DkimKey]) -> bytes:
    signatures = Signer(keys, clock=lambda: NOW).sign(msg, keys, body_hash(msg.body))
    assert len(signatures) == len(keys)
    return msg.replace(prepend=signatures).to_bytes()


def dkimpy_results(data: bytes, keys: Keys) -> list[bool]:
    count = len(re.findall(rb"(?im)^DKIM-Signature:", data))
    results = []
    for index in range(count):
        try:
            ok = dkim.DKIM(data).verify(idx=index, dnsfunc=keys.dnsfunc)
        except dkim.ValidationError:  # dkimpy raises on a body hash mismatch
            ok = False
        results.append(bool(ok))
    return results


@dataclass(frozen=True)
class Verdict:
    result: str
    domain: str
    selector: str
    algorithm: str
    h: list[str]
    detail: str


def perl_results(data: bytes, dns_file: Path) -> list[Verdict]:
    """Mail::DKIM's verdict for each signature, in order."""
    result = subprocess.run(
        ["perl", str(PERL_TOOL), str(dns_file)],
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    verdicts = []
    for line in result.stdout.decode().splitlines():
        status, d, s, a, h, detail = line.split("\t")
        verdicts.append(
            Verdict(
                status,
                d.removeprefix("d="),
                s.removeprefix("s="),
                a.removeprefix("a="),
                h.removeprefix("h=").lower().split(":"),
                detail,
            )
        )
    return verdicts


def assert_perl(verdicts: list[Verdict], expected: str, perl: PerlDkim) -> None:
    """Every signature has the ``expected`` result ("pass" or "fail").

    Where the installed Mail::DKIM predates Ed25519, it must still have found the
    Ed25519 signature and said why it cannot judge it; the RSA signature next to it
    and dkimpy carry the check for that run.
    """
    assert verdicts, "the Perl verifier saw no signature"
    for v in verdicts:
        if v.algorithm == "ed25519-sha256" and not perl.ed25519:
            assert (v.result, v.detail) == (
                "invalid",
                "invalid (unsupported algorithm ed25519-sha256)",
            ), v
        else:
            assert v.result == expected, v


def signature_tags(data: bytes, index: int = 0) -> dict[str, str]:
    header = Message.parse(data).get_all("DKIM-Signature")[index]
    tags = {}
    for part in header.value.split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            tags[name] = value.replace(" ", "")
    return tags


def signed_names(data: bytes, index: int = 0) -> list[str]:
    return signature_tags(data, index)["h"].split(":")


Tamper = Callable[[bytes], bytes]


def change_body(data: bytes) -> bytes:
    assert b"Hello there." in data
    return data.replace(b"Hello there.", b"Hello there!")


def change_subject(data: bytes) -> bytes:
    assert b"Subject: Hello\r\n" in data
    return data.replace(b"Subject: Hello\r\n", b"Subject: Hellp\r\n")


def add_list_unsubscribe_bottom(data: bytes) -> bytes:
    return data.replace(b"\r\n\r\n", b"\r\nList-Unsubscribe: <https://evil.example/u/x>\r\n\r\n", 1)


def add_list_unsubscribe_top(data: bytes) -> bytes:
    return b"List-Unsubscribe: <https://evil.example/u/x>\r\n" + data


def add_second_from(data: bytes) -> bytes:
    return data.replace(b"\r\n\r\n", b"\r\nFrom: Evil <ceo@evil.example>\r\n\r\n", 1)


def change_list_unsubscribe_post(data: bytes) -> bytes:
    return data.replace(b"List-Unsubscribe=One-Click", b"List-Unsubscribe=Two-Click")


TAMPERS = [
    pytest.param(change_body, id="body"),
    pytest.param(change_subject, id="subject"),
    pytest.param(add_list_unsubscribe_bottom, id="second-list-unsubscribe-bottom"),
    pytest.param(add_list_unsubscribe_top, id="second-list-unsubscribe-top"),
    pytest.param(add_second_from, id="second-from"),
    pytest.param(change_list_unsubscribe_post, id="list-unsubscribe-post"),
]


# ---------------------------------------------------------------------------
# Valid signatures


@pytest.mark.parametrize("which", ["rsa", "ed25519"])
def test_single_signature_verifies(
    which: str, rsa: DkimKey, ed: DkimKey, keys: Keys, dns_file: Path, perl_dkim: PerlDkim
) -> None:
    key = rsa if which == "rsa" else ed
    data = sign(marketing_message(), [key])
    assert dkimpy_results(data, keys) == [True]
    verdicts = perl_results(data, dns_file)
    assert_perl(verdicts, "pass", perl_dkim)
    [v] = verdicts
    assert (v.domain, v.selector, v.algorithm) == ("example.com", key.selector, key.algorithm)
    tags = signature_tags(data)
    assert tags["a"] == ("rsa-sha256" if which == "rsa" else "ed25519-sha256")
    assert (tags["d"], tags["s"], tags["c"], tags["t"]) == (
        "example.com",
        key.selector,
        "relaxed/relaxed",
        str(NOW),
    )


def test_dual_signature_verifies(
    rsa: DkimKey, ed: DkimKey, keys: Keys, dns_file: Path, perl_dkim: PerlDkim
) -> None:
    data = sign(marketing_message(), [rsa, ed])
    assert dkimpy_results(data, keys) == [True, True]
    verdicts = perl_results(data, dns_file)
    assert [v.algorithm for v in verdicts] == ["rsa-sha256", "ed25519-sha256"]
    assert_perl(verdicts, "pass", perl_dkim)


def test_signature_field_lines_are_bounded(rsa: DkimKey) -> None:
    data = sign(marketing_message(), [rsa])
    [sig] = Message.parse(data).get_all("DKIM-Signature")
    lines = sig.raw.split(b"\r\n")[:-1]
    assert len(lines) > 3  # folded
    assert all(len(line) <= 998 for line in lines)
    assert all(line[:1] in (b" ", b"\t") for line in lines[1:])


def test_h_covers_list_headers_and_oversigns(rsa: DkimKey) -> None:
    msg = marketing_message(extra="Received: from a\r\nReceived: from b\r\nCc: c@example.org\r\n")
    data = sign(msg, [rsa])
    names = signed_names(data)
    assert "list-unsubscribe" in names
    assert "list-unsubscribe-post" in names
    assert set(OVERSIGNED) >= {"from", "list-unsubscribe", "list-unsubscribe-post", "reply-to"}
    for name in OVERSIGNED:
        present = len(msg.get_all(name))
        assert names.count(name) == present + 1, (name, names)
    for name in ("from", "subject", "to", "cc", "message-id", "mime-version", "content-type"):
        assert names.count(name) == 2, (name, names)
    assert "received" not in names
    assert "dkim-signature" not in names


ADDED = [
    "Reply-To: Evil <evil@evil.example>",
    "Sender: evil@evil.example",
    "Cc: victim@example.org",
    "To: victim@example.org",
    "Date: Thu, 1 Jan 2026 00:00:00 +0000",
    "Subject: Your account is locked",
    "Content-Type: text/html; charset=utf-8",
    "Content-Transfer-Encoding: base64",
    "Message-ID: <replayed@evil.example>",
    "MIME-Version: 1.0",
    "In-Reply-To: <x@evil.example>",
    "References: <x@evil.example>",
    "List-Id: Evil <evil.example>",
    "List-Unsubscribe: <https://evil.example/u/x>",
    "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
    "Feedback-ID: a:b:c:evil",
]


@pytest.mark.parametrize("field", ADDED, ids=[f.split(":")[0].lower() for f in ADDED])
def test_prepending_any_signed_field_breaks_the_signature(
    field: str, rsa: DkimKey, ed: DkimKey, keys: Keys, dns_file: Path, perl_dkim: PerlDkim
) -> None:
    """A replay with one more field at the top (where verifiers look first) never verifies.

    The message lacks Reply-To, Sender, Cc, Date, In-Reply-To, References, List-Id
    and Feedback-ID, so half of these are first instances of an absent field.
    """
    data = sign(marketing_message(), [rsa, ed])
    assert dkimpy_results(data, keys) == [True, True]
    bad = field.encode() + b"\r\n" + data
    assert dkimpy_results(bad, keys) == [False, False]
    verdicts = perl_results(bad, dns_file)
    assert len(verdicts) == 2
    assert_perl(verdicts, "fail", perl_dkim)


def test_absent_list_headers_are_still_oversigned(rsa: DkimKey, keys: Keys) -> None:
    """A transactional message: nobody may add a List-Unsubscribe after signing."""
    msg = Message.parse(message(sender="receipts@example.com"))
    data = sign(msg, [rsa])
    names = signed_names(data)
    assert names.count("list-unsubscribe") == 1
    assert names.count("list-unsubscribe-post") == 1
    assert dkimpy_results(data, keys) == [True]
    assert dkimpy_results(add_list_unsubscribe_bottom(data), keys) == [False]


def test_perl_reports_the_same_h_list(rsa: DkimKey, dns_file: Path, perl_dkim: PerlDkim) -> None:
    data = sign(marketing_message(), [rsa])
    [v] = perl_results(data, dns_file)
    assert v.h == signed_names(data)


# ---------------------------------------------------------------------------
# Tampering breaks the signature (both verifiers, both algorithms)


@pytest.mark.parametrize("tamper", TAMPERS)
def test_tampering_fails(
    tamper: Tamper, rsa: DkimKey, ed: DkimKey, keys: Keys, dns_file: Path, perl_dkim: PerlDkim
) -> None:
    data = sign(marketing_message(), [rsa, ed])
    assert dkimpy_results(data, keys) == [True, True]
    bad = tamper(data)
    assert bad != data
    assert dkimpy_results(bad, keys) == [False, False]
    verdicts = perl_results(bad, dns_file)
    assert len(verdicts) == 2
    assert_perl(verdicts, "fail", perl_dkim)


# ---------------------------------------------------------------------------
# Key choice and key loading


def test_keys_for_picks_nearest_configured_parent(rsa: DkimKey, ed: DkimKey, keys: Keys) -> None:
    news = load_key(DkimKeyConfig("news.example.com", "n1", keys.rsa))
    signer = Signer([rsa, ed, news])
    assert signer.domains == ["example.com", "news.example.com"]
    assert signer.keys_for("example.com") == [rsa, ed]
    assert signer.keys_for("EXAMPLE.com.") == [rsa, ed]
    assert signer.keys_for("mail.example.com") == [rsa, ed]
    assert signer.keys_for("a.b.example.com") == [rsa, ed]
    assert signer.keys_for("news.example.com") == [news]
    assert signer.keys_for("eu.news.example.com") == [news]
    assert signer.keys_for("example.org") == []
    assert signer.keys_for("notexample.com") == []
    assert signer.keys_for("com") == []


def test_keys_for_parent_only(rsa: DkimKey) -> None:
    signer = Signer([rsa])
    assert signer.keys_for("news.example.com") == [rsa]
    assert signer.keys_for("example.net") == []
    assert Signer([]).keys_for("example.com") == []


def test_from_config_loads_every_key(keys: Keys) -> None:
    signer = Signer.from_config(
        DkimConfig(
            keys=(
                DkimKeyConfig("example.com", "s2026", keys.rsa),
                DkimKeyConfig("example.com", "e2026", keys.ed25519),
            )
        )
    )
    assert [k.algorithm for k in signer.keys_for("example.com")] == [
        "rsa-sha256",
        "ed25519-sha256",
    ]


def test_dns_records(rsa: DkimKey, ed: DkimKey, keys: Keys) -> None:
    assert rsa.dns_record().startswith("v=DKIM1; k=rsa; p=MII")
    assert ed.dns_record().startswith("v=DKIM1; k=ed25519; p=")
    assert len(ed.dns_record().split("p=")[1]) == 44  # 32 bytes, base64
    assert keys.dns[b"s2026._domainkey.example.com."] == rsa.dns_record().encode()


def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _ec_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_only(keys: Keys) -> bytes:
    private = serialization.load_pem_private_key(keys.rsa.read_bytes(), password=None)
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _encrypted(keys: Keys) -> bytes:
    private = serialization.load_pem_private_key(keys.rsa.read_bytes(), password=None)
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(lambda k: b"this is not a key\n", "cannot load", id="text"),
        pytest.param(lambda k: b"", "cannot load", id="empty"),
        pytest.param(_public_only, "cannot load", id="public-key"),
        pytest.param(_encrypted, "cannot load", id="encrypted"),
        pytest.param(lambda k: _ec_key(), "only RSA and Ed25519", id="ecdsa"),
    ],
)
def test_load_key_errors_name_the_config_key(
    keys: Keys, tmp_path: Path, content: Callable[[Keys], bytes], problem: str
) -> None:
    bad = _write_pem(tmp_path / "bad.pem", content(keys))
    config = DkimConfig(
        keys=(
            DkimKeyConfig("example.com", "s2026", keys.rsa),
            DkimKeyConfig("example.com", "bad", bad),
        )
    )
    with pytest.raises(ConfigError) as err:
        Signer.from_config(config)
    assert err.value.key == "dkim[1].private_key_file"
    assert problem in err.value.problem
    assert b"PRIVATE" not in str(err.value).encode()


def test_load_key_missing_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_key(DkimKeyConfig("example.com", "s1", tmp_path / "gone.pem", key="dkim[3]"))
    assert err.value.key == "dkim[3].private_key_file"


def test_load_key_error_names_the_key_of_the_mapping_form(keys: Keys, tmp_path: Path) -> None:
    """With ``dkim: {keys: [...]}`` the operator's key is ``dkim.keys[N]``, not ``dkim[N]``."""
    bad = _write_pem(tmp_path / "bad.pem", b"not a key\n")
    secret = tmp_path / "k1.key"
    secret.write_bytes(b"s" * 40)
    path = write_yaml(
        tmp_path / "relay.yaml",
        {
            "http": {"public_url": "https://u.example.com"},
            "tokens": {"keys": [{"id": "k1", "secret_file": str(secret)}]},
            "dkim": {
                "require_for_marketing": True,
                "keys": [{"domain": "example.com", "selector": "s1", "private_key_file": str(bad)}],
            },
        },
    )
    config = load_config(path)
    with pytest.raises(ConfigError) as err:
        Signer.from_config(config.dkim)
    assert err.value.key == "dkim.keys[0].private_key_file"


# ---------------------------------------------------------------------------
# Canonicalization: our replace-based version against dkimpy's regexes

_octets = st.lists(
    st.sampled_from(
        [b" ", b"\t", b"\r\n", b"\r", b"\n", b"a", b"b.", b"\x0b", b"  \t ", b"\r\n\r\n"]
    ),
    max_size=40,
).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(body=_octets)
def test_relaxed_body_is_dkimpy_s(body: bytes) -> None:
    assert relaxed_body(body) == dkim.canonicalization.Relaxed.canonicalize_body(body)


@settings(max_examples=500, deadline=None)
@given(name=st.sampled_from([b"Subject", b"FROM ", b"X-a\t"]), value=_octets)
def test_relaxed_header_is_dkimpy_s(name: bytes, value: bytes) -> None:
    ((cname, cvalue),) = dkim.canonicalization.Relaxed.canonicalize_headers([(name, value)])
    assert relaxed_header(Header("x", name + b":" + value)) == bytes(cname) + b":" + bytes(cvalue)


@pytest.mark.parametrize("tail", [b"", b"\r\n", b"\r\n" * 5000, b"\n\r\n", b"\r\n\r", b"\r\r\n"])
def test_relaxed_body_end_of_body(tail: bytes) -> None:
    body = b"text  \t here \r\nmore" + tail
    assert relaxed_body(body) == dkim.canonicalization.Relaxed.canonicalize_body(body)
