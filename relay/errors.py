"""Errors that cross module boundaries: the one tree every layer above the libraries sees.

::

    RelayError                    base of every error the relay raises on purpose
    ├── ConfigError               a YAML key is missing or wrong; names the dotted key (exit 2)
    ├── StoreUnavailable          Redis could not answer: every redis-py / Cluster error,
    │                             mapped once in relay.store.client.unavailable
    ├── EmbeddedRedisError        (relay.store.embedded) no server binary, or it did not start
    ├── ProtectedEntry            (relay.suppression.store) a complaint removed without force
    ├── TokenError                (relay.mail.tokens) an unsubscribe token that cannot be
    │   │                         honoured; ``status`` is the HTTP status to answer
    │   ├── MalformedToken        400
    │   ├── UnknownKey            404: signed by a key no longer configured
    │   └── ExpiredToken          400
    ├── ForgedCode                (relay.mail.verp) a return-path code no key signed
    └── SmtpError                 carries the reply the SMTP client will see
        ├── TempFail              4xx: the client keeps the message and retries
        └── PermFail              5xx: the client gets the reason and gives up
            └── MessageError      (relay.mail.message) 550 5.6.0, the message is malformed

Third-party exceptions are translated where they enter, once: ``relay.store.client``
for redis-py (``unavailable``), ``relay.outbound.upstream`` for aiosmtplib (into an
``SmtpReply`` per recipient), ``relay.config.loader`` for PyYAML and the files it reads.
The front ends (smtp, http, inbound) catch only this tree: ``StoreUnavailable`` is
``451 4.3.0`` over SMTP and ``503`` over HTTP, never a traceback
(``tests/e2e/test_store_errors_e2e.py``). One exception stays outside on purpose:
``relay.outbound.upstream._Dropped``, control flow private to that module (always
caught there). ``SmtpReply`` is the value the SMTP front end writes to the socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SmtpReply:
    code: int
    enhanced: str
    text: str
    stage: str = field(default="", compare=False)
    """For an upstream reply, the command it answered (``rcpt``), when that matters."""

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class StoreUnavailable(RelayError):
    """Redis did not answer in time or refused the connection."""


class SmtpError(RelayError):
    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.reply = SmtpReply(code, enhanced, sanitize_reply_text(text))


class TempFail(SmtpError):
    def __init__(self, enhanced: str, text: str, code: int = 451) -> None:
        super().__init__(code, enhanced, text)


class PermFail(SmtpError):
    def __init__(self, enhanced: str, text: str, code: int = 550) -> None:
        super().__init__(code, enhanced, text)


def sanitize_reply_text(text: str) -> str:
    """Make text safe for one SMTP reply line: printable ASCII, no CR/LF, bounded."""
    cleaned = "".join(ch if " " <= ch <= "~" else " " for ch in text)
    return " ".join(cleaned.split())[:400]
