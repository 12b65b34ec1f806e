"""Log output: ``text`` (``event key=value …``, one line per event) or ``json`` (one object).

Fields arrive as data on the record (``relay.eventlog``), already escaped; the
formatters only render them, they never parse text back into fields. ``json``
gives ``{"time": …, "level": …, "logger": …, "pid": …, "event": "message",
"id": "…", "class": "marketing", "reply": 250, …, "message": "<the text line>"}``:
the envelope keys always win over a field of the same name. Lines from libraries
(no fields) are escaped the same way, so no source can write a second line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from relay.eventlog import escape

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"
QUIET = ("mail.log", "aiosmtpd", "aiohttp.access", "flufl.bounce")
ENVELOPE = ("time", "level", "logger", "pid", "event", "message", "exception")


def _message(record: logging.LogRecord) -> str:
    """The text line; fielded lines are escaped already, escaping is idempotent."""
    return escape(record.getMessage())


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _message(record)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = _message(record)
        event = getattr(record, "relay_event", None)
        fields = getattr(record, "relay_fields", None)
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "event": event if isinstance(event, str) else message.partition(" ")[0],
        }
        if isinstance(fields, dict):
            data.update({k: v for k, v in fields.items() if k not in ENVELOPE})
        data["message"] = message
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup(format: str = "text", level: str = "info") -> None:
    """(Re)configure the root logger; called at start and again once the config is read."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
