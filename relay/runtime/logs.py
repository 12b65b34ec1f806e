"""Log output: ``text`` (one key=value line per event) or ``json`` (one object per line).

Every relay log line is an event word followed by ``key=value`` fields, so the
JSON formatter can lift the fields into the object with stable keys for log
pipelines: ``{"time": …, "level": …, "logger": …, "pid": …, "event": "message",
"id": "…", "class": "marketing", …}``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

_FIELD = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S*)""")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"
QUIET = ("mail.log", "aiosmtpd", "aiohttp.access", "flufl.bounce")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event, _, rest = message.partition(" ")
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "event": event if "=" not in event else "",
        }
        fields = {
            k: v.strip("'\"") for k, v in _FIELD.findall(rest if "=" not in event else message)
        }
        data.update({k: v for k, v in fields.items() if k not in data})
        data["message"] = message
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup(format: str = "text", level: str = "info") -> None:
    """(Re)configure the root logger; called at start and again once the config is read."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
