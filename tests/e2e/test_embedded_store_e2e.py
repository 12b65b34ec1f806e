"""``redis.url: embedded`` with ``redis.data_dir``: real ``serve`` processes, stopped and
started again on the same folder, keep the suppression list (append-only file).

The CLI reaches the running relay's server through ``data_dir/redis.sock``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from conftest import Sink
from helpers import message, smtp_send, start_serve, unsubscribe_token, write_yaml

from relay.store.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
ALICE, BOB = "alice@example.net", "bob@example.org"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Served:
    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc, self.log = proc, log

    def output(self) -> str:
        return self.log.read_text()

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        for _ in range(300):
            code = self.proc.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.1)
        self.proc.kill()
        raise AssertionError(f"serve did not stop:\n{self.output()}")


async def serve(config: Path, smtp: int, log: Path) -> Served:
    return Served(await start_serve(config, log, smtp, tries=200), log)


def server_pids(data_dir: Path) -> list[int]:
    """Live processes whose command line names the data folder's socket."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(data_dir / "redis.sock").encode() in cmdline:
                pids.append(int(entry.name))
    return pids


async def test_embedded_store_keeps_a_suppression_across_a_restart(
    config_dict: dict[str, Any], sink: Sink, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    smtp, http = free_port(), free_port()
    config_dict["smtp"]["listen"] = f"127.0.0.1:{smtp}"
    config_dict["smtp"]["workers"] = 1
    config_dict["http"]["listen"] = f"127.0.0.1:{http}"
    config_dict["redis"] = {"url": "embedded", "data_dir": str(data)}
    path = write_yaml(tmp_path / "relay.yaml", config_dict)

    first = await serve(path, smtp, tmp_path / "first.log")
    try:
        assert (
            f"WARNING relay.runtime.parts[{first.proc.pid}] embedded redis started: EMBEDDED"
            f" store at unix://{data}/redis.sock, append-only file in {data}; single host only"
        ) in first.output()
        code, text = await smtp_send(smtp, "news@example.com", [ALICE], message(to=ALICE))
        assert code == 250, text
        token = unsubscribe_token(sink.handler.messages[-1].data)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{http}/u/{token}", data={"List-Unsubscribe": "One-Click"}
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()
        added = cli("suppress", "add", BOB, "--reason", "hard-bounce", "-c", str(path))
        assert added.returncode == 0, added.stderr
        assert len(server_pids(data)) == 1
    finally:
        assert await first.stop() == 0, first.output()
    assert server_pids(data) == [], "the embedded server outlived its relay"
    assert any((data / "appendonlydir").iterdir()), sorted(os.listdir(data))
    # No relay running: the CLI says so instead of opening the file behind its back.
    down = cli("suppress", "show", ALICE, "-c", str(path))
    assert down.returncode == 1
    assert down.stderr == (
        f"error: redis.url is embedded and no relay is running on {data}"
        " (start oneclick-relay serve first)\n"
    )

    second = await serve(path, smtp, tmp_path / "second.log")
    try:
        shown = cli("suppress", "show", ALICE, "-c", str(path))
        assert shown.returncode == 0, shown.stderr
        assert "\tgroup:newsletter\tunsubscribe\t" in shown.stdout, shown.stdout
        before = len(sink.handler.messages)
        code, text = await smtp_send(smtp, "news@example.com", [ALICE, BOB], message())
        assert code == 250, text
        assert "nothing sent, all 2 recipient(s) suppressed" in text
        receipt = message(sender="receipts@example.com", to=ALICE)
        code, text = await smtp_send(smtp, "receipts@example.com", [ALICE], receipt)
        assert code == 250, text  # an unsubscribe never blocks transactional mail
        assert [m.rcpt_tos for m in sink.handler.messages[before:]] == [(ALICE,)]
    finally:
        assert await second.stop() == 0, second.output()
    assert server_pids(data) == []


async def test_two_relays_on_one_data_dir_is_refused(
    config_dict: dict[str, Any], sink: Sink, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    smtp = free_port()
    config_dict["smtp"] |= {"listen": f"127.0.0.1:{smtp}", "workers": 1}
    config_dict["http"]["listen"] = f"127.0.0.1:{free_port()}"
    config_dict["redis"] = {"url": "embedded", "data_dir": str(data)}
    path = write_yaml(tmp_path / "relay.yaml", config_dict)
    first = await serve(path, smtp, tmp_path / "first.log")
    try:
        config_dict["smtp"]["listen"] = f"127.0.0.1:{free_port()}"
        config_dict["http"]["listen"] = f"127.0.0.1:{free_port()}"
        other = write_yaml(tmp_path / "other.yaml", config_dict)
        result = cli("serve", "-c", str(other))
        assert result.returncode == 2, result.stderr
        assert (
            f"config error: redis.data_dir: the embedded Redis did not start:"
            f" {data / 'redis.sock'} already answers: another relay uses {data}"
            " (one embedded server per folder)"
        ) in result.stderr
        assert len(server_pids(data)) == 1
    finally:
        assert await first.stop() == 0
