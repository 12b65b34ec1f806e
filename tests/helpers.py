"""Helpers for the tests (importable as ``helpers``; see ``pythonpath`` in pyproject)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import http.client
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml

from relay.config import Config, parse_config

DATA = Path(__file__).parent / "data"

# When a hypothesis test fails, its pytest plugin imports hypothesis.extra._patching
# (libcst -> mypy_extensions, which warns DeprecationWarning at import). Under
# ``filterwarnings = error`` that turns the test failure into a pytest INTERNALERROR
# that hides the falsifying example, so import it once here with that warning ignored.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401


def build_config(raw: dict[str, Any]) -> Config:
    return parse_config(copy.deepcopy(raw))


async def smtp_send(
    port: int, mail_from: str, rcpts: list[str], data: bytes, host: str = "127.0.0.1"
) -> tuple[int, str]:
    """Send one message; returns the reply to DATA (or to the first refused command)."""
    client = aiosmtplib.SMTP(hostname=host, port=port, timeout=15)
    await client.connect()
    try:
        try:
            await client.mail(mail_from)
            for rcpt in rcpts:
                await client.rcpt(rcpt)
            response = await client.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        return response.code, response.message
    finally:
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()


def message(
    sender: str = "news@example.com",
    to: str = "alice@example.net",
    subject: str = "Hello",
    body: str = "Hello there.\r\n",
    extra: str = "",
) -> bytes:
    return (
        f"From: Example <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{os.urandom(6).hex()}@example.com>\r\n{extra}"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


_ONE_CLICK_URI = re.compile(r"<https?://[^<>\s]*/u/([A-Za-z0-9._~-]+)>")


def unsubscribe_token(data: bytes) -> str:
    """The token of the https URI in the message's one List-Unsubscribe header.

    Read from that header only (unfolded): a search over the whole message could
    match "/u/" inside a DKIM ``b=`` value and run on to the next ">".
    """
    head = data.split(b"\r\n\r\n", 1)[0].decode("ascii", errors="replace")
    unfolded = re.sub(r"\r\n[ \t]+", " ", head).split("\r\n")
    values = [
        line.split(":", 1)[1] for line in unfolded if line.lower().startswith("list-unsubscribe:")
    ]
    assert len(values) == 1, f"expected one List-Unsubscribe header: {head[:400]}"
    m = _ONE_CLICK_URI.search(values[0])
    assert m, values[0]
    return m.group(1)


def write_yaml(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


NOW = 1_750_000_000.0


class Clock:
    """An injectable clock: tests move ``now`` instead of sleeping."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _proc_stat(pid: str) -> tuple[int, int] | None:
    """(ppid, process group) of a live process from /proc, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the name in parentheses may hold spaces
    if fields[0] == "Z":  # a zombie has exited; only its parent has not reaped it yet
        return None
    return int(fields[1]), int(fields[2])


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(entry.name)
            if stat is not None and stat[0] == pid:
                found.append(int(entry.name))
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (a child started with start_new_session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(entry.name)
            if stat is not None and stat[1] == pgid:
                found.append(int(entry.name))
    return found


class HealthPoller:
    """Polls ``/healthz`` from its own thread and keeps every answer's latency."""

    def __init__(self, port: int, interval: float = 0.02) -> None:
        self._port = port
        self._interval = interval
        self._stop = threading.Event()
        self.latencies: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=120)
            try:
                connection.request("GET", "/healthz")
                connection.getresponse().read()
            finally:
                connection.close()
            self.latencies.append(time.perf_counter() - started)
            self._stop.wait(self._interval)

    async def __aenter__(self) -> HealthPoller:
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Joined from another thread: the loop must keep serving the last poll."""
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 180)

    @property
    def worst(self) -> float:
        return max(self.latencies)


PERL_VERIFIER = Path(__file__).parent / "tools" / "dkim_verify.pl"


def perl_dkim_results(data: bytes, dns_file: Path) -> list[tuple[str, list[str]]]:
    """The independent Mail::DKIM verifier's (result, h= names) for each signature."""
    import subprocess

    done = subprocess.run(
        ["perl", str(PERL_VERIFIER), str(dns_file)],
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    results = []
    for line in done.stdout.decode().splitlines():
        status, _d, _s, _a, h, _detail = line.split("\t")
        results.append((status, h.removeprefix("h=").lower().split(":")))
    return results


async def start_serve(
    path: Path, log: Path, smtp_port: int, tries: int = 150
) -> subprocess.Popen[str]:
    """``oneclick-relay serve -c path`` as a child, output in ``log``; returns once its SMTP
    port answers (fails the test, with the log, if it exits or does not listen within
    ``tries`` tenths of a second)."""
    with log.open("w") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a long-running child, not awaited here
            [sys.executable, "-m", "relay", "serve", "-c", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for _ in range(tries):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", smtp_port)
            writer.close()
            await writer.wait_closed()
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
    proc.kill()
    raise AssertionError(f"relay did not start:\n{log.read_text()}")  # noqa: ASYNC240


def self_signed_certificate(
    folder: Path, name: str, san: list[Any], *, ca: bool = False, prefix: str = ""
) -> tuple[Path, Path]:
    """A P-256 certificate for ``san`` (x509 general names), signed by its own key, and that
    key, written as PEM files in ``folder``; ``ca`` marks it a CA (a client's trust root)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = folder / f"{prefix}cert.pem", folder / f"{prefix}key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
