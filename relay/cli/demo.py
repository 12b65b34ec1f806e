"""``oneclick-relay demo``: the whole product on one machine, with nothing to set up.

It starts an embedded Redis, a capture upstream that writes ``.eml`` files, and the
relay with a generated config (fresh DKIM and token keys); sends a marketing and a
transactional message through it; shows what the upstream received and that the
DKIM signatures verify with both List-* headers in ``h=``; presses the one-click
button over HTTP; and shows the next marketing message skipping that recipient
while transactional mail still reaches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import tempfile
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import aiosmtplib
import dkim
import yaml

from relay.cli.keygen import dkim_keygen, token_keygen
from relay.cli.sink import Captured, CaptureHandler, start_sink
from relay.config import load_config
from relay.runtime.app import Relay
from relay.store.embedded import free_port

NEWS = "news@example.com"
RECEIPTS = "receipts@example.com"
ALICE = "alice@example.net"
BOB = "bob@example.org"


def write_demo_config(folder: Path, upstream_port: int) -> Path:
    """A complete config for the demo (and a starting point to copy)."""
    keys = folder / "keys"
    dkim_rsa, _ = dkim_keygen("example.com", "demo-rsa", "rsa", 2048, keys)
    dkim_ed, _ = dkim_keygen("example.com", "demo-ed", "ed25519", 0, keys)
    token_keygen(keys / "token-k1.key")
    http_port = free_port()
    config = {
        "smtp": {
            "listen": f"127.0.0.1:{free_port()}",
            "allowed_networks": ["127.0.0.0/8", "::1/128"],
            "hostname": "relay.demo.local",
        },
        "upstream": {"host": "127.0.0.1", "port": upstream_port, "timeout": 10},
        "http": {
            "listen": f"127.0.0.1:{http_port}",
            "public_url": f"http://127.0.0.1:{http_port}",
        },
        "tokens": {"keys": [{"id": "k1", "secret_file": "keys/token-k1.key"}]},
        "dkim": [
            {"domain": "example.com", "selector": "demo-rsa", "private_key_file": str(dkim_rsa)},
            {"domain": "example.com", "selector": "demo-ed", "private_key_file": str(dkim_ed)},
        ],
        "policy": {
            "default_class": "transactional",
            "groups": {
                "newsletter": {
                    "display_name": "the Example newsletter",
                    "list_id": "Example newsletter <newsletter.example.com>",
                }
            },
            "senders": [
                {"match": NEWS, "class": "marketing", "group": "newsletter"},
                {"match": "*@promo.example.com", "class": "marketing", "group": "promotions"},
                {"match": RECEIPTS, "class": "transactional"},
            ],
        },
        "state_dir": "state",
    }
    path = folder / "oneclick-relay.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _sample(sender: str, to: list[str], subject: str, text: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Example <{sender}>"
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg.set_content(text)
    return msg


def _header(data: bytes, name: str) -> str:
    m = re.search(rb"(?im)^" + name.encode() + rb":(.*(?:\r\n[ \t].*)*)", data)
    return " ".join(m.group(1).decode().split()) if m else "-"


def _show(captured: Captured, dns: dict[bytes, bytes]) -> None:
    data = captured.data
    print(f"    envelope  MAIL FROM:<{captured.mail_from}> RCPT TO:{list(captured.rcpt_tos)}")
    for name in ("From", "Subject", "List-Unsubscribe", "List-Unsubscribe-Post", "List-Id"):
        value = _header(data, name)
        if value != "-":
            print(f"    {name + ':':<22} {value}")
    count = len(re.findall(rb"(?im)^DKIM-Signature:", data))
    for index in range(count):
        sig = dkim.DKIM(data)
        ok = sig.verify(idx=index, dnsfunc=lambda name, timeout=5: dns.get(name))
        fields = sig.signature_fields
        h = fields.get(b"h", b"").decode()
        print(
            f"    DKIM-Signature #{index + 1}: a={fields.get(b'a', b'').decode()}"
            f" s={fields.get(b's', b'').decode()} -> {'pass' if ok else 'FAIL'}"
        )
        print(f"      h={h}")


async def run_demo(out: Path | None = None, keep_running: bool = False) -> int:
    """Run the demo; SIGTERM or Ctrl-C stops it with everything it started (exit 0)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        signalled.append(signum)
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await _run_demo(out, keep_running)
    except asyncio.CancelledError:
        if not signalled:
            raise
        task.uncancel()
        print("demo stopped", file=sys.stderr)
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _run_demo(out: Path | None, keep_running: bool) -> int:
    async with contextlib.AsyncExitStack() as stack:
        if out is None:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="oneclick-demo-")))
        out.mkdir(parents=True, exist_ok=True)
        handler = CaptureHandler(folder=out / "captured")
        sink = await start_sink(handler)
        stack.callback(sink.close)
        sink_port = sink.sockets[0].getsockname()[1]
        config = load_config(write_demo_config(out, sink_port))
        relay = await stack.enter_async_context(Relay(config))
        return await _demo(relay, handler, out, sink_port, keep_running)
    raise AssertionError("unreachable")


