"""One structured log line per event, its fields passed as data, never parsed back from text.

``log = EventLog(__name__)`` then ``log.info("message", id=queue_id, msgid=message_id)``.
The record carries the event and its fields (``record.relay_event``,
``record.relay_fields``); ``relay.runtime.logs`` renders them as a ``text`` line
(``message id=… msgid="<a b>"``) or as keys of a ``json`` object. Every value is
escaped here, once: control characters, newlines, DEL, C1 controls (ANSI escape
sequences start with one) and Unicode line separators / bidi overrides become ``\\xNN``
or ``\\uNNNN``, so a client-supplied value (a Message-ID, an AUTH user name, a
User-Agent) can neither start a second line, nor colour a terminal, nor pose as
another field.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import TypeAlias

Value: TypeAlias = str | int | float | bool | None

MAX_VALUE = 1000
"""Characters kept of one value: a log line stays a line, whatever a client sends."""

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_BARE = re.compile(r'[^\s"=\\]+')


def _hex(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every character that could break or forge a log line made visible."""
    if text.isprintable():  # the common case, one C loop: no control, separator or bidi mark
        return text
    return _UNSAFE.sub(_hex, text)


def clean(value: object) -> Value:
    """A field value as logged: numbers and booleans as they are, anything else escaped text."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE] + "..."
    return escape(text)


def _text(value: Value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str):
        return str(value)  # a number: never needs quotes
    text = value
    if _BARE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(event: str, fields: Mapping[str, Value]) -> str:
    """The ``text`` form: the event, then ``key=value`` with values quoted when needed."""
    return " ".join([event, *(f"{key}={_text(value)}" for key, value in fields.items())])


class EventLog:
    """A logger whose lines are an event word and typed fields."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def _emit(
        self, level: int, event: str, fields: Mapping[str, object], exc_info: bool = False
    ) -> None:
        if not self.logger.isEnabledFor(level):
            return
        cleaned = {key: clean(value) for key, value in fields.items()}
        self.logger.log(
            level,
            "%s",
            render(event, cleaned),
            exc_info=exc_info,
            extra={"relay_event": event, "relay_fields": cleaned},
            stacklevel=3,
        )

    def debug(self, event: str, /, **fields: object) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, /, **fields: object) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, /, **fields: object) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, /, **fields: object) -> None:
        self._emit(logging.ERROR, event, fields)

    def exception(self, event: str, /, **fields: object) -> None:
        """``error`` with the traceback of the exception being handled."""
        self._emit(logging.ERROR, event, fields, exc_info=True)
