"""Deployment files, checked with the real tools: the systemd unit, sysusers and tmpfiles
snippets (systemd-analyze, systemd-sysusers, systemd-tmpfiles), and the Dockerfile (its
HEALTHCHECK command run against a real relay, its ENTRYPOINT + CMD run as a process that
gets SIGTERM). Docker itself cannot run here, so the image is checked piece by piece."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Sink
from helpers import message, smtp_send, write_yaml

from relay.config import SmtpConfig
from relay.store.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "oneclick-relay.service"
SYSUSERS = ROOT / "systemd" / "oneclick-relay.sysusers"
TMPFILES = ROOT / "systemd" / "oneclick-relay.tmpfiles"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
UNIT_EXEC = "/usr/local/bin/oneclick-relay serve -c /etc/oneclick-relay/config.yaml"
HEALTH_URL = "http://127.0.0.1:8080/healthz"


def tool(name: str) -> str:
    """A real tool from the PATH; the test fails (never skips) without it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is required (Debian package 'systemd'; bash tests/run installs it)",
            pytrace=False,
        )
    return path


def entry_point() -> str:
    path = shutil.which("oneclick-relay")
    if path is None:
        pytest.fail("the oneclick-relay entry point is not installed (pip install -e .)")
    return path


# --- systemd -----------------------------------------------------------------------


