"""The real process: SIGTERM drains, SIGHUP reloads (keeping the old config if the new is bad),
a bad config at start exits 2 naming the key, and workers share the ports."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Sink
from helpers import children, group_members, message, smtp_send, start_serve, write_yaml

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
    proc = await start_serve(path, log, smtp)
    return Served(proc, smtp, http, log)


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


# ---------------------------------------------------------------------------
# A failed start, a stop and a drain that overran leave nothing running


def start_in_group(args: list[str], log: Path) -> subprocess.Popen[str]:
    """``python -m relay ARGS`` as the leader of its own process group: every process it
    starts (workers, an embedded Redis) is in the group and can be found afterwards."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "relay", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


async def assert_nothing_left(pgid: int) -> None:
    for _ in range(50):
        if not group_members(pgid):
            return
        await asyncio.sleep(0.1)
    left = group_members(pgid)
    for pid in left:  # do not leak them into the other tests
        os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"processes left running: {left}")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line.lower()]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("taken", ["smtp", "http"])
async def test_a_port_in_use_is_one_line_exit_1_and_leaves_no_embedded_redis(
    config_dict: dict[str, Any], tmp_path: Path, workers: int, taken: str
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    config_dict["redis"] = {"url": "embedded", "data_dir": str(data)}  # a child process
    config_dict["smtp"]["workers"] = workers
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    for name in ("smtp", "http"):
        config_dict[name]["listen"] = f"127.0.0.1:{port if name == taken else free_port()}"
    path = write_yaml(tmp_path / "relay.yaml", config_dict)
    log = tmp_path / "relay.log"
    with holder:
        proc = start_in_group(["serve", "-c", str(path)], log)
        code = await wait_exit(proc, 30)
    output = log.read_text()
    assert code == 1, output
    assert error_lines(output) == [
        f"error: {taken}.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    ], output
    assert "Traceback" not in output
    await assert_nothing_left(proc.pid)


async def test_workers_and_their_embedded_redis_all_stop_on_sigterm(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    config_dict["redis"] = {"url": "embedded", "data_dir": str(data)}
    config_dict["smtp"]["workers"] = 2
    smtp = free_port()
    config_dict["smtp"]["listen"] = f"127.0.0.1:{smtp}"
    config_dict["http"]["listen"] = f"127.0.0.1:{free_port()}"
    path = write_yaml(tmp_path / "relay.yaml", config_dict)
    log = tmp_path / "relay.log"
    proc = start_in_group(["serve", "-c", str(path)], log)
    try:
        for _ in range(300):
            if log.read_text().count("relay started") == 2 or proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert log.read_text().count("relay started") == 2, log.read_text()
        assert len(group_members(proc.pid)) == 4  # supervisor, two workers, Redis
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    await assert_nothing_left(proc.pid)


async def test_an_unloadable_certificate_is_one_line_exit_2_before_anything_starts(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    config_dict["redis"] = {"url": "embedded", "data_dir": str(data)}
    garbage = tmp_path / "cert.pem"
    garbage.write_text("not a certificate\n")
    garbage.chmod(0o600)  # it is also the key file: readable by others would be refused first
    config_dict["smtp"]["tls"] = {"cert_file": str(garbage), "key_file": str(garbage)}
    path = write_yaml(tmp_path / "relay.yaml", config_dict)
    log = tmp_path / "relay.log"
    proc = start_in_group(["serve", "-c", str(path)], log)
    assert await wait_exit(proc, 30) == 2
    output = log.read_text()
    [line] = output.splitlines()
    assert line.startswith("config error: smtp.tls.cert_file: cannot load certificate/key")
    await assert_nothing_left(proc.pid)


async def test_demo_keep_running_stops_everything_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    proc = start_in_group(["demo", "--keep-running", "--out", str(tmp_path / "demo")], log)
    try:
        for _ in range(600):
            if "Still running" in log.read_text() or proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert "Still running" in log.read_text(), log.read_text()
        assert len(group_members(proc.pid)) >= 2  # the demo and its embedded Redis
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in log.read_text()
    await assert_nothing_left(proc.pid)


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_drain_that_overran_exits_1_and_says_how_many_were_cut(
    config_dict: dict[str, Any], sink: Sink, tmp_path: Path, workers: int
) -> None:
    config_dict["smtp"]["drain_timeout"] = 0.5
    served = await serve(config_dict, tmp_path, workers=workers)
    sink.handler.delay = 5
    sending = [
        asyncio.create_task(
            smtp_send(served.smtp, "x@example.com", [f"u{i}@example.net"], message())
        )
        for i in range(2)
    ]
    await asyncio.sleep(1.0)  # both are now waiting on the slow upstream
    served.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(served.proc) == 1, served.output()
    output = served.output()
    cut = [
        int(n) for n in re.findall(r"shutdown: (\d+) transactions still running were cut", output)
    ]
    assert sum(cut) == 2, output
    if workers == 1:
        assert "2 transaction(s) cut after smtp.drain_timeout=0.5s" in output
    for task in sending:  # the clients never got a 250: they still have their messages
        result = await asyncio.gather(task, return_exceptions=True)
        assert not (isinstance(result[0], tuple) and result[0][0] == 250)


async def test_workers_stop_when_the_supervisor_is_killed(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    """SIGKILL leaves the supervisor no chance to stop its workers: the kernel does it."""
    served = await serve(config_dict, tmp_path, workers=2)
    workers = children(served.proc.pid)
    assert len(workers) == 2
    served.proc.kill()
    served.proc.wait()
    for _ in range(100):
        if not _live(workers):
            break
        await asyncio.sleep(0.1)
    assert _live(workers) == [], "workers outlived their supervisor"


def _live(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


async def test_milter_only_host_serves_with_two_workers_and_stops_on_sigterm(
    config_dict: dict[str, Any], tmp_path: Path, sink: Sink
) -> None:
    from milterclient import MilterClient

    port = free_port()
    config_dict["smtp"]["listen"] = None
    config_dict["smtp"]["workers"] = 2
    config_dict["milter"] = {"listen": f"127.0.0.1:{port}"}
    config_dict["http"]["listen"] = f"127.0.0.1:{free_port()}"
    path = write_yaml(tmp_path / "relay.yaml", config_dict)
    log = tmp_path / "relay.log"
    with log.open("w") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a long-running child, not awaited here
            [sys.executable, "-m", "relay", "serve", "-c", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        for _ in range(150):
            if log.read_text().count("relay started") == 2:
                break
            assert proc.poll() is None, log.read_text()
            await asyncio.sleep(0.1)
        assert "smtp=- " in log.read_text() and f"milter=127.0.0.1:{port}" in log.read_text()
        headers = [("From", "receipts@example.com"), ("To", "a@example.net"), ("Subject", "x")]
        for _ in range(4):  # spread over both workers by the kernel
            client = await MilterClient.connect(port)
            await client.negotiate()
            replies = await client.message("receipts@example.com", ["a@example.net"], headers, b"")
            assert replies[-1].command == "a"
            assert any(r.command == "i" and b"DKIM-Signature" in r.data for r in replies)
            await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
