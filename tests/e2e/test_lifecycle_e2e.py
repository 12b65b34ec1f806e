"""The real process: SIGTERM drains, SIGHUP reloads (keeping the old config if the new is bad),
a bad config at start exits 2 naming the key, and workers share the ports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Sink
from helpers import message, smtp_send, write_yaml

from relay.store.embedded import free_port


class Served:
    def __init__(self, proc: subprocess.Popen[str], smtp: int, http: int, log: Path) -> None:
        self.proc, self.smtp, self.http, self.log = proc, smtp, http, log

    def output(self) -> str:
        return self.log.read_text()


async def serve(config: dict[str, Any], tmp_path: Path, workers: int = 1) -> Served:
    smtp, http = free_port(), free_port()
    config["smtp"]["listen"] = f"127.0.0.1:{smtp}"
    config["smtp"]["workers"] = workers
    config["http"]["listen"] = f"127.0.0.1:{http}"
    path = write_yaml(tmp_path / "relay.yaml", config)
    log = tmp_path / "relay.log"
    with log.open("w") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a long-running child, not awaited here
            [sys.executable, "-m", "relay", "serve", "-c", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for _ in range(150):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", smtp)
            writer.close()
            await writer.wait_closed()
            return Served(proc, smtp, http, log)
        except OSError:
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
    proc.kill()
    raise AssertionError(f"relay did not start:\n{log.read_text()}")


def serve_until_exit(config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``serve`` on ``config`` expecting it to refuse to start."""
    path = write_yaml(tmp_path / "refused.yaml", config)
    return subprocess.run(
        [sys.executable, "-m", "relay", "serve", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def wait_exit(proc: subprocess.Popen[str], timeout: float = 20) -> int:
    for _ in range(int(timeout * 10)):
        code = proc.poll()
        if code is not None:
            return code
        await asyncio.sleep(0.1)
    proc.kill()
    raise AssertionError("process did not exit")


async def test_sigterm_finishes_in_flight_then_exits_0(
    config_dict: dict[str, Any], sink: Sink, tmp_path: Path
) -> None:
    served = await serve(config_dict, tmp_path)
    sink.handler.delay = 1.5
    sending = asyncio.create_task(
        smtp_send(served.smtp, "x@example.com", ["a@example.net"], message())
    )
    await asyncio.sleep(0.8)  # the relay is now waiting on the slow upstream (1.5 s)
    assert sink.handler.messages == []
    served.proc.send_signal(signal.SIGTERM)
    code, text = await sending
    assert code == 250, text
    assert len(sink.handler.messages) == 1
    assert await wait_exit(served.proc) == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", served.smtp)
    assert "draining" in served.output()


async def test_sighup_reloads_and_keeps_old_config_when_new_is_bad(
    config_dict: dict[str, Any], sink: Sink, tmp_path: Path
) -> None:
    served = await serve(config_dict, tmp_path)
    try:
        sender = "hello@example.com"
        await smtp_send(served.smtp, sender, ["a@example.net"], message(sender=sender))
        assert b"List-Unsubscribe" not in sink.handler.messages[-1].data  # transactional

        config_dict["policy"]["senders"].insert(
            0, {"match": sender, "class": "marketing", "group": "hello"}
        )
        write_yaml(tmp_path / "relay.yaml", config_dict)
        served.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
        await smtp_send(served.smtp, sender, ["a@example.net"], message(sender=sender))
        assert b"List-Unsubscribe:" in sink.handler.messages[-1].data  # now marketing

        config_dict["upstream"]["port"] = 0
        write_yaml(tmp_path / "relay.yaml", config_dict)
        served.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
        assert "reload failed, keeping the running config: upstream.port" in served.output()
        code, _ = await smtp_send(served.smtp, sender, ["a@example.net"], message(sender=sender))
        assert code == 250
        assert b"List-Unsubscribe:" in sink.handler.messages[-1].data
    finally:
        served.proc.send_signal(signal.SIGTERM)
        assert await wait_exit(served.proc) == 0


def test_bad_config_at_start_exits_2_naming_the_key(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    config_dict["upstream"]["port"] = 70000
    done = serve_until_exit(config_dict, tmp_path)
    assert done.returncode == 2
    assert "upstream.port: expected an integer 1-65535" in done.stderr
    assert "Traceback" not in done.stderr


async def test_two_workers_share_the_ports(
    config_dict: dict[str, Any], sink: Sink, tmp_path: Path
) -> None:
    served = await serve(config_dict, tmp_path, workers=2)
    try:
        replies = await asyncio.gather(
            *(
                smtp_send(served.smtp, "x@example.com", [f"u{i}@example.net"], message())
                for i in range(20)
            )
        )
        assert all(code == 250 for code, _ in replies)
        assert len(sink.handler.messages) == 20
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{served.http}/healthz") as resp:
                assert resp.status == 200
            for _ in range(4):  # whichever worker answers, the counts cover both
                async with http.get(f"http://127.0.0.1:{served.http}/metrics") as resp:
                    text = await resp.text()
                delivered = sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("oneclick_messages_total{") and 'outcome="delivered"' in line
                )
                assert delivered == 20
        pids = {line.split()[3] for line in served.output().splitlines() if "relay started" in line}
        assert len(pids) == 2, served.output()
    finally:
        os.kill(served.proc.pid, signal.SIGTERM)
        assert await wait_exit(served.proc) == 0


def test_worker_config_error_exits_2_without_restart_loop(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    config_dict["dkim"][0]["private_key_file"] = str(garbage)
    config_dict["smtp"]["workers"] = 2
    config_dict["smtp"]["listen"] = f"127.0.0.1:{free_port()}"
    config_dict["http"]["listen"] = f"127.0.0.1:{free_port()}"
    done = serve_until_exit(config_dict, tmp_path)
    assert done.returncode == 2
    assert "dkim[0].private_key_file" in done.stderr
