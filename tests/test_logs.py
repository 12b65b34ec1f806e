"""JSON log lines carry the event's key=value fields as stable keys."""

from __future__ import annotations

import json
import logging

from relay.runtime.logs import JsonFormatter


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(
        "relay.outbound.pipeline", logging.INFO, __file__, 1, message, args, None
    )


def test_message_line_becomes_fields() -> None:
    line = JsonFormatter().format(
        record(
            "message id=%s msgid=%s from=%s class=%s reply=%s enhanced=%s ms=%.1f",
            "ABC123",
            "<x@y>",
            "news@example.com",
            "marketing",
            250,
            "2.0.0",
            3.25,
        )
    )
    data = json.loads(line)
    assert data["event"] == "message"
    assert data["level"] == "info"
    assert data["logger"] == "relay.outbound.pipeline"
    assert (data["id"], data["class"], data["reply"], data["enhanced"]) == (
        "ABC123",
        "marketing",
        "250",
        "2.0.0",
    )
    assert data["ms"] == "3.2"
    assert "time" in data and "pid" in data


def test_quoted_values_and_plain_messages() -> None:
    data = json.loads(
        JsonFormatter().format(record("unsubscribe rcpt=%s ua=%r", "a@b.c", "Mail x"))
    )
    assert (data["event"], data["rcpt"], data["ua"]) == ("unsubscribe", "a@b.c", "Mail x")
    data = json.loads(JsonFormatter().format(record("relay stopped")))
    assert data["event"] == "relay"
    assert data["message"] == "relay stopped"


def test_fields_cannot_overwrite_the_envelope() -> None:
    data = json.loads(JsonFormatter().format(record("message level=%s time=%s", "x", "y")))
    assert data["level"] == "info"
    assert data["time"] != "y"
