"""relay.milter driven by ``miltertest`` (Debian's, from OpenDKIM): a second, independent MTA side.

The Lua script negotiates with miltertest's own defaults, sends one marketing message
to three recipients (one suppressed) and checks the end-of-message actions the way
OpenDKIM's own test suite checks its filter.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Sink

from relay.runtime.app import Relay
from relay.suppression.store import group_scope

SCRIPT = """
conn = mt.connect("inet:{port}@127.0.0.1")
if conn == nil then error("cannot connect") end
if mt.conninfo(conn, "client.example", "192.0.2.7") ~= nil then error("conninfo") end
if mt.helo(conn, "client.example") ~= nil then error("helo") end
if mt.mailfrom(conn, "<news@example.com>") ~= nil then error("mailfrom") end
for _, rcpt in ipairs({{"<alice@example.net>", "<bob@example.org>", "<carol@example.org>"}}) do
  if mt.rcptto(conn, rcpt) ~= nil then error("rcptto") end
end
mt.header(conn, "From", "Example <news@example.com>")
mt.header(conn, "To", "alice@example.net")
mt.header(conn, "Subject", "Hello")
mt.header(conn, "Date", "Tue, 01 Dec 2026 10:00:00 +0000")
mt.header(conn, "Message-ID", "<mt1@example.com>")
mt.eoh(conn)
mt.bodystring(conn, "Hello there.\\r\\n")
if mt.eom(conn) ~= nil then error("eom") end
if mt.getreply(conn) ~= SMFIR_ACCEPT then error("not accepted") end
if not mt.eom_check(conn, MT_HDRINSERT, "DKIM-Signature") then error("no signature") end
if not mt.eom_check(conn, MT_HDRINSERT, "List-Unsubscribe") then error("no List-Unsubscribe") end
if not mt.eom_check(conn, MT_HDRINSERT, "List-Unsubscribe-Post") then error("no -Post") end
if not mt.eom_check(conn, MT_RCPTDELETE, "<bob@example.org>") then error("bob kept") end
if not mt.eom_check(conn, MT_RCPTDELETE, "<carol@example.org>") then error("carol kept") end
if mt.eom_check(conn, MT_RCPTDELETE, "<alice@example.net>") then error("alice deleted") end
sig = mt.getheader(conn, "DKIM-Signature", 0)
if sig == nil or string.find(sig, "list-unsubscribe-post", 1, true) == nil then
  error("h= without list-unsubscribe-post")
end
mt.disconnect(conn)
mt.echo("miltertest ok")
"""


async def test_miltertest_sees_signature_headers_and_deletions(
    make_relay: Callable[[dict[str, Any]], Awaitable[Relay]],
    config_dict: dict[str, Any],
    sink: Sink,
    tmp_path: Path,
) -> None:
    binary = shutil.which("miltertest")
    if binary is None:
        pytest.fail("miltertest is required: bash tests/run installs it", pytrace=False)
    raw = dict(config_dict)
    raw["smtp"] = {**config_dict["smtp"], "listen": None}
    raw["milter"] = {"listen": "127.0.0.1:0"}
    relay = await make_relay(raw)
    assert relay.store is not None
    await relay.store.add("carol@example.org", group_scope("newsletter"), "unsubscribe", "t")
    script = tmp_path / "marketing.lua"
    script.write_text(SCRIPT.format(port=relay.milter_port))
    proc = await asyncio.create_subprocess_exec(
        binary,
        "-s",
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    assert b"miltertest ok" in out
    assert [m.rcpt_tos for m in sink.handler.messages] == [("bob@example.org",)]  # re-injected
