"""The processes around the relay: the upstream sink, the load drivers, Postfix and OpenDKIM.

Everything here is a throwaway instance on loopback ports in the bench's own temp
folder: no system service or system config file is started, read or changed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _tool(name: str) -> str | None:
    """A Postfix/OpenDKIM program: on the PATH, else in /usr/sbin (not on a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    path = Path("/usr/sbin") / name
    return str(path) if os.access(path, os.X_OK) else None


SMTP_SINK = _tool("smtp-sink")
SMTP_SOURCE = _tool("smtp-source")
POSTFIX = _tool("postfix")
OPENDKIM = _tool("opendkim")
POSTFIX_DAEMONS = Path("/usr/lib/postfix/sbin")
# Postfix's smtp client puts at most this many recipients in one upstream transaction.
POSTFIX_RCPT_LIMIT = 50
# In a Postfix tuning: the process limit of the smtpd listeners (master.cf's maxproc column).
SMTPD_MAXPROC = "master.cf smtpd maxproc"


class BenchError(RuntimeError):
    pass


def wait_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)
    raise BenchError(f"nothing answered on 127.0.0.1:{port} after {timeout:.0f} s")


def wait_unix_socket(
    path: Path, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with status {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
        ):
            sock.settimeout(0.5)
            sock.connect(str(path))
            return
        time.sleep(0.02)
    raise BenchError(f"nothing answered on {path} after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; only the process we started, by its pid."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------
# The upstream sink


class Sink:
    """``smtp-sink -c`` (Postfix) or ``bench/sink.py``: both print ``mesg=N`` counters."""

    _COUNT = re.compile(rb"mesg=(\d+)")

    def __init__(self, port: int, prefer_postfix: bool = True) -> None:
        self.port = port
        self.kind = "smtp-sink" if prefer_postfix and SMTP_SINK else "asyncio sink"
        self.messages = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._changed = threading.Condition()

    def start(self) -> Sink:
        if self.kind == "smtp-sink":
            # -c counters, -u drop root; backlog 1024; nothing is written to disk
            args = [SMTP_SINK, "-c", "-u", "postfix", f"127.0.0.1:{self.port}", "1024"]
        else:
            args = [sys.executable, str(HERE / "sink.py"), str(self.port)]
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_port(self.port, proc=self._proc)
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _read(self) -> None:
        """Drain the counter output all the time: a full pipe would stall the sink."""
        assert self._proc is not None and self._proc.stdout is not None
        tail = b""
        fd = self._proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            tail = (tail + chunk)[-256:]
            found = self._COUNT.findall(tail)
            if found:
                with self._changed:
                    self.messages = max(self.messages, int(found[-1]))
                    self._changed.notify_all()
            # read in batches: one wake-up per counter update would cost the bench more CPU
            # than the sink; the pipe holds ~2,000 updates, more than 5 ms' worth
            time.sleep(0.005)

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until the sink has received ``count`` messages in total."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.messages < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.05))
        return True

    def settle(self, quiet: float = 0.3, timeout: float = 30.0) -> int:
        """Wait until no message arrived for ``quiet`` seconds; the total count."""
        deadline = time.monotonic() + timeout
        last, since = self.messages, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.02)
            if self.messages != last:
                last, since = self.messages, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return self.messages

    def stop(self) -> None:
        stop_process(self._proc)
        if self._reader is not None:
            self._reader.join(2)


# ---------------------------------------------------------------------------
# Load drivers


PERSISTENT = "persistent"  # each session keeps its connection for the next message
CONNECTION = "connection"  # a new connection per message
SHAPES = (PERSISTENT, CONNECTION)


@dataclass
class Load:
    """What one driver run sends: ``count`` messages from ``sender`` to ``rcpts`` each,
    over ``sessions`` concurrent sessions of the given ``shape``."""

    sender: str
    rcpts: int
    to: str = "rcpt@bench.test"
    sessions: int = 20
    size: int = 4096
    shape: str = PERSISTENT


@dataclass
class DriverResult:
    ok: int
    failed: int
    elapsed: float
    recipients_from: int
    recipients_used: int
    errors: list[str]
    latency: dict[str, float | None] | None = None


def run_smtp_source(port: int, load: Load, count: int, timeout: float) -> DriverResult:
    """Postfix's ``smtp-source``: ``-d`` keeps each session's connection for the next message
    (the persistent shape; without it, a connection per message), ``-N`` numbers
    recipients 1, 2, 3 ... across all sessions (like ``loadgen.py``)."""
    args = [
        SMTP_SOURCE, *(["-d"] if load.shape == PERSISTENT else []), "-N",
        "-s", str(load.sessions), "-m", str(count), "-r", str(load.rcpts),
        "-l", str(load.size), "-f", load.sender, "-t", load.to,
        "-M", "source.bench.local", f"127.0.0.1:{port}",
    ]  # fmt: skip
    started = time.perf_counter()
    try:
        done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"smtp-source did not finish {count} messages in {timeout:.0f} s") from exc
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[-500:]
        return DriverResult(0, count, elapsed, 1, 0, [f"smtp-source: {err}"])
    return DriverResult(count, 0, elapsed, 1, count * load.rcpts, [])


