"""Cost of the mailto unsubscribe codes (relay.mail.mailto, relay.suppression.mailto).

    python bench/mailto_codes.py

Same run, beside the per-copy work they add to: the token and one RSA-2048 signature.
Prints the code's CPU per recipient, the store's round trip for 1, 100 and 1,000
recipients (an embedded Redis on loopback) and Redis memory per record.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from relay.cli.keygen import dkim_keygen
from relay.config import DkimKeyConfig, Secret, TokenKey, TokensConfig
from relay.mail.dkim import Signer, body_hash, load_key
from relay.mail.mailto import MailtoCodec
from relay.mail.message import Message
from relay.mail.tokens import TokenCodec
from relay.store.client import connect
from relay.store.embedded import EmbeddedRedis
from relay.store.keys import Keys
from relay.store.mailto import MailtoRecords
from relay.suppression.mailto import MailtoCodes


def per_call(fn: object, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        fn(i)  # type: ignore[operator]
    return (time.perf_counter() - started) / n


async def main() -> None:
    config = TokensConfig((TokenKey("k1", Secret(os.urandom(32))),))
    codec, tokens = MailtoCodec(config), TokenCodec(config)
    code = per_call(lambda i: codec.issue(f"u{i}@example.net", "news", "group", None, 1.7e9), 20000)
    token = per_call(lambda i: tokens.issue(f"u{i}@example.net", "news"), 20000)
    key_path, _ = dkim_keygen("example.com", "s", "rsa", 2048, Path(tempfile.mkdtemp()))
    key = load_key(DkimKeyConfig("example.com", "s", key_path))
    message = Message.parse(b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n")
    signer, bh = Signer([key]), body_hash(message.body)
    sign = per_call(lambda i: signer.sign(message, [key], bh), 200)
    print(f"per recipient: code {code * 1e6:.1f} us, token {token * 1e6:.1f} us,")
    print(f"               RSA-2048 signature {sign * 1e3:.2f} ms (same run)")
    redis = EmbeddedRedis().start()
    client = connect(redis.url, 5)
    try:
        codes = MailtoCodes(codec, MailtoRecords(client, Keys("ocr")), 60 * 86400)
        for size in (1, 100, 1000):
            rcpts = [f"u{i}@example.net" for i in range(size)]
            times = []
            for _ in range(20):
                started = time.perf_counter()
                await codes.issue(rcpts, "news", "group", None)
                times.append(time.perf_counter() - started)
            best = min(times)
            each = best / size * 1e3
            print(f"store {size:>5} recipients: {best * 1e3:8.2f} ms ({each:.3f} ms each)")
        await client.flushall()
        before = (await client.info("memory"))["used_memory"]
        await codes.issue([f"u{i}@example.net" for i in range(10000)], "news", "group", None)
        after = (await client.info("memory"))["used_memory"]
        print(f"Redis memory per record: {(after - before) / 10000:.0f} bytes")
    finally:
        await client.aclose()
        redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