async def _demo(
    relay: Relay, handler: CaptureHandler, out: Path, sink_port: int, keep_running: bool
) -> int:
    dns = {
        f"{k.selector}._domainkey.{k.domain}.".encode(): k.dns_record().encode()
        for k in relay.signer.keys_for("example.com")
    }

    async def send(msg: EmailMessage, recipients: list[str]) -> str:
        _, text = await aiosmtplib.send(
            msg, recipients=recipients, hostname="127.0.0.1", port=relay.smtp_port, timeout=30
        )
        return text

    print("oneclick-relay demo")
    print(f"  relay SMTP 127.0.0.1:{relay.smtp_port}, HTTP 127.0.0.1:{relay.http_port}")
    print(f"  capture upstream 127.0.0.1:{sink_port}, messages in {out / 'captured'}")
    print(f"  embedded Redis {relay.redis_url}")
    print()

    print("1. A newsletter from news@example.com to Alice and Bob (marketing):")
    news = _sample(NEWS, [ALICE, BOB], "November news", "Hello from Example.\n")
    reply = await send(news, [ALICE, BOB])
    print(f"   relay answered: {reply}")
    first = handler.messages[-2:]
    for captured in first:
        _show(captured, dns)
    print("   -> one copy per recipient, each with its own unsubscribe URL, signed after.")
    print()

    print("2. A receipt from receipts@example.com to Alice (transactional):")
    receipt = _sample(RECEIPTS, [ALICE], "Your receipt #1001", "Thank you.\n")
    reply = await send(receipt, [ALICE])
    print(f"   relay answered: {reply}")
    _show(handler.messages[-1], dns)
    print("   -> no List-Unsubscribe on transactional mail.")
    print()

    alice_copy = next(c for c in first if c.rcpt_tos == (ALICE,))
    url = _header(alice_copy.data, "List-Unsubscribe").strip("<>").split(">")[0]
    print("3. Alice presses Unsubscribe in her mail client (RFC 8058 one-click POST):")
    print(f"   POST {url}")
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            print(f"   (a GET only shows a page: {resp.status}, nothing changes)")
        async with http.post(
            url,
            data="List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as resp:
            print(f"   -> {resp.status} {(await resp.text()).strip()}")
    print()

    print("4. The next newsletter to Alice and Bob, and another receipt to Alice:")
    before = len(handler.messages)
    news2 = _sample(NEWS, [ALICE, BOB], "December news", "More news.\n")
    reply = await send(news2, [ALICE, BOB])
    print(f"   newsletter: relay answered: {reply}")
    receipt2 = _sample(RECEIPTS, [ALICE], "Your receipt #1002", "Thank you again.\n")
    reply = await send(receipt2, [ALICE])
    print(f"   receipt:    relay answered: {reply}")
    for captured in handler.messages[before:]:
        subject = _header(captured.data, "Subject")
        print(f"   upstream got: {subject!r} for {list(captured.rcpt_tos)}")
    newsletter_to_alice = any(
        c.rcpt_tos == (ALICE,) and b"December news" in c.data for c in handler.messages
    )
    receipt_to_alice = any(b"#1002" in c.data for c in handler.messages)
    print()
    ok = not newsletter_to_alice and receipt_to_alice
    print(
        "Result: "
        + (
            "Alice no longer gets the newsletter; Bob does; Alice still gets receipts."
            if ok
            else "UNEXPECTED: the unsubscribe did not take effect as it should."
        )
    )
    if keep_running:
        print()
        print("Still running (Ctrl-C to stop). Try:")
        print(f"  swaks --server 127.0.0.1:{relay.smtp_port} --from {NEWS} --to you@example.net")
        bob_copy = next(c for c in handler.messages if c.rcpt_tos == (BOB,))
        bob_url = _header(bob_copy.data, "List-Unsubscribe").strip("<>").split(">")[0]
        print(f"  open Bob's unsubscribe link in a browser and press the button:\n    {bob_url}")
        print(f"  then send another newsletter to {BOB}: the relay skips him")
        print(f"  captured mail: {out / 'captured'}   config: {out / 'oneclick-relay.yaml'}")
        sys.stdout.flush()
        await asyncio.Event().wait()
    return 0 if ok else 1