def run_loadgen(
    port: int,
    load: Load,
    *,
    count: int = 0,
    duration: float = 0.0,
    rate: float = 0.0,
    seq_start: int = 1,
    timeout: float = 120.0,
) -> DriverResult:
    args = [
        sys.executable, str(HERE / "loadgen.py"), "--port", str(port),
        "--sessions", str(load.sessions), "--from", load.sender, "--to", load.to,
        "--rcpts", str(load.rcpts), "--size", str(load.size), "--seq-start", str(seq_start),
    ]  # fmt: skip
    if count:
        args += ["--count", str(count)]
    if duration:
        args += ["--duration", str(duration)]
    if rate:
        args += ["--rate", f"{rate:.3f}"]
    if load.shape == CONNECTION:
        args.append("--new-connection")
    try:
        done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"loadgen did not finish in {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise BenchError(f"loadgen failed: {done.stderr.decode(errors='replace')[-800:]}")
    r = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return DriverResult(
        ok=r["ok"],
        failed=r["failed"],
        elapsed=r["elapsed"],
        recipients_from=seq_start,
        recipients_used=r["recipients_used"],
        errors=r["errors"],
        latency=r["latency"],
    )


# ---------------------------------------------------------------------------
# Postfix and OpenDKIM


def postfix_available() -> bool:
    return bool(POSTFIX and SMTP_SINK and SMTP_SOURCE and OPENDKIM and POSTFIX_DAEMONS.is_dir())


def _chown(path: Path, user: str) -> None:
    shutil.chown(path, user=user)


