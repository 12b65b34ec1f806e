"""SMTP AUTH and TLS on the listener: clients outside allowed_networks only with a password."""

from __future__ import annotations

import datetime
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from conftest import Sink
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import message

from relay.runtime.app import Relay


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("relay.test")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def secured(config_dict: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Loopback is NOT in allowed_networks: only authenticated clients may send."""
    cert, key = self_signed(tmp_path)
    users = tmp_path / "users"
    done = subprocess.run(
        [sys.executable, "-m", "relay", "passwd", str(users), "app1"],
        input="correct horse battery\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert "app1" in done.stdout
    assert (users.stat().st_mode & 0o777) == 0o600
    assert "correct horse" not in users.read_text()
    config_dict["smtp"]["allowed_networks"] = ["192.0.2.0/24"]
    config_dict["smtp"]["tls"] = {"cert_file": str(cert), "key_file": str(key)}
    config_dict["smtp"]["auth"] = {"users_file": str(users)}
    return config_dict


def client(relay: Relay, **kwargs: Any) -> aiosmtplib.SMTP:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=relay.smtp_port,
        timeout=10,
        tls_context=context,
        start_tls=False,
        **kwargs,
    )


async def test_untrusted_client_must_authenticate_over_tls(
    make_relay: Any, secured: dict[str, Any], sink: Sink
) -> None:
    relay = await make_relay(secured)
    smtp = client(relay)
    await smtp.connect()
    assert not smtp.supports_extension("auth")  # not offered before TLS
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await smtp.mail("app@example.com")
    assert (refused.value.code, refused.value.message[:5]) == (530, "5.7.0")
    await smtp.starttls()
    await smtp.ehlo()
    assert smtp.supports_extension("auth")
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as bad:
        await smtp.login("app1", "wrong password")
    assert bad.value.code == 535
    await smtp.login("app1", "correct horse battery")
    errors, _ = await smtp.sendmail("app@example.com", ["alice@example.net"], message())
    assert errors == {}
    await smtp.quit()
    assert len(sink.handler.messages) == 1


async def test_auth_login_mechanism(make_relay: Any, secured: dict[str, Any], sink: Sink) -> None:
    relay = await make_relay(secured)
    smtp = client(relay)
    await smtp.connect()
    await smtp.starttls()
    await smtp.ehlo()
    await smtp.auth_login("app1", "correct horse battery")
    await smtp.sendmail("app@example.com", ["alice@example.net"], message())
    await smtp.quit()
    assert len(sink.handler.messages) == 1


async def test_implicit_tls(make_relay: Any, secured: dict[str, Any], sink: Sink) -> None:
    secured["smtp"]["tls"]["mode"] = "implicit"
    relay = await make_relay(secured)
    smtp = client(relay, use_tls=True)
    await smtp.connect()
    await smtp.login("app1", "correct horse battery")
    await smtp.sendmail("app@example.com", ["alice@example.net"], message())
    await smtp.quit()
    assert len(sink.handler.messages) == 1


async def test_trusted_network_needs_no_auth_and_auth_not_offered_without_users(
    relay: Relay, sink: Sink
) -> None:
    smtp = client(relay)
    await smtp.connect()
    assert not smtp.supports_extension("auth")
    await smtp.sendmail("app@example.com", ["alice@example.net"], message())
    await smtp.quit()
    assert len(sink.handler.messages) == 1


async def test_auth_user_name_cannot_write_a_log_line(
    make_relay: Any, secured: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A newline in the AUTH user name wrote a second, fake line; ANSI escapes passed through."""
    import json
    import logging

    from relay.runtime.logs import JsonFormatter, TextFormatter

    caplog.set_level(logging.INFO, logger="relay")
    relay = await make_relay(secured)
    smtp = client(relay)
    await smtp.connect()
    await smtp.starttls()
    await smtp.ehlo()
    fake = "app1\n2026-01-01 00:00:00,000 INFO relay.smtp.server[1] auth user=root ok=True"
    for user in (fake, "\x1b[1;32mapp1\x1b[0m"):
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await smtp.auth_plain(user, "wrong password")
    await smtp.quit()
    records = [r for r in caplog.records if r.getMessage().startswith("auth ")]
    assert len(records) == 2
    for record in records:
        line = TextFormatter().format(record)
        obj = json.loads(JsonFormatter().format(record))
        assert "\n" not in line and "\x1b" not in line and "\x1b" not in json.dumps(obj)
        assert obj["ok"] is False and "\\x" in obj["user"]
    assert json.loads(JsonFormatter().format(records[0]))["user"].startswith("app1\\x0a2026")
    assert 'user="app1\\\\x0a2026-01-01' in TextFormatter().format(records[0])
    assert 'user="\\\\x1b[1;32mapp1\\\\x1b[0m"' in TextFormatter().format(records[1])
