"""Log lines: fields passed as data, rendered as text or JSON, client text escaped in both."""

from __future__ import annotations

import json
import logging

import pytest

from relay.eventlog import EventLog, clean, escape, render
from relay.runtime.logs import JsonFormatter, TextFormatter

FORGED_MSGID = "<z@z> id=0000 outcome=processed"


def emitted(caplog: pytest.LogCaptureFixture, event: str, **fields: object) -> logging.LogRecord:
    caplog.set_level(logging.INFO, logger="relay.test")
    EventLog("relay.test").info(event, **fields)
    return caplog.records[-1]


def test_fields_are_data_in_both_formats(caplog: pytest.LogCaptureFixture) -> None:
    record = emitted(
        caplog,
        "message",
        id="ABC123",
        msgid="<x@y>",
        **{"from": "news@example.com", "class": "marketing"},
        reply=250,
        enhanced="2.0.0",
        ms=3.25,
        dkim=True,
        group=None,
    )
    data = json.loads(JsonFormatter().format(record))
    assert (data["event"], data["level"], data["logger"]) == ("message", "info", "relay.test")
    assert (data["id"], data["msgid"], data["from"], data["class"]) == (
        "ABC123",
        "<x@y>",
        "news@example.com",
        "marketing",
    )
    assert (data["reply"], data["ms"], data["dkim"], data["group"]) == (250, 3.25, True, None)
    assert "time" in data and "pid" in data
    text = TextFormatter().format(record)
    assert text.endswith(
        " INFO relay.test["
        f"{record.process}] message id=ABC123 msgid=<x@y> from=news@example.com class=marketing"
        " reply=250 enhanced=2.0.0 ms=3.25 dkim=true group=-"
    )


def test_forged_fields_in_a_value_stay_inside_it(caplog: pytest.LogCaptureFixture) -> None:
    record = emitted(caplog, "inbound", id="real-id", outcome="ignored", msgid=FORGED_MSGID)
    data = json.loads(JsonFormatter().format(record))
    assert (data["id"], data["outcome"], data["msgid"]) == ("real-id", "ignored", FORGED_MSGID)
    line = TextFormatter().format(record)
    assert line.endswith(
        'inbound id=real-id outcome=ignored msgid="<z@z> id=0000 outcome=processed"'
    )


def test_fields_cannot_overwrite_the_envelope(caplog: pytest.LogCaptureFixture) -> None:
    record = emitted(caplog, "message", level="x", time="y", message="z")
    data = json.loads(JsonFormatter().format(record))
    assert (data["level"], data["message"]) == ("info", "message level=x time=y message=z")
    assert data["time"] != "y"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("bob\n2026-01-01 INFO relay fake=1", "bob\\x0a2026-01-01 INFO relay fake=1"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("\x9b31m", "\\x9b31m"),  # the one-byte C1 form of the escape sequence start
        ("line\u2028sep", "line\\u2028sep"),
        ("evil\u202egnp.exe", "evil\\u202egnp.exe"),
        ("tab\there\x00", "tab\\x09here\\x00"),
        ("plain ünïcode", "plain ünïcode"),
    ],
)
def test_control_characters_are_escaped(
    caplog: pytest.LogCaptureFixture, value: str, shown: str
) -> None:
    assert escape(value) == shown
    record = emitted(caplog, "auth", user=value)
    text = TextFormatter().format(record)
    data = json.loads(JsonFormatter().format(record))
    assert data["user"] == shown
    for line in (text, json.dumps(data), data["message"]):
        assert "\n" not in line and "\r" not in line and "\x1b" not in line
        assert "\x9b" not in line and "\u2028" not in line


def test_library_lines_without_fields_are_escaped_too() -> None:
    record = logging.LogRecord("aiohttp", logging.WARNING, __file__, 1, "bad %s", ("a\nb",), None)
    assert TextFormatter().format(record).endswith(f"aiohttp[{record.process}] bad a\\x0ab")
    data = json.loads(JsonFormatter().format(record))
    assert (data["event"], data["message"]) == ("bad", "bad a\\x0ab")


def test_values_are_bounded_and_quoted() -> None:
    assert clean("x" * 5000) == "x" * 1000 + "..."
    assert render("e", {"a": 'say "hi"', "b": "", "c": "back\\slash", "d": 1.5}) == (
        'e a="say \\"hi\\"" b="" c="back\\\\slash" d=1.5'
    )


def test_exception_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.test")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        EventLog("relay.test").exception("session error", error="RuntimeError")
    data = json.loads(JsonFormatter().format(caplog.records[-1]))
    assert data["error"] == "RuntimeError"
    assert "RuntimeError: boom" in data["exception"]
