"""A capture upstream: an SMTP server that accepts everything and keeps each message.

The demo writes what it receives as ``.eml`` files; the tests read ``messages``.
It runs in the caller's event loop with aiosmtpd's ``SMTP`` protocol (not the
threaded ``Controller``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True, slots=True)
class Captured:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    path: Path | None = None


@dataclass
class CaptureHandler:
    folder: Path | None = None
    messages: list[Captured] = field(default_factory=list)
    reply: str = "250 2.0.0 Ok: queued"
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    """Per-recipient reply overrides, e.g. {"bad@x.com": "550 5.1.1 no such user"}."""
    delay: float = 0.0
    received: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        override = self.rcpt_replies.get(address)
        if override and not override.startswith("2"):
            return override
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        if not self.reply.startswith("2"):
            return self.reply
        data = envelope.original_content or b""
        path = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{len(self.messages) + 1:04d}.eml"
            path.write_bytes(data)
        self.messages.append(
            Captured(envelope.mail_from or "", tuple(envelope.rcpt_tos), data, path)
        )
        self.received.set()
        return self.reply


async def start_sink(
    handler: CaptureHandler, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SMTP(handler, enable_SMTPUTF8=True, hostname="capture.local", **kwargs),
        host,
        port,
    )
