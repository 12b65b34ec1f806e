"""Real Redis deployments for the tests: a 3-master Cluster and a Sentinel-managed pair.

Every server is a real ``redis-server`` child process in a temporary folder, with
nothing persisted (``--save '' --appendonly no``), on a free loopback port in
``PORT_RANGE``: below the kernel's ephemeral range, and low enough that a Cluster
node's bus port (port + 10000) stays below 55535. If a server cannot be started,
``TopologyError`` says why (with the end of its log); the fixtures turn that into a
test failure, never a skip.

``ClusterTopology``
    Three masters created with ``redis-cli --cluster create``; ready when every
    node reports ``cluster_state:ok`` and knows all three.
``SentinelTopology``
    One master, one replica (``--replicaof``) and one Sentinel
    (``redis-server sentinel.conf --sentinel``) monitoring ``mymaster`` with
    quorum 1, ``down-after-milliseconds 1000`` and ``failover-timeout 5000``.
    After a failover the roles are swapped; ``master()`` always asks the Sentinel.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import redis

PORT_RANGE = (20000, 22700)
BUS_OFFSET = 10000
MASTER_NAME = "mymaster"


class TopologyError(RuntimeError):
    pass


def _binary(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise TopologyError(f"{name} is not on PATH (Debian: apt-get install redis-server)")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, bus: bool = False) -> list[int]:
    """``count`` free ports in ``PORT_RANGE`` (with ``bus``: port + 10000 free too)."""
    low, high = PORT_RANGE
    candidates = random.sample(range(low, high), 400)
    chosen: list[int] = []
    for port in candidates:
        if port in chosen or (bus and port + BUS_OFFSET in chosen):
            continue
        if _port_free(port) and (not bus or _port_free(port + BUS_OFFSET)):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise TopologyError(f"no {count} free ports in {low}-{high}")


def client(port: int, timeout: float = 5.0) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout)


class ServerProcess:
    """One ``redis-server`` (or Sentinel) process; ``start`` waits until it answers PING."""

    def __init__(self, name: str, port: int, folder: Path, args: Iterable[str]) -> None:
        self.name = name
        self.port = port
        self.folder = folder
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            self.args, cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TopologyError(f"{self.name} on port {self.port} exited:\n{self.log_tail()}")
            with contextlib.suppress(redis.RedisError), client(self.port, 0.5) as c:
                if c.ping():
                    return
            time.sleep(0.02)
        raise TopologyError(f"{self.name} did not answer on port {self.port}:\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _redis_args(port: int, folder: Path, *extra: str) -> list[str]:
    return [
        _binary("redis-server"),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(folder),
        "--logfile", str(folder / "server.log"),
        "--repl-diskless-sync-delay", "0",  # a replica syncs at once, not after 5 s
        "--shutdown-timeout", "0",  # stopping a master does not wait for its replica
        *extra,
    ]  # fmt: skip


def _wait(what: str, check: object, timeout: float, detail: object = None) -> None:
    """Poll ``check()`` (errors count as not yet) until it is true or ``timeout`` passes."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():
                return
        time.sleep(0.05)
    extra = detail() if callable(detail) else ""
    raise TopologyError(f"timed out after {timeout:.0f}s waiting for {what}\n{extra}")


def _start_all(servers: list[ServerProcess]) -> None:
    try:
        for server in servers:
            server.start()
    except BaseException:
        for server in servers:
            server.stop()
        raise


def _attempts(start: object, tries: int = 3) -> None:
    """Run ``start()``; a port taken between choosing and binding gets new ports."""
    assert callable(start)
    for attempt in range(tries):
        try:
            start()
            return
        except TopologyError as exc:
            if "Address already in use" not in str(exc) or attempt == tries - 1:
                raise


# ---------------------------------------------------------------------------
# Cluster


class ClusterTopology:
    """Three cluster masters; ``url`` names one of them (the client discovers the rest)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.nodes: list[ServerProcess] = []

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> ClusterTopology:
        _attempts(self._start)
        return self

    def _start(self) -> None:
        ports = free_ports(3, bus=True)
        self.nodes = [
            ServerProcess(
                f"cluster node {p}",
                p,
                self.folder / f"node-{p}",
                _redis_args(
                    p,
                    self.folder / f"node-{p}",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(self.folder / f"node-{p}" / "nodes.conf"),
                    "--cluster-node-timeout", "2000",
                ),
            )
            for p in ports
        ]  # fmt: skip
        _start_all(self.nodes)
        try:
            created = subprocess.run(
                [
                    _binary("redis-cli"),
                    "--cluster", "create",
                    *(f"127.0.0.1:{p}" for p in ports),
                    "--cluster-replicas", "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )  # fmt: skip
            if created.returncode != 0:
                raise TopologyError(f"redis-cli --cluster create failed:\n{created.stdout}")
            _wait("cluster_state:ok on every node", self._ready, 20, self._describe)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        for port in self.ports:
            with client(port) as c:
                info = c.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or "cluster_known_nodes:3" not in info:
                    return False
        return True

    def _describe(self) -> str:
        parts = []
        for port in self.ports:
            with contextlib.suppress(redis.RedisError), client(port) as c:
                parts.append(f"{port}: {c.execute_command('CLUSTER', 'INFO').decode()[:200]}")
        return "\n".join(parts)

    def flush(self) -> None:
        for port in self.ports:
            with client(port) as c:
                c.flushall()

    def node_of(self, key: str) -> int:
        """The port of the master that owns ``key``'s slot."""
        with client(self.ports[0]) as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise AssertionError(f"no node serves slot {slot}")

    def keys_by_node(self, pattern: str) -> dict[int, set[bytes]]:
        """What each node holds itself (asked directly, not through the cluster client)."""
        result = {}
        for port in self.ports:
            with client(port) as c:
                result[port] = set(c.scan_iter(match=pattern, count=1000))
        return result

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# ---------------------------------------------------------------------------
# Sentinel


