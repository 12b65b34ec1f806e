"""SMTP AUTH and TLS on the listener: clients outside allowed_networks only with a password."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from conftest import Sink
from cryptography import x509
from helpers import HealthPoller, message, self_signed_certificate

from relay.runtime.app import Relay

STALL = 0.25
"""The longest /healthz answer accepted while an attack runs (seconds)."""


def self_signed(folder: Path) -> tuple[Path, Path]:
    return self_signed_certificate(folder, "relay.test", [x509.DNSName("relay.test")])


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


def insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def client(relay: Relay, **kwargs: Any) -> aiosmtplib.SMTP:
    context = insecure_context()
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


# ---------------------------------------------------------------------------
# AUTH under attack: checked off the loop, slowed down, cut off


async def tls_session(relay: Relay, context: ssl.SSLContext) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.smtp_port, timeout=30, tls_context=context, start_tls=False
    )
    await smtp.connect()
    await smtp.starttls()
    await smtp.ehlo()
    return smtp


async def guess(smtp: aiosmtplib.SMTP, attempts: int) -> list[int]:
    """Wrong passwords on one connection; the reply code of each attempt."""
    codes = []
    try:
        for _ in range(attempts):
            try:
                await smtp.auth_plain("app1", "wrong password")
            except aiosmtplib.SMTPAuthenticationError as exc:
                codes.append(exc.code)
            except aiosmtplib.SMTPServerDisconnected:
                codes.append(0)
                break
            if codes[-1] == 421:
                break
    finally:
        smtp.close()
    return codes


async def bad_logins(relay: Relay, attempts: int, context: ssl.SSLContext) -> list[int]:
    return await guess(await tls_session(relay, context), attempts)


async def test_parallel_bad_passwords_do_not_stall_the_loop(
    make_relay: Any, secured: dict[str, Any]
) -> None:
    """16 connections guessing: /healthz took 2-3 s when scrypt ran on the loop."""
    secured["smtp"]["auth_failure_delay"] = 0.2
    secured["smtp"]["auth_max_failures_per_client"] = 1000
    relay = await make_relay(secured)
    context = insecure_context()  # built once: loading the CA store takes ~0.3 s

    connected = threading.Event()
    go = threading.Event()

    async def attack() -> list[list[int]]:
        sessions = await asyncio.gather(*(tls_session(relay, context) for _ in range(16)))
        connected.set()  # TLS handshakes done: what is measured is the AUTH traffic
        await asyncio.to_thread(go.wait, 60)
        return await asyncio.gather(*(guess(smtp, 10) for smtp in sessions))

    # the clients run on their own loop in another thread: only the relay's loop is measured
    attacker = asyncio.ensure_future(asyncio.to_thread(asyncio.run, attack()))
    assert await asyncio.to_thread(connected.wait, 60)
    async with HealthPoller(relay.http_port) as poller:
        await asyncio.sleep(0.2)
        go.set()
        results = await attacker
        await asyncio.sleep(0.2)
    assert results == [[535, 535, 421]] * 16  # cut off at the third failure
    assert len(poller.latencies) >= 5
    assert poller.worst < STALL, f"/healthz took {poller.worst:.3f} s during AUTH attempts"
    text = relay.metrics.render().decode()
    assert 'oneclick_auth_failures_total{outcome="failed"} 48.0' in text
    assert 'oneclick_auth_failures_total{outcome="disconnected"} 16.0' in text


async def test_an_address_with_many_failures_is_refused(
    make_relay: Any, secured: dict[str, Any], sink: Sink
) -> None:
    secured["smtp"]["auth_failure_delay"] = 0.05
    secured["smtp"]["auth_max_failures_per_client"] = 4
    relay = await make_relay(secured)
    context = insecure_context()
    assert await bad_logins(relay, 10, context) == [535, 535, 421]
    assert await bad_logins(relay, 10, context) == [535, 421]  # 4 in ten minutes: refused
    smtp = client(relay)
    await smtp.connect()
    await smtp.starttls()
    await smtp.ehlo()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
        await smtp.auth_plain("app1", "correct horse battery")  # even the right one
    assert (refused.value.code, refused.value.message[:5]) == (421, "4.7.0")
    smtp.close()
    assert 'oneclick_auth_failures_total{outcome="refused"} 2.0' in relay.metrics.render().decode()
