"""Memory of a deferred fan-out: relay RSS and Redis bytes for one large marketing message.

::

    python bench/fanout_memory.py --size-mb 24 --rcpts 100          # half of them deferred
    python bench/fanout_memory.py --size-mb 25 --rcpts 1000
    python bench/fanout_memory.py --relay-dir /path/to/other/checkout   # A/B another version

One run: a fresh Redis (``EmbeddedRedis``), an upstream that defers every other
recipient at RCPT (451) and throws accepted mail away, and ``python -m relay serve``
from ``--relay-dir`` as a subprocess (marketing sender, RSA-2048 DKIM, retries far in
the future so the queue stays as the message left it). One message of ``--size-mb``
with ``--rcpts`` recipients is sent; printed are the relay's peak RSS (``VmHWM``), its
RSS after the reply, Redis ``used_memory`` before and after, and the reply.
Body lines are 990 octets, so the upstream (aiosmtpd, line by line) keeps up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import redis
import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from relay.cli.keygen import dkim_keygen, token_keygen  # noqa: E402
from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402


class HalfDeferring:
    """Defers recipients whose number is odd; discards what it accepts."""

    def __init__(self) -> None:
        self.accepted = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        number = int(address.split("@")[0].removeprefix("user"))
        if number % 2:
            return "451 4.2.0 try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.accepted += len(envelope.rcpt_tos)
        envelope.original_content = envelope.content = None
        return "250 2.0.0 Ok"


def vm(pid: int, field: str) -> int:
    """A /proc/PID/status field in bytes (VmHWM: peak RSS, VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def body_of(size: int) -> bytes:
    line = b"x" * 988 + b"\r\n"
    return line * (size // len(line))


async def run(size_mb: float, rcpts: int, relay_dir: Path) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="fanout-"))
    keys = folder / "keys"
    rsa, _ = dkim_keygen("example.com", "s1", "rsa", 2048, keys)
    token_keygen(keys / "k1.key")
    server = EmbeddedRedis().start()
    handler = HalfDeferring()
    sink = await asyncio.get_running_loop().create_server(
        lambda: SMTP(handler, data_size_limit=None, hostname="sink.bench", timeout=600),
        "127.0.0.1",
        0,
    )
    sink_port = sink.sockets[0].getsockname()[1]
    smtp_port = free_port()
    config = {
        "smtp": {
            "listen": f"127.0.0.1:{smtp_port}",
            "hostname": "relay.bench",
            "max_message_size": 64 * 1024 * 1024,
            "max_recipients": max(rcpts, 50),
            "timeout": 1200,
            "workers": 1,
        },
        "upstream": {"host": "127.0.0.1", "port": sink_port, "timeout": 600},
        "http": {"listen": f"127.0.0.1:{free_port()}", "public_url": "https://u.example.com"},
        "redis": {"url": server.url, "timeout": 30},
        "tokens": {"keys": [{"id": "k1", "secret_file": str(keys / "k1.key")}]},
        "dkim": [{"domain": "example.com", "selector": "s1", "private_key_file": str(rsa)}],
        "policy": {
            "default_class": "transactional",
            "senders": [{"match": "news@example.com", "class": "marketing", "group": "news"}],
        },
        "retry": {"first_delay": 3600, "poll_interval": 3600},
    }
    path = folder / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (folder / "relay.log").open("w")
    proc = subprocess.Popen(  # noqa: ASYNC220 - the relay under test, a long-running child
        [sys.executable, "-m", "relay", "serve", "-c", str(path)],
        cwd=relay_dir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    r = redis.Redis.from_url(server.url)
    try:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", smtp_port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        before_rss = vm(proc.pid, "VmRSS")
        redis_before = int(r.info("memory")["used_memory"])
        body = body_of(int(size_mb * 1024 * 1024))
        data = (
            b"From: News <news@example.com>\r\nTo: list@example.net\r\nSubject: big\r\n"
            b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <big@example.com>\r\n\r\n" + body
        )
        started = time.monotonic()
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port, timeout=1200)
        await client.connect()
        await client.mail("news@example.com")
        for i in range(rcpts):
            await client.rcpt(f"user{i}@example.net")
        try:
            response = await client.data(data)
            reply = f"{response.code} {response.message}"
        except aiosmtplib.SMTPResponseException as exc:
            reply = f"{exc.code} {exc.message}"
        seconds = time.monotonic() - started
        await client.quit()
        result = {
            "relay_dir": str(relay_dir),
            "message_mb": round(len(data) / 1e6, 1),
            "recipients": rcpts,
            "deferred": rcpts // 2,
            "reply": reply,
            "seconds": round(seconds, 1),
            "relay_rss_start_mb": round(before_rss / 1e6, 1),
            "relay_rss_peak_mb": round(vm(proc.pid, "VmHWM") / 1e6, 1),
            "relay_rss_after_mb": round(vm(proc.pid, "VmRSS") / 1e6, 1),
            "redis_added_mb": round((int(r.info("memory")["used_memory"]) - redis_before) / 1e6, 1),
            "retry_items": sum(1 for _ in r.scan_iter(match="ocr:{queue}:item:*")),
            "upstream_accepted": handler.accepted,
        }
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        r.close()
        sink.close()
        server.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=24)
    parser.add_argument("--rcpts", type=int, default=100)
    parser.add_argument("--relay-dir", type=Path, default=REPO)
    args = parser.parse_args()
    result = asyncio.run(run(args.size_mb, args.rcpts, args.relay_dir.resolve()))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