class SentinelTopology:
    """A master, its replica and one Sentinel with quorum 1 and short timeouts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.servers: list[ServerProcess] = []
        self.sentinel: ServerProcess | None = None

    @property
    def sentinel_port(self) -> int:
        assert self.sentinel is not None
        return self.sentinel.port

    @property
    def redis_config(self) -> dict[str, object]:
        """The relay's ``redis:`` section for this deployment."""
        return {
            "sentinel": {"master": MASTER_NAME, "addresses": [f"127.0.0.1:{self.sentinel_port}"]},
            "timeout": 1,
        }

    def start(self) -> SentinelTopology:
        _attempts(self._start)
        return self

    def _start(self) -> None:
        master_port, replica_port, sentinel_port = free_ports(3)
        master_dir = self.folder / f"redis-{master_port}"
        replica_dir = self.folder / f"redis-{replica_port}"
        sentinel_dir = self.folder / f"sentinel-{sentinel_port}"
        self.servers = [
            ServerProcess("master", master_port, master_dir, _redis_args(master_port, master_dir)),
            ServerProcess(
                "replica",
                replica_port,
                replica_dir,
                _redis_args(
                    replica_port, replica_dir, "--replicaof", "127.0.0.1", str(master_port)
                ),
            ),
        ]
        sentinel_dir.mkdir(parents=True, exist_ok=True)
        conf = sentinel_dir / "sentinel.conf"  # Sentinel rewrites it: must be writable
        conf.write_text(
            f"port {sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"dir {sentinel_dir}\n"
            f"logfile {sentinel_dir / 'server.log'}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 5000\n"
        )
        self.sentinel = ServerProcess(
            "sentinel",
            sentinel_port,
            sentinel_dir,
            [_binary("redis-server"), str(conf), "--sentinel"],
        )
        try:
            _start_all([*self.servers, self.sentinel])
            self.wait_stable(20)
        except BaseException:
            self.stop()
            raise

    def sentinel_client(self) -> redis.Redis:
        return client(self.sentinel_port)

    def master_port(self) -> int:
        """The master's port as the Sentinel reports it now."""
        with self.sentinel_client() as s:
            _host, port = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(port)

    def server(self, port: int) -> ServerProcess:
        return next(s for s in self.servers if s.port == port)

    def _stable(self) -> bool:
        """Sentinel, master and replica agree: one master, its replica online and known."""
        master = self.master_port()
        with client(master) as m:
            info = m.info("replication")
        if info.get("role") != "master" or info.get("connected_slaves", 0) < 1:
            return False
        if info["slave0"].get("state") != "online":
            return False
        with self.sentinel_client() as s:
            state = s.sentinel_master(MASTER_NAME)
            replicas = s.sentinel_slaves(MASTER_NAME)
        if int(state["port"]) != master or state["flags"] != "master":
            return False  # a failover still in progress, or the master seen as down
        # the Sentinel's view of a replica's own INFO can be 10 s old: trust the master's
        online = int(info["slave0"]["port"])
        return any(r["flags"] == "slave" and int(r["port"]) == online for r in replicas)

    def wait_stable(self, timeout: float = 15) -> None:
        _wait("a stable master with an online replica", self._stable, timeout, self._describe)

    def _describe(self) -> str:
        lines = []
        for server in [*self.servers, *([self.sentinel] if self.sentinel else [])]:
            lines.append(f"--- {server.name} {server.port}\n{server.log_tail()[-600:]}")
        return "\n".join(lines)

    def flush(self) -> None:
        """Empty the current master and wait until the replica has it too."""
        with client(self.master_port()) as m:
            m.flushall()
            if m.execute_command("WAIT", 1, 2000) < 1:
                raise TopologyError("the replica did not acknowledge FLUSHALL")

    def stop(self) -> None:
        if self.sentinel is not None:
            self.sentinel.stop()
        for server in self.servers:
            server.stop()