class PostfixInstance:
    """A private Postfix: own config, queue and data directories, loopback listeners only.

    ``plain_port``: a relay to the sink. ``dkim_port``: the same, with OpenDKIM as milter
    (``milter``: its address as ``smtpd_milters`` spells it).
    ``oneclick_port``: the same, with oneclick-relay's milter on ``oneclick_milter_port``
    (listening only while a milter scenario runs), and ``reinject_port`` without milters
    for the copies it re-injects. Started with ``postfix -c DIR start``, re-tuned with
    ``tune`` (``postfix -c DIR reload``) and stopped with ``postfix -c DIR stop``.
    """

    def __init__(
        self,
        folder: Path,
        sink_port: int,
        plain_port: int,
        dkim_port: int,
        milter: str,
        oneclick_port: int = 0,
        oneclick_milter_port: int = 0,
        reinject_port: int = 0,
    ) -> None:
        self.folder = folder
        self.etc = folder / "etc"
        self.queue = folder / "queue"
        self.data = folder / "data"
        self.sink_port = sink_port
        self.plain_port = plain_port
        self.dkim_port = dkim_port
        self.milter = milter
        self.oneclick_port = oneclick_port
        self.oneclick_milter_port = oneclick_milter_port
        self.reinject_port = reinject_port
        self.log = folder / "maillog"
        self.started = False
        self.tuning: dict[str, str] = {}  # the sweep settings in force (see ``tune``)

    def _postfix(self, *command: str) -> subprocess.CompletedProcess[bytes]:
        assert POSTFIX is not None
        return subprocess.run(
            [POSTFIX, "-c", str(self.etc), *command],
            capture_output=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> PostfixInstance:
        for d in (self.etc, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        _chown(self.data, "postfix")
        self._write_config()
        done = self._postfix("start")
        if done.returncode != 0:
            raise BenchError(f"postfix start failed: {self._why(done)}")
        self.started = True
        self._wait_listeners()
        return self

    def tune(self, tuning: dict[str, str]) -> None:
        """Rewrite the config with ``tuning`` and ``postfix reload``: main.cf parameters,
        and ``SMTPD_MAXPROC`` for the listeners' process limit column in master.cf
        ("-": ``default_process_limit``). Running daemons finish their current work
        with the old settings; new ones start with the new."""
        if tuning == self.tuning:
            return
        self._write_config(tuning)
        done = self._postfix("reload")
        if done.returncode != 0:
            raise BenchError(f"postfix reload failed: {self._why(done)}")
        self.tuning = dict(tuning)
        time.sleep(1.0)  # the master re-reads master.cf and restarts the listeners
        self._wait_listeners()

    def _wait_listeners(self) -> None:
        for port in (self.plain_port, self.dkim_port, self.oneclick_port, self.reinject_port):
            if port:
                wait_port(port)

    def _write_config(self, tuning: dict[str, str] | None = None) -> None:
        tuning = dict(tuning or {})
        maxproc = tuning.pop(SMTPD_MAXPROC, "-")
        extra = "".join(f"{k} = {v}\n" for k, v in tuning.items())
        (self.etc / "main.cf").write_text(
            f"""# throwaway benchmark instance: loopback only, relays everything to the sink
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
daemon_directory = {POSTFIX_DAEMONS}
command_directory = {Path(POSTFIX or "/usr/sbin/postfix").parent}
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-oneclick-bench
maillog_file = {self.log}
maillog_file_prefixes = {self.folder}
myhostname = postfix.bench.local
mydomain = bench.local
myorigin = $myhostname
mydestination =
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{self.sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
local_recipient_maps =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtputf8_enable = no
milter_default_action = tempfail
"""
            + (f"# sweep settings\n{extra}" if extra else "")
        )
        chroot_free = [
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        lines = [
            f"127.0.0.1:{self.plain_port} inet n - n - {maxproc} smtpd",
            f"127.0.0.1:{self.dkim_port} inet n - n - {maxproc} smtpd",
            f"  -o smtpd_milters={self.milter}",
        ]
        if self.oneclick_port:
            lines += [
                f"127.0.0.1:{self.oneclick_port} inet n - n - {maxproc} smtpd",
                f"  -o smtpd_milters=inet:127.0.0.1:{self.oneclick_milter_port}",
                f"127.0.0.1:{self.reinject_port} inet n - n - {maxproc} smtpd",
                "  -o smtpd_milters=",
                "  -o receive_override_options=no_milters",
            ]
        lines += ["  ".join(row) for row in chroot_free]
        (self.etc / "master.cf").write_text("\n".join(lines) + "\n")

    def _why(self, done: subprocess.CompletedProcess[bytes]) -> str:
        text = (done.stdout + done.stderr).decode(errors="replace").strip()
        if self.log.exists():
            text += " | " + " | ".join(self.log.read_text(errors="replace").splitlines()[-5:])
        return text or f"exit status {done.returncode}"

    def queued(self) -> int:
        """Messages still in the queue (incoming, active, deferred, hold, maildrop)."""
        total = 0
        for name in ("incoming", "active", "deferred", "hold", "maildrop"):
            for _, _, files in os.walk(self.queue / name):
                total += len(files)
        return total

    def deferred(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.queue / "deferred"))

    def wait_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queued() == 0:
                return True
            time.sleep(0.05)
        return False

    def master_pid(self) -> int | None:
        path = self.queue / "pid" / "master.pid"
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().strip())
        return None

    def pids(self) -> list[int]:
        """The master and its children (smtpd, cleanup, qmgr, smtp ...)."""
        master = self.master_pid()
        return [master, *children_of(master)] if master else []

    def stop(self) -> None:
        if not self.started:
            return
        master = self.master_pid()
        self._postfix("stop")
        self.started = False
        if master is None:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(master):
            time.sleep(0.05)
        if _alive(master):
            with contextlib.suppress(ProcessLookupError):
                os.kill(master, signal.SIGKILL)


class OpenDkim:
    """OpenDKIM in the foreground as a signing milter (one RSA key), on a Unix socket in
    ``folder`` or, with ``port``, on a loopback TCP port.

    The Unix socket is the default (and Debian's package default): at 20 sessions the
    loopback TCP milter left about half of this 2-core machine idle at ~95 ms per message
    (latency-bound), and the Unix socket gave ~30 % more messages per second (one A/B on
    a shared machine: 204 vs 272 msg/s). Likely cause, not verified: small milter
    packets that get no reply of their own (macros) meeting Nagle and delayed ACKs.
    """

    def __init__(
        self, folder: Path, key_file: Path, selector: str, domains: list[str], port: int = 0
    ) -> None:
        self.folder = folder
        self.port = port
        self.socket = folder / "opendkim.sock"
        self.key_file = key_file
        self.selector = selector
        self.domains = domains
        self._proc: subprocess.Popen[bytes] | None = None
        self.log = folder / "opendkim.log"

    def start(self) -> OpenDkim:
        self.folder.mkdir(parents=True, exist_ok=True)
        _chown(self.key_file, "opendkim")
        _chown(self.folder, "opendkim")  # it creates its socket there (as user opendkim)
        conf = self.folder / "opendkim.conf"
        conf.write_text(
            f"""Syslog no
Mode s
Background no
Socket {f"inet:{self.port}@127.0.0.1" if self.port else f"local:{self.socket}"}
UMask 000
Domain {",".join(self.domains)}
Selector {self.selector}
KeyFile {self.key_file}
RequireSafeKeys false
Canonicalization relaxed/relaxed
SignatureAlgorithm rsa-sha256
OversignHeaders From
InternalHosts 127.0.0.1
UserID opendkim
PidFile {self.folder / "opendkim.pid"}
"""
        )
        assert OPENDKIM is not None
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                [OPENDKIM, "-f", "-x", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            if self.port:
                wait_port(self.port, proc=self._proc)
            else:
                wait_unix_socket(self.socket, proc=self._proc)
        except BenchError as exc:
            raise BenchError(f"{exc}: {self.log.read_text(errors='replace')[-500:]}") from None
        return self

    @property
    def milter(self) -> str:
        """The milter's address the way Postfix's ``smtpd_milters`` spells it."""
        return f"inet:127.0.0.1:{self.port}" if self.port else f"unix:{self.socket}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        stop_process(self._proc)


# ---------------------------------------------------------------------------
# Process helpers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def copies_per_message_postfix(rcpts: int) -> int:
    return math.ceil(rcpts / POSTFIX_RCPT_LIMIT)