def unit_settings(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, comment_prefixes=("#", ";"), empty_lines_in_values=False
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def verify_unit(text: str, folder: Path) -> list[str]:
    """``systemd-analyze verify`` on a copy of the unit whose ExecStart is the real entry
    point; returns its complaints. verify exits 0 on unknown keys and bad values, and only
    warns, so every line naming the unit counts as a complaint."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "oneclick-relay.service"
    path.write_text(text.replace("/usr/local/bin/oneclick-relay", entry_point()))
    done = subprocess.run(
        [tool("systemd-analyze"), "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line for line in (done.stdout + done.stderr).splitlines() if "oneclick-relay" in line
    ]
    if done.returncode != 0:
        problems.append(f"exit status {done.returncode}: {done.stderr.strip()}")
    return problems


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert f"ExecStart={UNIT_EXEC}\n" in text
    assert verify_unit(text, tmp_path / "good") == []
    # The check is not vacuous: verify's warnings about a misspelt key or a bad value
    # are caught although verify itself exits 0 for them.
    broken = text.replace("ProtectHome=yes", "ProtectHom=yes").replace(
        "Type=notify", "Type=notifyy"
    )
    problems = verify_unit(broken, tmp_path / "broken")
    assert any("ProtectHom" in p for p in problems), problems
    assert any("notifyy" in p for p in problems), problems


def test_unit_settings_match_the_relay() -> None:
    unit = unit_settings(UNIT.read_text())
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "all"  # READY=1 comes from workers (see below)
    assert service["ExecStart"] == UNIT_EXEC
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"
    # Longer than the drain: the default and the example config's value.
    example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    default = next(f.default for f in fields(SmtpConfig) if f.name == "drain_timeout")
    drain = max(float(example["smtp"]["drain_timeout"]), float(default))  # type: ignore[arg-type]
    assert float(service["TimeoutStopSec"]) > drain + 5
    assert service["User"] == "oneclick-relay"
    assert service["CapabilityBoundingSet"] == ""
    assert "AmbientCapabilities" not in service
    assert "#AmbientCapabilities=CAP_NET_BIND_SERVICE" in UNIT.read_text()
    for key in (
        "ProtectHome",
        "NoNewPrivileges",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert service["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert service["SystemCallFilter"] == "@system-service"
    assert service["ReadOnlyPaths"] == "/etc/oneclick-relay"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_exposure_score_stays_low(tmp_path: Path) -> None:
    path = tmp_path / "oneclick-relay.service"
    path.write_text(UNIT.read_text().replace("/usr/local/bin/oneclick-relay", entry_point()))
    done = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for oneclick-relay\.service: ([\d.]+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= 2.0, done.stdout


def test_sysusers_and_tmpfiles_create_the_user_and_config_folder(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for command in (
        [tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS)],
        [tool("systemd-tmpfiles"), f"--root={root}", "--create", str(TMPFILES)],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    user = passwd["oneclick-relay"]
    uid, gid, shell = int(user[2]), int(user[3]), user[6]
    assert 0 < uid < 1000 and shell == "/usr/sbin/nologin"
    assert f"oneclick-relay:x:{gid}:" in (root / "etc/group").read_text()
    for folder in ("etc/oneclick-relay", "etc/oneclick-relay/dkim"):
        st = (root / folder).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, gid, 0o750), folder


# --- Dockerfile --------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a continuation line"
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instr, args in dockerfile():
        if instr == "FROM":
            result.append([])
        if result:
            result[-1].append((instr, args))
    return result


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def only(stage: list[tuple[str, str]], name: str) -> str:
    found = [args for instr, args in stage if instr == name]
    assert len(found) == 1, (name, found)
    return found[0]


def healthcheck() -> tuple[list[str], dict[str, str]]:
    """The HEALTHCHECK command (exec form) and the runtime stage's ENV."""
    runtime = stages()[-1]
    found = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(\[.*\])", only(runtime, "HEALTHCHECK"))
    assert found, "HEALTHCHECK must be 'HEALTHCHECK [--options] CMD [exec form]'"
    env: dict[str, str] = {}
    for args in (a for i, a in runtime if i == "ENV"):
        env.update(dict(pair.split("=", 1) for pair in args.split()))
    return exec_form(found.group(2)), env


def entrypoint_and_cmd() -> list[str]:
    runtime = stages()[-1]
    return exec_form(only(runtime, "ENTRYPOINT")) + exec_form(only(runtime, "CMD"))


def test_dockerfile_shape() -> None:
    builder, runtime = stages()
    assert builder[0] == ("FROM", "python:3.12-slim AS builder")
    assert "pip wheel" in only(builder, "RUN")
    assert runtime[0] == ("FROM", "python:3.12-slim")
    assert "ARG EXTRAS=fast" in DOCKERFILE.read_text()
    install = only(runtime, "RUN")
    assert "from=builder" in install and "--no-index" in install
    assert '"oneclick-relay[${EXTRAS}]"' in install

    user = only(runtime, "USER").split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    if user.isdigit():
        assert f"--uid {user}" in install, "USER names a uid the image creates"

    assert exec_form(only(runtime, "ENTRYPOINT")) == ["oneclick-relay"]
    assert exec_form(only(runtime, "CMD")) == ["serve", "-c", "/etc/oneclick-relay/config.yaml"]
    assert only(runtime, "STOPSIGNAL") == "SIGTERM"
    assert only(runtime, "EXPOSE").split() == ["2525", "8080"]

    command, env = healthcheck()
    assert command[:2] == ["python", "-c"]
    assert "curl" not in command and "urllib" in command[2]
    assert env["ONECLICK_RELAY_HEALTHCHECK_URL"] == HEALTH_URL
    assert repr(HEALTH_URL) in command[2]  # the default when the variable is unset


def test_dockerignore_keeps_what_the_builder_copies() -> None:
    lines = [
        line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    copied = [args.split()[:-1] for instr, args in stages()[0] if instr == "COPY"]
    for sources in copied:
        for source in sources:
            assert f"!{source.rstrip('/')}" in {line.rstrip("/") for line in lines}, source


# --- the image's commands run for real ---------------------------------------------


class Served:
    def __init__(self, proc: asyncio.subprocess.Process, smtp: int, http: int, log: Path):
        self.proc, self.smtp, self.http, self.log = proc, smtp, http, log

    def output(self) -> str:
        return self.log.read_text()

    async def exit_code(self, timeout: float = 20) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"the relay did not exit:\n{self.output()}") from None


async def start(
    argv: list[str], config: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None
) -> Served:
    """Run ``argv`` (whose config path is ``tmp_path/relay.yaml``) on free ports."""
    smtp, http = free_port(), free_port()
    config["smtp"]["listen"] = f"127.0.0.1:{smtp}"
    config["http"]["listen"] = f"127.0.0.1:{http}"
    config["smtp"].setdefault("workers", 1)
    write_yaml(tmp_path / "relay.yaml", config)
    log = tmp_path / "relay.log"
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    for _ in range(150):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", smtp)
            writer.close()
            await writer.wait_closed()
            return Served(proc, smtp, http, log)
        except OSError:
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
    raise AssertionError(f"the relay did not start:\n{log.read_text()}")


def image_argv(config_path: Path) -> list[str]:
    """ENTRYPOINT + CMD from the Dockerfile, with the real entry point and config path."""
    argv = entrypoint_and_cmd()
    assert argv[0] == "oneclick-relay"
    argv[0] = entry_point()
    argv[argv.index("-c") + 1] = str(config_path)
    return argv


async def run_healthcheck(http_port: int) -> tuple[int, str]:
    """The Dockerfile's HEALTHCHECK command, run as Docker would, aimed at ``http_port``."""
    command, env = healthcheck()
    url = env["ONECLICK_RELAY_HEALTHCHECK_URL"].replace(":8080/", f":{http_port}/")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command[1:],
        env={**os.environ, "ONECLICK_RELAY_HEALTHCHECK_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(errors="replace")


async def test_healthcheck_is_healthy_then_unhealthy_when_redis_goes(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    redis = EmbeddedRedis().start()  # our own, so that it can be stopped
    try:
        config_dict["redis"]["url"] = redis.url
        served = await start(
            [sys.executable, "-m", "relay", "serve", "-c", str(tmp_path / "relay.yaml")],
            config_dict,
            tmp_path,
        )
        try:
            code, out = await run_healthcheck(served.http)
            assert code == 0, out
            redis.stop()
            code, out = await run_healthcheck(served.http)
            assert code != 0
            assert "503" in out, out
        finally:
            served.proc.send_signal(signal.SIGTERM)
            assert await served.exit_code() == 0, served.output()
        code, out = await run_healthcheck(served.http)  # nothing listens any more
        assert code != 0 and "refused" in out.lower(), out
    finally:
        redis.stop()


# sd_notify as systemd receives it: a datagram socket that learns each sender's pid.


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    folder = tempfile.mkdtemp(prefix="ocr-notify-")  # short: AF_UNIX paths <= 107 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(folder, "notify"))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.setblocking(False)
    yield sock
    sock.close()
    shutil.rmtree(folder)


async def notified(sock: socket.socket, want: str, timeout: float = 20) -> list[tuple[int, str]]:
    """Every (sender pid, message) received until one message has the line ``want``."""
    seen: list[tuple[int, str]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    cred_size = socket.CMSG_SPACE(12)  # struct ucred: pid, uid, gid
    while loop.time() < deadline:
        try:
            data, ancdata, _, _ = sock.recvmsg(4096, cred_size)
        except BlockingIOError:
            await asyncio.sleep(0.05)
            continue
        pid = next(
            int.from_bytes(cdata[:4], sys.byteorder)
            for level, kind, cdata in ancdata
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        )
        seen.append((pid, data.decode()))
        if want in data.decode().splitlines():
            return seen
    raise AssertionError(f"no {want} within {timeout} s; got {seen}")


async def test_image_entrypoint_and_cmd_serve_notify_and_exit_0_on_sigterm(
    config_dict: dict[str, Any], sink: Sink, tmp_path: Path, notify_socket: socket.socket
) -> None:
    config_path = tmp_path / "relay.yaml"
    served = await start(
        image_argv(config_path),
        config_dict,
        tmp_path,
        env={"NOTIFY_SOCKET": notify_socket.getsockname()},
    )
    try:
        ready = await notified(notify_socket, "READY=1")
        assert ready[-1][0] == served.proc.pid
        assert f"STATUS=serving smtp {served.smtp} http {served.http}" in ready[-1][1]
        code, text = await smtp_send(served.smtp, "news@example.com", ["a@example.net"], message())
        assert code == 250, text
        assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in sink.handler.messages[0].data
        code, out = await run_healthcheck(served.http)
        assert code == 0, out

        served.proc.send_signal(signal.SIGHUP)  # ExecReload=/bin/kill -HUP $MAINPID
        reload = await notified(notify_socket, "READY=1")
        assert [m for _, m in reload] == ["RELOADING=1", "READY=1"]
    finally:
        served.proc.send_signal(signal.SIGTERM)
        assert await served.exit_code() == 0, served.output()
    stopping = await notified(notify_socket, "STOPPING=1")
    assert stopping[-1][0] == served.proc.pid


async def test_with_workers_notifications_come_from_workers_so_notify_access_is_all(
    config_dict: dict[str, Any], sink: Sink, tmp_path: Path, notify_socket: socket.socket
) -> None:
    config_dict["smtp"]["workers"] = 2
    served = await start(
        image_argv(tmp_path / "relay.yaml"),
        config_dict,
        tmp_path,
        env={"NOTIFY_SOCKET": notify_socket.getsockname()},
    )
    try:
        senders = {pid for pid, _ in await notified(notify_socket, "READY=1")}
        if len(senders) < 2:
            senders |= {pid for pid, _ in await notified(notify_socket, "READY=1")}
        # Not the main PID: systemd drops these under the default NotifyAccess=main.
        assert served.proc.pid not in senders and len(senders) == 2
        code, text = await smtp_send(
            served.smtp, "receipts@example.com", ["b@example.net"], message()
        )
        assert code == 250, text
    finally:
        served.proc.send_signal(signal.SIGTERM)
        assert await served.exit_code() == 0, served.output()


def test_config_error_exit_status_is_the_units_restart_prevent_status(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    config_dict["smtp"]["drain_timeuot"] = 30
    path = write_yaml(tmp_path / "relay.yaml", config_dict)
    done = subprocess.run(image_argv(path), capture_output=True, text=True, timeout=60)
    unit = unit_settings(UNIT.read_text())
    assert str(done.returncode) == unit["Service"]["RestartPreventExitStatus"], done.stderr
    assert "smtp.drain_timeuot" in done.stderr
