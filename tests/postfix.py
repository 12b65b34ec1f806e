"""A private Postfix instance for the milter tests (importable as ``postfix``).

Own config, queue and data folders under the test's temp folder, listeners on
loopback only, nothing delivered locally (``mydestination`` empty): everything is
relayed to ``relayhost``, the test's capture sink. ``smtpd_port`` runs the given
milters; ``reinject_port`` is a listener without milters, the relay's upstream for
re-injected copies (as a ``content_filter`` return path is). Started with
``postfix -c DIR start`` and stopped with ``postfix -c DIR stop``; the system's
Postfix (if any) is neither read nor changed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = Path("/usr/lib/postfix/sbin")


def postfix_binary() -> str | None:
    found = shutil.which("postfix")
    if found:
        return found
    return "/usr/sbin/postfix" if os.access("/usr/sbin/postfix", os.X_OK) else None


def own_folder() -> Path:
    """A folder for one instance, outside pytest's tmp_path.

    Postfix's unprivileged daemons must reach their queue and data folders, and
    pytest's tmp_path sits below a 0700 folder; the caller removes this one.
    """
    folder = Path(tempfile.mkdtemp(prefix="oneclick-postfix-"))
    folder.chmod(0o755)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"postfix did not listen on 127.0.0.1:{port}")


_SERVICES = [
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


class Postfix:
    def __init__(self, folder: Path, relayhost_port: int, milters: str) -> None:
        self.folder = folder
        self.etc = folder / "etc"
        self.queue = folder / "queue"
        self.data = folder / "data"
        self.log = folder / "maillog"
        self.relayhost_port = relayhost_port
        self.milters = milters
        self.smtpd_port = free_port()
        self.reinject_port = free_port()
        self.started = False

    def _run(self, *command: str) -> subprocess.CompletedProcess[bytes]:
        binary = postfix_binary()
        assert binary is not None
        return subprocess.run(
            [binary, "-c", str(self.etc), *command],
            capture_output=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> Postfix:
        for d in (self.etc, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data, user="postfix")
        binary = postfix_binary() or "/usr/sbin/postfix"
        (self.etc / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
daemon_directory = {DAEMONS}
command_directory = {Path(binary).parent}
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-oneclick-test
maillog_file = {self.log}
maillog_file_prefixes = {self.folder}
myhostname = mx.postfix.test
mydomain = postfix.test
myorigin = $myhostname
mydestination =
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{self.relayhost_port}
smtpd_relay_restrictions = permit_mynetworks, reject
local_recipient_maps =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtputf8_enable = no
milter_protocol = 6
milter_default_action = tempfail
"""
        )
        lines = [
            f"127.0.0.1:{self.smtpd_port} inet n - n - - smtpd",
            f"  -o smtpd_milters={self.milters}",
            f"127.0.0.1:{self.reinject_port} inet n - n - - smtpd",
            "  -o smtpd_milters=",
            "  -o receive_override_options=no_milters",
            *("  ".join(row) for row in _SERVICES),
        ]
        (self.etc / "master.cf").write_text("\n".join(lines) + "\n")
        done = self._run("start")
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {self.why(done)}")
        self.started = True
        _wait_port(self.smtpd_port)
        _wait_port(self.reinject_port)
        return self

    def why(self, done: subprocess.CompletedProcess[bytes]) -> str:
        text = (done.stdout + done.stderr).decode(errors="replace").strip()
        return f"{text} | {self.maillog()[-2000:]}"

    def maillog(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def queued(self) -> int:
        total = 0
        for name in ("incoming", "active", "deferred", "hold", "maildrop"):
            for _, _, files in os.walk(self.queue / name):
                total += len(files)
        return total

    def stop(self) -> None:
        if not self.started:
            return
        pid_file = self.queue / "pid" / "master.pid"
        master = None
        with contextlib.suppress(OSError, ValueError):
            master = int(pid_file.read_text().strip())
        self._run("stop")
        self.started = False
        if master is None:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(master, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(master, signal.SIGKILL)
