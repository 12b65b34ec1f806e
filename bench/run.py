"""oneclick-relay benchmark: throughput, added latency and CPU per message against baselines.

    python bench/run.py            # full run, about 8 minutes
    python bench/run.py --quick    # about 2 minutes (reduced sweep)
    python bench/run.py --json     # machine-readable result on stdout

Starts a real Redis (``relay.embedded.EmbeddedRedis``), an upstream sink (Postfix's
``smtp-sink`` when installed, else ``bench/sink.py``) and the relay as a subprocess
(``python -m relay serve -c ...``, with ``smtp.workers`` 2 and 1). Load comes from
Postfix's ``smtp-source`` when installed (else ``bench/loadgen.py``), 4 KB messages, in
two shapes (persistent sessions; a new connection per message), each driver in its own
process; throughput is swept over session counts (and, for Postfix, its settings) and
the best point reported. Latency always comes from ``bench/loadgen.py``, 20 sessions.
The same load also goes straight to the sink (the baseline) and, when Postfix and
OpenDKIM are installed (``bash bench/install-postfix.sh``), through a throwaway
Postfix relay and Postfix + OpenDKIM (RSA-2048) on loopback ports. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import spy  # noqa: E402
import yaml  # noqa: E402
from mta import (  # noqa: E402
    CONNECTION,
    PERSISTENT,
    SHAPES,
    SMTPD_MAXPROC,
    BenchError,
    DriverResult,
    Load,
    OpenDkim,
    PostfixInstance,
    Sink,
    copies_per_message_postfix,
    postfix_available,
    run_loadgen,
    run_smtp_source,
    stop_process,
)

from relay.cli.keygen import dkim_keygen, token_keygen  # noqa: E402
from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402
from relay.suppression.store import SuppressionStore, group_scope  # noqa: E402

RSA_FROM = "news@rsa.bench.test"
ED_FROM = "news@ed.bench.test"
TX_FROM = "receipts@tx.bench.test"
RCPT = "rcpt@bench.test"
GROUP = "newsletter"
KEY_PREFIX = "ocr"
# Suppressed recipients: every 1000th address the drivers generate (<n>rcpt@bench.test,
# n = 1000, 2000, ... 1,000,000), so 0.1 % of marketing recipients are dropped, the same
# ones at 1k and at 1M entries. The 1M set adds 999,000 addresses nobody sends to.
POSTFIX_SECONDS = 4.0  # shortest throughput phase through Postfix (3 s with --quick)
QUIET_SHARE = 0.10  # other processes above this share of the CPU disturb the figures
HIT_EVERY = 1000
# the relay scenarios with a Postfix target: both shapes and the session sweep (largest W)
SHAPED = ("tx-1", "mkt-rsa-1", "milter-rsa-1")
LATENCY_SESSIONS = 20  # the latency phases' concurrency, whatever the throughput sweep found
SHAPE_TITLES = {PERSISTENT: "persistent", CONNECTION: "per-message connection"}
# Postfix settings the baselines are swept over (with the session counts below): Postfix's
# defaults, then without its sender throttling (in_flow_delay) and with process and
# connection limits out of the way, then also more parallel deliveries to the sink.
POSTFIX_PROFILES: dict[str, dict[str, str]] = {
    "defaults": {},
    "no-throttle": {
        "in_flow_delay": "0",
        "default_process_limit": "250",
        SMTPD_MAXPROC: "250",
        "smtpd_client_connection_count_limit": "0",
        "smtpd_client_connection_rate_limit": "0",
        "smtpd_peername_lookup": "no",
        "smtpd_error_sleep_time": "0",
    },
}
POSTFIX_PROFILES["wide"] = POSTFIX_PROFILES["no-throttle"] | {
    "default_destination_concurrency_limit": "100",
    "smtp_destination_concurrency_limit": "100",
    "initial_destination_concurrency": "100",
}
# (profile, sessions) points; --quick: two of them
POSTFIX_SWEEP = [("defaults", 20), ("no-throttle", 20), ("no-throttle", 100), ("wide", 100)]
POSTFIX_SWEEP_QUICK = [("defaults", 20), ("no-throttle", 100)]
RELAY_SESSIONS = [20, 100]  # the session counts of the Postfix sweep: the same set
RELAY_SESSIONS_QUICK = [20, 100]
HOST_CORES = 8  # the relay host the sizing table assumes
REDIS_HEADROOM = 0.5  # share of one saturated Redis core the sizing table counts on
HIT_ENTRIES = 1000
BIG_SET = 1_000_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# CPU accounting


def machine_busy() -> float:
    """CPU seconds the whole machine (all cores, all processes) was not idle, since boot.

    Taken as cores x uptime minus idle and iowait: /proc/stat's user/system columns are
    sampled at timer ticks and, on this tickless VM, miss most short bursts (a milter
    or an SMTP server waking for a millisecond), while idle time is measured exactly.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    idle, iowait = fields[3], fields[4]
    return (os.cpu_count() or 1) * uptime - (idle + iowait) / CLK_TCK


def all_processes() -> dict[int, tuple[int, float, float]]:
    """pid -> (parent pid, own CPU seconds, CPU seconds of its reaped children)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                f = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                own = (int(f[11]) + int(f[12])) / CLK_TCK  # utime, stime
                kids = (int(f[13]) + int(f[14])) / CLK_TCK  # cutime, cstime
                out[int(entry)] = (int(f[1]), own, kids)
    return out


def cpu_by_group(roots: dict[int, str]) -> dict[str, float]:
    """CPU seconds used so far, by group, from one pass over /proc.

    The bench's process tree: each child of the bench belongs to the group ``roots``
    names for it (relay, redis, sink, postfix, opendkim) or to "other", with all its
    descendants; a process's reaped children count through its cutime/cstime. The
    bench's own reaped children are the load drivers (smtp-source, loadgen): "driver";
    the bench itself is "bench". Outside the tree: kernel threads ("kthreads") and
    everything else ("foreign": someone else's work on a shared machine).
    """
    procs = all_processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"bench": me.ru_utime + me.ru_stime, "driver": kids.ru_utime + kids.ru_stime}
    mine = {os.getpid()}
    todo = [(c, roots.get(c, "other")) for c in children.get(os.getpid(), [])]
    while todo:
        pid, group = todo.pop()
        mine.add(pid)
        _, own, reaped = procs[pid]
        out[group] = out.get(group, 0.0) + own + reaped
        todo.extend((c, group) for c in children.get(pid, []))
    out["kthreads"] = out["foreign"] = 0.0
    for pid, (ppid, own, reaped) in procs.items():
        if pid not in mine:
            out["kthreads" if 2 in (pid, ppid) else "foreign"] += own + reaped
    return out


class CpuMeter:
    """CPU over one phase: the machine (/proc/stat) and every process by group.

    "ours" is the machine minus foreign processes: the bench's processes plus the
    kernel's work not charged to a process (network softirqs, kernel threads), which on
    a quiet machine is the machine total. That is the table's CPU per message.
    """

    def __init__(self, roots: dict[int, str]) -> None:
        self.roots = roots
        self.machine = machine_busy()
        self.start = cpu_by_group(roots)

    def stop(self) -> dict[str, float]:
        end = cpu_by_group(self.roots)
        machine = machine_busy() - self.machine
        out = {k: v - self.start.get(k, 0.0) for k, v in end.items()}
        tree = sum(v for k, v in out.items() if k not in ("kthreads", "foreign"))
        foreign = out.pop("foreign")
        out.pop("kthreads")  # part of "kernel", with the softirq time no process is charged
        out["kernel"] = machine - tree - foreign
        out["foreign"] = foreign
        out["tree"] = tree
        out["machine"] = machine
        out["ours"] = machine - out["foreign"]
        return out


def outside_share(seconds: float) -> float:
    """Share of the machine's CPU that other processes used over ``seconds``."""
    meter = CpuMeter({})
    time.sleep(seconds)
    return max(0.0, meter.stop()["foreign"]) / (seconds * (os.cpu_count() or 1))


# ---------------------------------------------------------------------------
# Results


@dataclass
class Phase:
    """One driver run and what the sink saw."""

    messages: int = 0
    failed: int = 0
    elapsed: float = 0.0
    delivered_elapsed: float = 0.0
    copies_expected: int = 0
    copies_seen: int = 0
    suppressed: int = 0
    machine_cpu: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds by process group: relay, redis, sink, postfix, driver, other."""
    latency: dict[str, float | None] | None = None
    errors: list[str] = field(default_factory=list)
    redis: dict[str, int] = field(default_factory=dict)
    """Redis commands the phase cost (INFO commandstats/stats/cpu deltas): "total", "reads"
    (read events, about one per round trip), "cpu_us" (the server's CPU), and calls by
    command."""

    @property
    def busy_share(self) -> float:
        """Share of the machine's CPU (all cores x elapsed) busy during the phase."""
        if not self.delivered_elapsed:
            return 0.0
        return self.cpu.get("machine", 0.0) / (self.delivered_elapsed * (os.cpu_count() or 1))

    @property
    def outside_share(self) -> float:
        """Share of the machine's CPU used outside the bench's processes in this phase."""
        if not self.delivered_elapsed or not self.cpu:
            return 0.0
        return max(0.0, self.cpu.get("foreign", 0.0)) / (
            self.delivered_elapsed * (os.cpu_count() or 1)
        )

    @property
    def relay_cpu(self) -> float:
        return self.cpu.get("relay", 0.0)

    @property
    def accepted_rate(self) -> float:
        return self.messages / self.elapsed if self.elapsed else 0.0

    @property
    def delivered_rate(self) -> float:
        return self.messages / self.delivered_elapsed if self.delivered_elapsed else 0.0

    @property
    def copies_rate(self) -> float:
        return self.copies_seen / self.delivered_elapsed if self.delivered_elapsed else 0.0


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    sender: str
    rcpts: int
    marketing: bool
    entries: int = HIT_ENTRIES  # suppression list size
    milter: bool = False  # through Postfix with the relay as its milter

    @property
    def base_id(self) -> str:
        return self.id.split("@")[0]


@dataclass
class Row:
    id: str
    title: str
    kind: str  # "baseline" or "relay"
    path: str
    rcpts: int
    shape: str = PERSISTENT
    sessions: int = LATENCY_SESSIONS  # of the throughput figure (the sweep's best point)
    setting: str = ""  # the sweep point's name, e.g. "no-throttle, 100 sessions"
    workers: int = 0
    suppression_entries: int = 0
    throughput: Phase | None = None
    closed: Phase | None = None
    half: Phase | None = None
    half_baseline: Phase | None = None
    loop_lag_max: float | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)
    relay_counts: dict[str, float] = field(default_factory=dict)
    signed_lines: dict[str, int] = field(default_factory=dict)
    log_problems: list[str] = field(default_factory=list)
    profile: str | None = None
    errors: list[str] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    sweep: list[dict[str, Any]] = field(default_factory=list)
    """Every throughput point measured for this row (the best one is ``throughput``)."""

    def accepted(self) -> float:
        return self.throughput.accepted_rate if self.throughput else 0.0

    def delivered(self) -> float:
        return self.throughput.delivered_rate if self.throughput else 0.0

    def cpu_us(self) -> float | None:
        t = self.throughput
        return t.machine_cpu / t.messages * 1e6 if t and t.messages else None

    def relay_cpu_us(self) -> float | None:
        t = self.throughput
        return t.relay_cpu / t.messages * 1e6 if t and t.messages and t.relay_cpu else None

    def redis_per_message(self) -> dict[str, float]:
        t = self.throughput
        if not t or not t.messages or not t.redis:
            return {}
        return {k: v / t.messages for k, v in t.redis.items()}

    def redis_cpu_us_per_op(self) -> float | None:
        """Redis's CPU (its INFO cpu, the server process alone) per command processed."""
        t = self.throughput
        ops = t.redis.get("total", 0) if t else 0
        return t.redis.get("cpu_us", 0) / ops if t and ops else None

    @property
    def label(self) -> str:
        """The row's id with what tells its runs apart: shape, workers."""
        w = f" W={self.workers}" if self.kind == "relay" else ""
        return f"{self.id}{w} {self.shape}"


# ---------------------------------------------------------------------------
# Redis


def redis_command(sock: socket.socket, *parts: bytes) -> bytes:
    sock.sendall(_resp(parts))
    return _read_reply(sock)


def _resp(parts: tuple[bytes, ...] | list[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise BenchError("redis closed the connection")
        data += chunk
        if data.startswith(b"$"):
            size, _, rest = data[1:].partition(b"\r\n")
            if len(rest) >= int(size) + 2:
                return rest[: int(size)]
        elif data.endswith(b"\r\n"):
            return data


def redis_memory(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port)) as s:
        info = redis_command(s, b"INFO", b"memory").decode()
    m = re.search(r"^used_memory:(\d+)", info, re.M)
    assert m is not None
    return int(m.group(1))


def redis_counters(port: int) -> dict[str, int]:
    """Commands processed so far: "total", "reads", calls by command (lower case), and
    "cpu_us", the server's own CPU time (getrusage: finer than /proc's clock ticks)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        info = redis_command(s, b"INFO", b"commandstats", b"stats", b"cpu").decode()
    out = {"total": 0, "reads": 0, "cpu_us": 0}
    for line in info.splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_") :].partition(":")
            m = re.search(r"calls=(\d+)", rest)
            if m:
                out[name] = int(m.group(1))
        elif line.startswith("total_commands_processed:"):
            out["total"] = int(line.split(":")[1])
        elif line.startswith("total_reads_processed:"):
            out["reads"] = int(line.split(":")[1])
        elif line.startswith(("used_cpu_sys:", "used_cpu_user:")):
            out["cpu_us"] += round(float(line.split(":")[1]) * 1e6)
    return out


REDIS_TOTALS = ("total", "reads", "cpu_us")


def redis_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What happened between two ``redis_counters``, without the bench's own INFO."""
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    info = out.pop("info", 0)  # the first INFO (the second is counted after its reply)
    out["total"] -= info
    out["reads"] -= info
    return {k: v for k, v in out.items() if v > 0 or k in REDIS_TOTALS}


def load_suppressions(port: int, addresses: Iterator[str], count: int) -> float:
    """HSET the entries over one pipelined connection, 10,000 commands per write."""
    import redis as redis_lib

    store = SuppressionStore(redis_lib.Redis(), KEY_PREFIX)  # only .key() is used: no I/O
    field_name = f"{group_scope(GROUP)}|unsubscribe".encode()
    value = f"{int(time.time())}|0|bench".encode()
    started = time.perf_counter()
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        while sent < count:
            batch = []
            for _ in range(min(10_000, count - sent)):
                key = store.key(next(addresses)).encode()
                batch.append(_resp((b"HSET", key, field_name, value)))
            sock.sendall(b"".join(batch))
            replies = b""
            while replies.count(b"\r\n") < len(batch):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise BenchError("redis closed the connection while loading")
                replies += chunk
            if b"-" in replies:
                raise BenchError(f"redis refused a HSET: {replies[:200]!r}")
            sent += len(batch)
    return time.perf_counter() - started


def hit_addresses() -> Iterator[str]:
    return (f"{k * HIT_EVERY}{RCPT}" for k in range(1, HIT_ENTRIES + 1))


def filler_addresses() -> Iterator[str]:
    return (f"nobody{i}@bulk.bench.test" for i in range(BIG_SET))


def suppressed_in(first: int, count: int) -> int:
    """How many of the recipients numbered first .. first+count-1 are on the list."""
    if count <= 0:
        return 0
    last = first + count - 1
    low = math.ceil(first / HIT_EVERY)
    high = min(last // HIT_EVERY, HIT_ENTRIES)
    return max(0, high - low + 1)


# ---------------------------------------------------------------------------
# The relay under test


class RelayProc:
    def __init__(
        self,
        folder: Path,
        workers: int,
        sink_port: int,
        redis_url: str,
        keys: dict[str, Path],
        source: Path = REPO,
        milter_port: int = 0,
    ) -> None:
        """``milter_port``: also listen as a milter there; ``sink_port`` is then the
        Postfix port for re-injected copies."""
        self.folder = folder
        self.source = source  # ``python -m relay`` runs the relay/ package found here
        self.workers = workers
        self.smtp_port = free_port()
        self.http_port = free_port()
        self.log = folder / f"relay-w{workers}-{self.smtp_port}.log"
        self.config = folder / f"relay-w{workers}.yaml"
        self._proc: subprocess.Popen[bytes] | None = None
        rsa_key, ed_key = str(keys["rsa"]), str(keys["ed"])
        raw = {
            "smtp": {
                "listen": f"127.0.0.1:{self.smtp_port}",
                "workers": workers,
                "hostname": "relay.bench.local",
                "allowed_networks": ["127.0.0.0/8"],
            },
            "upstream": {"host": "127.0.0.1", "port": sink_port, "timeout": 30},
            "http": {
                "listen": f"127.0.0.1:{self.http_port}",
                "public_url": "https://unsubscribe.bench.test",
            },
            "redis": {"url": redis_url, "key_prefix": KEY_PREFIX},
            "tokens": {"keys": [{"id": "b1", "secret_file": str(keys["token"])}]},
            "dkim": [
                {"domain": "rsa.bench.test", "selector": "b2048", "private_key_file": rsa_key},
                {"domain": "ed.bench.test", "selector": "bed", "private_key_file": ed_key},
            ],
            "policy": {
                "default_class": "transactional",
                "groups": {
                    GROUP: {"display_name": "Bench news", "list_id": "Bench <news.bench.test>"}
                },
                "senders": [
                    {"match": RSA_FROM, "class": "marketing", "group": GROUP},
                    {"match": ED_FROM, "class": "marketing", "group": GROUP},
                    {"match": TX_FROM, "class": "transactional"},
                ],
            },
        }  # fmt: skip
        if milter_port:
            raw["milter"] = {"listen": f"127.0.0.1:{milter_port}"}
        self.config.write_text(yaml.safe_dump(raw, sort_keys=False))

    def start(self, timeout: float = 60.0) -> RelayProc:
        with self.log.open("wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "-c", str(self.config)],
                cwd=self.source,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BenchError(f"relay exited {self._proc.returncode}: {self.tail()}")
            if self.log.read_bytes().count(b"relay started") >= self.workers:
                return self
            time.sleep(0.05)
        raise BenchError(f"relay did not start in {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def scrape(self, expected_messages: int, tries: int = 60) -> list[dict[str, float]]:
        """/metrics. The relay sums its workers' values (prometheus multiprocess mode); an
        older relay answered per worker, and SO_REUSEPORT hands each new connection to some
        worker: then scrape until the workers' message counts add up to what was sent."""
        seen: dict[tuple[tuple[str, float], ...], dict[str, float]] = {}
        for _ in range(tries):
            url = f"http://127.0.0.1:{self.http_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                metrics = parse_metrics(resp.read().decode())
            if messages_counted(metrics) == expected_messages:
                return [metrics]
            identity = tuple(
                sorted(
                    (k, v)
                    for k, v in metrics.items()
                    if k.startswith(("oneclick_messages_total", "oneclick_stage_seconds_count"))
                )
            )
            seen[identity] = metrics
            if sum(messages_counted(m) for m in seen.values()) == expected_messages:
                break
        return list(seen.values())

    def problems(self) -> tuple[list[str], dict[str, int]]:
        """WARNING/ERROR lines of the relay log, and how many messages each key signed."""
        problems: list[str] = []
        signed: dict[str, int] = {}
        level = re.compile(rb"^\S+ \S+ (WARNING|ERROR|CRITICAL) |Traceback")
        dkim = re.compile(rb" dkim=(\S+) reply=")
        # ed.bench.test is Ed25519-only on purpose (its own scenario): that start warning
        # is expected; any other WARNING line is a problem.
        expected = b"config warning: policy.senders[1]: ed.bench.test has only Ed25519"
        with self.log.open("rb") as f:
            for line in f:
                if level.search(line) and expected not in line:
                    if len(problems) < 20:
                        problems.append(line.decode(errors="replace").strip())
                    continue
                m = dkim.search(line)
                if m:
                    key = m.group(1).decode()
                    signed[key] = signed.get(key, 0) + 1
        return problems, signed

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()


def messages_counted(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("oneclick_messages_total"))


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1)] = float(m.group(2))
    return out


def summarize_metrics(
    snapshots: list[dict[str, float]],
) -> tuple[float, dict[str, float], dict[str, float]]:
    """Worst loop lag, mean ms per pipeline stage, and counters summed over the workers."""
    lag = max((s.get("oneclick_event_loop_lag_max_seconds", 0.0) for s in snapshots), default=0)
    sums: dict[str, float] = {}
    for s in snapshots:
        for k, v in s.items():
            if k.startswith(
                (
                    "oneclick_stage_seconds_sum",
                    "oneclick_stage_seconds_count",
                    "oneclick_messages_total",
                    "oneclick_recipients_total",
                    "oneclick_rejected_total",
                    "oneclick_redis_errors_total",
                    "oneclick_upstream_replies_total",
                )
            ):
                sums[k] = sums.get(k, 0.0) + v
    stages = {}
    for k, v in sums.items():
        m = re.match(r'oneclick_stage_seconds_sum\{stage="([^"]+)"\}', k)
        if m:
            n = sums.get(f'oneclick_stage_seconds_count{{stage="{m.group(1)}"}}', 0)
            if n:
                stages[m.group(1)] = v / n * 1000
    counts = {k: v for k, v in sums.items() if not k.startswith("oneclick_stage_seconds")}
    return lag, stages, counts


# ---------------------------------------------------------------------------
# The bench


@dataclass
class Settings:
    quick: bool
    duration: float  # throughput phase
    latency: float  # closed-loop latency phase
    half: float  # half-rate phases
    workers: list[int]
    postfix: bool
    smtp_source: bool
    only: set[str] | None
    wait_quiet: float = 30.0  # seconds the whole run may wait for other load to stop
    profile: Path | None = None  # py-spy output folder
    relay_dir: Path = REPO  # where ``python -m relay`` finds the package under test
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    sessions: list[int] = field(default_factory=lambda: list(RELAY_SESSIONS))
    """The relay's throughput sweep (at the largest W, 1-recipient scenarios)."""
    postfix_sweep: list[tuple[str, int]] = field(default_factory=lambda: list(POSTFIX_SWEEP))


class Bench:
    def __init__(self, settings: Settings, folder: Path) -> None:
        self.s = settings
        self.folder = folder
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.redis: EmbeddedRedis | None = None
        self.redis_big: EmbeddedRedis | None = None
        self.sink: Sink | None = None
        self.postfix: PostfixInstance | None = None
        self.opendkim: OpenDkim | None = None
        self.relay: RelayProc | None = None
        self.keys: dict[str, Path] = {}
        self.redis_info: dict[str, float] = {}
        self.baselines: dict[tuple[str, int, str], Row] = {}
        self.best_sessions: dict[tuple[str, int, str], int] = {}
        self.best_profile: dict[tuple[str, str], str] = {}  # Postfix's, per (path, shape)
        self.version = relay_version(settings.relay_dir)
        self.uvloop = uvloop_importable(settings.relay_dir)
        self.sign_floor: dict[str, float] = {}
        """Seconds of CPU per signature, by algorithm (cryptography, one core, this machine)."""
        self.quiet_budget = settings.wait_quiet

    # -- setup ---------------------------------------------------------------

    def setup(self) -> None:
        keys = self.folder / "keys"
        self.keys["rsa"], _ = dkim_keygen("rsa.bench.test", "b2048", "rsa", 2048, keys)
        self.keys["ed"], _ = dkim_keygen("ed.bench.test", "bed", "ed25519", 0, keys)
        self.keys["token"] = keys / "token-b1.key"
        token_keygen(self.keys["token"])
        self.sign_floor = signature_floor(self.keys)
        log(
            "signature floor: "
            + ", ".join(f"{k} {v * 1e6:.0f} µs" for k, v in self.sign_floor.items())
        )

        self.redis = EmbeddedRedis().start()
        log(f"redis: {self.redis.binary} on port {self.redis.port}")
        before = redis_memory(self.redis.port)
        load_suppressions(self.redis.port, hit_addresses(), HIT_ENTRIES)
        after = redis_memory(self.redis.port)
        self.redis_info.update(
            empty_bytes=before, entries_1k=HIT_ENTRIES, used_1k_bytes=after,
            per_address_1k_bytes=(after - before) / HIT_ENTRIES,
        )  # fmt: skip

        if any(sc.entries == BIG_SET for sc in self.scenarios()):
            self.redis_big = EmbeddedRedis().start()
            port = self.redis_big.port
            log(f"loading {BIG_SET:,} suppression entries into a second redis on port {port}")
            empty = redis_memory(port)
            took = load_suppressions(port, hit_addresses(), HIT_ENTRIES)
            took += load_suppressions(port, filler_addresses(), BIG_SET - HIT_ENTRIES)
            used = redis_memory(port)
            self.redis_info.update(
                entries_1m=BIG_SET, used_1m_bytes=used, load_seconds=took,
                per_address_1m_bytes=(used - empty) / BIG_SET,
            )  # fmt: skip
            log(f"  loaded in {took:.1f} s; used_memory {used / 2**20:.0f} MiB")

        self.sink = Sink(free_port(), prefer_postfix=self.s.postfix or self.s.smtp_source).start()
        log(f"sink: {self.sink.kind} on port {self.sink.port}")

        if self.s.postfix:
            pf_dir = self.folder / "postfix"
            pf_dir.mkdir()
            # the postfix and opendkim users must reach their files (keys stay 0600)
            os.chmod(self.folder, 0o755)  # noqa: S103
            dkim_dir = self.folder / "opendkim"
            pf_key, _ = dkim_keygen("rsa.bench.test", "pf2048", "rsa", 2048, dkim_dir)
            self.opendkim = OpenDkim(
                dkim_dir, pf_key, "pf2048", ["rsa.bench.test", "ed.bench.test", "tx.bench.test"]
            ).start()
            self.postfix = PostfixInstance(
                pf_dir,
                self.sink.port,
                free_port(),
                free_port(),
                self.opendkim.milter,
                oneclick_port=free_port(),
                oneclick_milter_port=free_port(),
                reinject_port=free_port(),
            ).start()
            log(
                f"postfix: relay on {self.postfix.plain_port}, with OpenDKIM (milter"
                f" {self.opendkim.milter}) on {self.postfix.dkim_port}, with oneclick-relay's"
                f" milter on {self.postfix.oneclick_port}; queue in {self.postfix.queue}"
            )

    def teardown(self) -> None:
        for stop in (
            lambda: self.relay.stop() if self.relay else None,
            lambda: self.postfix.stop() if self.postfix else None,
            lambda: self.opendkim.stop() if self.opendkim else None,
            lambda: self.sink.stop() if self.sink else None,
            lambda: self.redis.stop() if self.redis else None,
            lambda: self.redis_big.stop() if self.redis_big else None,
        ):
            try:
                stop()
            except Exception as exc:  # keep stopping the rest
                log(f"teardown: {type(exc).__name__}: {exc}")

    # -- driving load ----------------------------------------------------------

    def roots(self) -> dict[int, str]:
        """The bench's direct children whose CPU is reported by name."""
        out: dict[int, str] = {}
        for redis in (self.redis, self.redis_big):
            proc = getattr(redis, "_proc", None)
            if proc is not None:
                out[proc.pid] = "redis"
        if self.sink is not None:
            out[self.sink.pid] = "sink"
        if self.relay is not None and self.relay.pid:
            out[self.relay.pid] = "relay"
        if self.opendkim is not None and self.opendkim.pid:
            out[self.opendkim.pid] = "opendkim"
        if self.postfix is not None and (master := self.postfix.master_pid()):
            out[master] = "postfix"
        return out

    def wait_quiet(self) -> None:
        """Wait (within the run's budget) until other processes leave the CPU to the bench."""
        if self.quiet_budget <= 0:
            return  # rows measured under load are still flagged in the report
        waited = False
        while True:
            share = outside_share(0.25)
            if share < QUIET_SHARE:
                break
            if self.quiet_budget <= 0:
                log(f"  other processes use {share:.0%} of the CPU; measuring anyway")
                break
            if not waited:
                log(f"  other processes use {share:.0%} of the CPU; waiting for a quiet machine")
                waited = True
            time.sleep(1.5)
            self.quiet_budget -= 2.0

    def drive(self, port: int, load: Load, count: int) -> DriverResult:
        timeout = 120.0 + count / 50
        if self.s.smtp_source:
            return run_smtp_source(port, load, count, timeout)
        return run_loadgen(port, load, count=count, timeout=timeout)

    def phase(
        self,
        port: int,
        load: Load,
        copies: Callable[[DriverResult], tuple[int, int]],
        *,
        count: int = 0,
        duration: float = 0.0,
        rate: float = 0.0,
        latency: bool = False,
        queue: PostfixInstance | None = None,
        redis_port: int = 0,
    ) -> Phase:
        """Run one load, wait until every expected copy reached the sink, and account CPU
        (and, with ``redis_port``, the Redis commands)."""
        sink = self.sink
        assert sink is not None
        base = sink.settle(quiet=0.05)
        redis_before = redis_counters(redis_port) if redis_port else {}
        meter = CpuMeter(self.roots())
        if latency:
            res = run_loadgen(port, load, duration=duration, rate=rate, count=count)
        else:
            res = self.drive(port, load, count)
        t_acc = time.perf_counter()
        expected, suppressed = copies(res)
        already = sink.messages - base >= expected
        reached = sink.wait_for(base + expected, timeout=60 + expected / 100)
        t_dlv = t_acc if already else time.perf_counter()
        cpu = meter.stop()
        redis_ops = redis_delta(redis_before, redis_counters(redis_port)) if redis_port else {}
        phase = Phase(
            messages=res.ok,
            failed=res.failed,
            elapsed=res.elapsed,
            # the driver's own clock (no process start-up), plus however long the last
            # copies took to reach the sink after the driver was done (Postfix's queue)
            delivered_elapsed=res.elapsed + (t_dlv - t_acc),
            copies_expected=expected,
            suppressed=suppressed,
            machine_cpu=cpu["ours"],
            cpu=cpu,
            latency=res.latency,
            errors=list(res.errors),
            redis=redis_ops,
        )
        if queue is not None and not queue.wait_empty(60):
            phase.errors.append(f"postfix queue not empty: {queue.queued()} left")
        seen = sink.settle(quiet=0.1) - base
        phase.copies_seen = seen
        if not reached or seen != expected:
            phase.errors.append(f"sink received {seen} copies, expected {expected}")
        if queue is not None and queue.deferred():
            phase.errors.append(f"postfix deferred {queue.deferred()} messages")
        if res.failed:
            phase.errors.append(f"{res.failed} messages failed")
        return phase

    def calibrate(
        self,
        port: int,
        load: Load,
        copies: Callable[[DriverResult], tuple[int, int]],
        seconds: float | None = None,
        **kw: Any,
    ) -> int:
        """Warm up and estimate the rate; returns the message count for a throughput run of
        ``seconds`` (default ``--duration``)."""
        count = max(20, 100 // load.rcpts, load.sessions * 2)
        while True:
            p = self.phase(port, load, copies, count=count, **kw)
            if p.errors:
                raise BenchError(f"warm-up failed: {p.errors}")
            if p.delivered_elapsed >= (0.25 if self.s.quick else 0.4) or count >= 100_000:
                break
            count *= 4
        rate = count / p.delivered_elapsed
        return max(40, int(rate * (seconds or self.s.duration)))

    # -- baselines -------------------------------------------------------------

    def run_baselines(self) -> None:
        assert self.sink is not None
        rcpt_counts = sorted({sc.rcpts for sc in self.scenarios()})
        for rcpts in rcpt_counts:
            for shape in self.shapes_for(rcpts):
                load = Load(RSA_FROM, rcpts, sessions=LATENCY_SESSIONS, shape=shape)
                row = Row(
                    id=f"sink-{rcpts}", title=f"straight to {self.sink.kind}", kind="baseline",
                    path="sink", rcpts=rcpts, shape=shape, setting=f"{LATENCY_SESSIONS} sessions",
                )  # fmt: skip
                one_copy = lambda r: (r.ok, 0)  # noqa: E731
                count = self.calibrate(self.sink.port, load, one_copy)
                row.throughput = self.phase(self.sink.port, load, one_copy, count=count)
                row.closed = self.phase(
                    self.sink.port, load, one_copy, duration=self.s.latency, latency=True
                )
                self.finish_row(row)
                self.baselines[("sink", rcpts, shape)] = row

        if not self.s.postfix:
            return
        for rcpts in rcpt_counts:
            if rcpts > 1 and self.s.quick:
                continue
            self.run_postfix_baselines(rcpts)

    def run_postfix_baselines(self, rcpts: int) -> None:
        """Both Postfix listeners, each shape, over the sweep (1 recipient; 100: Postfix's
        defaults at 20 sessions); the row reports the best point, and its latency."""
        pf = self.postfix
        assert pf is not None
        paths = (
            ("postfix", pf.plain_port, "Postfix relay"),
            ("postfix+dkim", pf.dkim_port, "Postfix + OpenDKIM rsa-2048"),
        )
        shapes = self.shapes_for(rcpts)
        points = self.s.postfix_sweep if rcpts == 1 else [("defaults", LATENCY_SESSIONS)]
        per = copies_per_message_postfix(rcpts)
        copies = lambda r: (r.ok * per, 0)  # noqa: E731
        # a queueing MTA needs seconds to show its steady state: with its defaults Postfix
        # throttles clients for up to in_flow_delay (1 s) when its queue manager falls behind
        seconds = max(self.s.duration, POSTFIX_SECONDS * (0.75 if self.s.quick else 1))
        measured: dict[tuple[str, str], list[tuple[str, int, Phase]]] = {}
        for profile in dict.fromkeys(name for name, _ in points):  # one reload per profile
            pf.tune(POSTFIX_PROFILES[profile])
            for path, port, _ in paths:
                for shape in shapes:
                    for name, sessions in points:
                        if name != profile:
                            continue
                        load = Load(RSA_FROM, rcpts, sessions=sessions, shape=shape)
                        count = self.calibrate(port, load, copies, seconds, queue=pf)
                        ph = self.phase(port, load, copies, count=count, queue=pf)
                        log(
                            f"  sweep {path}-{rcpts} {shape} {profile} {sessions} sessions:"
                            f" {ph.delivered_rate:.0f} msg/s, machine busy {ph.busy_share:.0%}"
                            f" (others {ph.outside_share:.0%})"
                        )
                        measured.setdefault((path, shape), []).append((profile, sessions, ph))
        for path, port, title in paths:
            for shape in shapes:
                tried = measured[(path, shape)]
                profile, sessions, best = best_point(tried)
                if rcpts == 1:
                    self.best_profile[(path, shape)] = profile
                row = Row(
                    id=f"{path}-{rcpts}", title=title, kind="baseline", path=path, rcpts=rcpts,
                    shape=shape, sessions=sessions, setting=f"{profile}, {sessions} sessions",
                    throughput=best,
                )  # fmt: skip
                row.sweep = [
                    sweep_point(ph, sessions=n, profile=name, postfix=POSTFIX_PROFILES[name])
                    for name, n, ph in tried
                ]
                for name, n, ph in tried:
                    if ph is not best:
                        row.errors.extend(f"sweep {name}, {n} sessions: {e}" for e in ph.errors)
                if not self.s.quick:
                    pf.tune(POSTFIX_PROFILES[profile])
                    load = Load(RSA_FROM, rcpts, sessions=LATENCY_SESSIONS, shape=shape)
                    row.closed = self.phase(
                        port, load, copies, duration=self.s.latency, latency=True, queue=pf
                    )
                self.finish_row(row)
                self.baselines[(path, rcpts, shape)] = row

    def shapes_for(self, rcpts: int, sc: Scenario | None = None, workers: int = 0) -> list[str]:
        """Both shapes for the 1-recipient baselines and the relay scenarios with a Postfix
        target (at the largest W); the others keep their connections."""
        if rcpts == 1 and (sc is None or (sc.id in SHAPED and workers == max(self.s.workers))):
            return list(self.s.shapes)
        return [PERSISTENT] if PERSISTENT in self.s.shapes else list(self.s.shapes)[:1]

    # -- relay scenarios -------------------------------------------------------

    def scenarios(self) -> list[Scenario]:
        """In run order. Each @1M scenario runs right after its 1k twin, against a second
        Redis holding the same 1,000 entries plus 999,000 others, so the pair compares
        the list size and little else."""
        one_k = [
            Scenario("tx-1", "transactional, 1 rcpt (unsigned)", TX_FROM, 1, False),
            Scenario("mkt-rsa-1", "marketing, 1 rcpt, RSA-2048", RSA_FROM, 1, True),
            Scenario("mkt-ed25519-1", "marketing, 1 rcpt, Ed25519", ED_FROM, 1, True),
            Scenario("mkt-rsa-100", "marketing, 100 rcpts fan-out, RSA-2048", RSA_FROM, 100, True),
        ]
        if self.s.postfix:
            title = "Postfix + oneclick milter: marketing, 1 rcpt, RSA-2048"
            one_k.append(Scenario("milter-rsa-1", title, RSA_FROM, 1, True, milter=True))
        every: list[Scenario] = []
        for sc in one_k:
            every.append(sc)
            if sc.id == "mkt-rsa-1" or (sc.id == "mkt-rsa-100" and not self.s.quick):
                every.append(
                    replace(
                        sc, id=sc.id + "@1M", title=sc.title + ", 1M suppressed", entries=BIG_SET
                    )
                )
        if self.s.only:
            every = [sc for sc in every if sc.id in self.s.only or sc.base_id in self.s.only]
        return every

    def run_relay(self, workers: int) -> None:
        assert self.sink is not None
        for sc in self.scenarios():
            for shape in self.shapes_for(sc.rcpts, sc, workers):
                self.run_relay_row(sc, workers, shape)

    def run_relay_row(self, sc: Scenario, workers: int, shape: str) -> None:
        assert self.sink is not None
        row = Row(
            id=sc.id, title=sc.title, kind="relay", path="milter" if sc.milter else "relay",
            rcpts=sc.rcpts, shape=shape, workers=workers, suppression_entries=sc.entries,
        )  # fmt: skip
        redis = self.redis_big if sc.entries == BIG_SET else self.redis
        assert redis is not None
        self.wait_quiet()
        log(f"relay w={workers} {shape}: {sc.id} ({sc.title})")
        pf = self.postfix if sc.milter else None
        if pf is not None:  # Postfix at the settings that were best for Postfix + OpenDKIM
            profile = self.best_profile.get(("postfix+dkim", shape), "defaults")
            pf.tune(POSTFIX_PROFILES[profile])
        self.relay = relay = RelayProc(
            self.folder,
            workers,
            pf.reinject_port if pf else self.sink.port,
            redis.url,
            self.keys,
            self.s.relay_dir,
            milter_port=pf.oneclick_milter_port if pf else 0,
        ).start()
        try:
            self.run_scenario(row, relay, sc, redis.port, pf)
        finally:
            relay.stop()
            self.relay = None
        row.log_problems, row.signed_lines = relay.problems()
        self.finish_row(row)

    def relay_sessions(self, row: Row) -> list[int]:
        """The sweep for the scenarios with a Postfix target at the largest W; a @1M twin
        runs at its 1k twin's best; the others at the latency phases' 20 sessions."""
        twin = self.best_sessions.get((row.id.split("@")[0], row.workers, row.shape))
        if row.suppression_entries == BIG_SET and twin:
            return [twin]
        if row.id in SHAPED and row.workers == max(self.s.workers):
            return list(self.s.sessions)
        return [LATENCY_SESSIONS]

    def run_scenario(
        self,
        row: Row,
        relay: RelayProc,
        sc: Scenario,
        redis_port: int,
        postfix: PostfixInstance | None = None,
    ) -> None:
        """``postfix``: the load goes to Postfix, which runs the relay as its milter."""
        port = postfix.oneclick_port if postfix else relay.smtp_port
        pf: dict[str, Any] = {"queue": postfix} if postfix else {}
        hits_total = 0
        sent_total = 0
        marketing = sc.marketing

        def copies(r: DriverResult) -> tuple[int, int]:
            nonlocal hits_total, sent_total
            sent_total += r.ok
            if not marketing:
                return r.ok, 0
            hits = suppressed_in(r.recipients_from, r.recipients_used)
            hits_total += hits
            return r.recipients_used - hits, hits

        seconds = None
        if postfix is not None:  # as for the Postfix baselines: long enough for its flow control
            seconds = max(self.s.duration, POSTFIX_SECONDS * (0.75 if self.s.quick else 1))
        tried: list[tuple[int, Phase]] = []
        for i, sessions in enumerate(self.relay_sessions(row)):
            load = Load(sc.sender, sc.rcpts, sessions=sessions, shape=row.shape)
            count = self.calibrate(port, load, copies, seconds, **pf)
            sampler = None
            if i == 0 and self.s.profile is not None and relay.pid:
                out = self.s.profile / f"profile-{row.id}-w{row.workers}-{row.shape}.txt"
                sampler = spy.start(relay.pid, self.s.duration, out)
                if sampler is not None:
                    row.profile = str(out)
                    time.sleep(0.5)  # attach
            ph = self.phase(port, load, copies, count=count, redis_port=redis_port, **pf)
            tried.append((sessions, ph))
            if sampler is not None:
                try:
                    sampler.wait(self.s.duration + 30)
                except subprocess.TimeoutExpired:
                    stop_process(sampler)
        _, row.sessions, row.throughput = best_point([("", n, ph) for n, ph in tried])
        row.setting = f"{row.sessions} sessions"
        self.best_sessions[(row.id, row.workers, row.shape)] = row.sessions
        if len(tried) > 1:
            row.sweep = [sweep_point(ph, sessions=n) for n, ph in tried]
            for n, ph in tried:
                if ph is not row.throughput:
                    row.errors.extend(f"sweep {n} sessions: {e}" for e in ph.errors)
        load = Load(sc.sender, sc.rcpts, sessions=LATENCY_SESSIONS, shape=row.shape)
        row.closed = self.phase(port, load, copies, duration=self.s.latency, latency=True, **pf)
        if row.shape == PERSISTENT:  # the half-rate target is judged on this shape
            half = row.throughput.accepted_rate / 2
            row.half = self.phase(
                port, load, copies, duration=self.s.half, rate=half, latency=True, **pf
            )
            assert self.sink is not None
            row.half_baseline = self.phase(
                self.sink.port, load, lambda r: (r.ok, 0), duration=self.s.half, rate=half,
                latency=True,
            )  # fmt: skip
        snapshots = relay.scrape(sent_total)
        row.loop_lag_max, row.stages_ms, row.relay_counts = summarize_metrics(snapshots)
        row.relay_counts["client_messages"] = sent_total
        row.relay_counts["expected_suppressed"] = hits_total
        counted = sum(messages_counted(m) for m in snapshots)
        if counted != sent_total:
            row.errors.append(f"relay counted {counted:.0f} messages, clients sent {sent_total}")
        dropped = sum(
            v
            for k, v in row.relay_counts.items()
            if k.startswith("oneclick_recipients_total") and 'outcome="suppressed"' in k
        )
        if dropped != hits_total:
            row.errors.append(f"relay suppressed {dropped:.0f} recipients, expected {hits_total}")

    @staticmethod
    def phases_of(row: Row) -> list[Phase]:
        return [p for p in (row.throughput, row.closed, row.half, row.half_baseline) if p]

    def finish_row(self, row: Row) -> None:
        for p in self.phases_of(row):
            row.errors.extend(p.errors)
        row.errors.extend(row.log_problems)
        t = row.throughput
        if t:
            log(
                f"  {row.label} {row.path} ({row.setting}): {t.accepted_rate:.0f} acc/s,"
                f" {t.delivered_rate:.0f} dlv/s, {t.copies_rate:.0f} copies/s,"
                f" cpu {row.cpu_us() or 0:.0f} us/msg, errors {len(row.errors)}"
            )
        self.rows.append(row)

    # -- the whole run -----------------------------------------------------------

    def run(self) -> None:
        self.setup()
        self.wait_quiet()
        self.run_baselines()
        for workers in self.s.workers:
            self.run_relay(workers)
        self.compute_ratios()

    def compute_ratios(self) -> None:
        for row in self.rows:
            if row.kind != "relay":
                continue
            for path in ("sink", "postfix", "postfix+dkim"):
                base = self.baselines.get((path, row.rcpts, row.shape))
                if base and base.delivered():
                    row.ratios[path] = row.delivered() / base.delivered()


def best_point(tried: list[tuple[str, int, Phase]]) -> tuple[str, int, Phase]:
    """The sweep point with the highest delivered rate, among those that passed checks."""
    clean = [t for t in tried if not t[2].errors] or tried
    return max(clean, key=lambda t: t[2].delivered_rate)


def sweep_point(ph: Phase, **settings: Any) -> dict[str, Any]:
    return settings | {
        "accepted_msgs_per_s": ph.accepted_rate,
        "delivered_msgs_per_s": ph.delivered_rate,
        "machine_busy_share": ph.busy_share,
        "outside_share": ph.outside_share,
        "cpu_us_per_msg": ph.machine_cpu / ph.messages * 1e6 if ph.messages else None,
        "messages": ph.messages,
        "elapsed": ph.delivered_elapsed,
        "cpu_seconds": ph.cpu,
        "redis": ph.redis,
        "errors": ph.errors,
    }


# ---------------------------------------------------------------------------
# Report


def fmt(v: float | None, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def ms(v: float | None) -> float | None:
    return None if v is None else v * 1000


def added(row: Row, base: Row | None, key: str) -> float | None:
    if not row.closed or not row.closed.latency or base is None or not base.closed:
        return None
    mine, theirs = row.closed.latency.get(key), (base.closed.latency or {}).get(key)
    return None if mine is None or theirs is None else (mine - theirs) * 1000


def added_half(row: Row) -> float | None:
    if not row.half or not row.half_baseline:
        return None
    mine = (row.half.latency or {}).get("p99")
    theirs = (row.half_baseline.latency or {}).get("p99")
    return None if mine is None or theirs is None else (mine - theirs) * 1000


def table(bench: Bench) -> str:
    out = []
    out.append("Baselines (same load, no relay; latency is absolute, closed loop, 20 sessions)")
    out.append("")
    out.append(
        "| path | rcpts | shape | best of sweep | accepted msg/s | delivered msg/s | copies/s "
        "| machine busy | p50 ms | p99 ms | CPU µs/msg | errors |"
    )
    out.append("|---|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in bench.rows:
        if r.kind != "baseline":
            continue
        lat = (r.closed.latency if r.closed else None) or {}
        out.append(
            f"| {r.title} | {r.rcpts} | {SHAPE_TITLES[r.shape]} | {r.setting} "
            f"| {fmt(r.accepted())} | {fmt(r.delivered())} "
            f"| {fmt(r.throughput.copies_rate if r.throughput else None)} | {busy(r.throughput)} "
            f"| {fmt(ms(lat.get('p50')), 2)} | {fmt(ms(lat.get('p99')), 2)} "
            f"| {fmt(r.cpu_us())} | {len(r.errors)} |"
        )
    out.append("")
    out.append(
        "Relay (latency added = relay minus straight-to-sink at the same load; "
        "½ = open loop at half the relay's max rate)"
    )
    out.append("")
    out.append(
        "| scenario | W | shape | sessions | supp. | accepted msg/s | delivered msg/s | copies/s "
        "| machine busy | p50 +ms | p99 +ms | p99 +ms @½ | CPU µs/msg | relay µs/msg "
        "| loop lag ms | x sink | x Postfix | x Postfix+DKIM | errors |"
    )
    out.append("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in bench.rows:
        if r.kind != "relay":
            continue
        base = bench.baselines.get(("sink", r.rcpts, r.shape))
        out.append(
            f"| {r.title} | {r.workers} | {SHAPE_TITLES[r.shape]} | {r.sessions} "
            f"| {'1M' if r.suppression_entries > 1000 else '1k'} "
            f"| {fmt(r.accepted())} | {fmt(r.delivered())} "
            f"| {fmt(r.throughput.copies_rate if r.throughput else None)} | {busy(r.throughput)} "
            f"| {fmt(added(r, base, 'p50'), 2)} | {fmt(added(r, base, 'p99'), 2)} "
            f"| {fmt(added_half(r), 2)} | {fmt(r.cpu_us())} | {fmt(r.relay_cpu_us())} "
            f"| {fmt(ms(r.loop_lag_max), 1)} | {fmt(r.ratios.get('sink'), 2)} "
            f"| {fmt(r.ratios.get('postfix'), 2)} | {fmt(r.ratios.get('postfix+dkim'), 2)} "
            f"| {len(r.errors)} |"
        )
    return "\n".join(out)


def busy(ph: Phase | None) -> str:
    return f"{ph.busy_share:.0%}" if ph and ph.cpu else "-"


def sweep_table(bench: Bench) -> str:
    """Every throughput point of the sweeps, the best of each row marked."""
    out = [
        "Sweep (throughput phase at each setting; the best per row is reported above, marked *;"
        " machine busy = CPU used / (cores x elapsed): near 100 % is CPU-bound; others = the"
        " part of it used by processes the bench did not start: on a quiet machine 0 %)",
        "",
        "| row | shape | setting | accepted msg/s | delivered msg/s | machine busy | others "
        "| CPU µs/msg | errors |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in bench.rows:
        for pt in r.sweep:
            setting = f"{pt['sessions']} sessions"
            if "profile" in pt:
                setting = f"{pt['profile']}, {setting}"
            mark = " *" if setting == r.setting else ""
            w = f" W={r.workers}" if r.kind == "relay" else ""
            out.append(
                f"| {r.id}{w} | {SHAPE_TITLES[r.shape]} | {setting}{mark} "
                f"| {fmt(pt['accepted_msgs_per_s'])} | {fmt(pt['delivered_msgs_per_s'])} "
                f"| {pt['machine_busy_share']:.0%} | {pt['outside_share']:.0%} "
                f"| {fmt(pt['cpu_us_per_msg'])} "
                f"| {len(pt['errors'])} |"
            )
    used = {pt["profile"] for r in bench.rows for pt in r.sweep if "profile" in pt}
    if used:
        out.append("")
        out.append("Postfix settings of each profile (main.cf; and master.cf for smtpd maxproc):")
        for name in POSTFIX_PROFILES:
            if name in used:
                params = ", ".join(f"{k} = {v}" for k, v in POSTFIX_PROFILES[name].items())
                out.append(f"- {name}: {params or 'Postfix defaults'}")
    return "\n".join(out)


def redis_table(bench: Bench) -> tuple[str, list[dict[str, Any]]]:
    """Redis commands per message in each relay row's (best) throughput phase."""
    rows = [r for r in bench.rows if r.kind == "relay" and r.redis_per_message()]
    if not rows:
        return "", []
    commands = sorted(
        {k for r in rows for k in r.redis_per_message() if k not in REDIS_TOTALS},
        key=lambda k: -max(r.redis_per_message().get(k, 0) for r in rows),
    )
    out = [
        "Redis per message (INFO commandstats / total_commands_processed over the throughput"
        " phase; a pipeline counts each of its commands; reads = total_reads_processed, about"
        " one per round trip; Redis CPU = the server's used_cpu_sys + used_cpu_user (INFO cpu),"
        " per message and per command)",
        "",
        "| row | commands/msg | reads/msg | Redis CPU µs/msg | Redis µs/op | "
        + " | ".join(c.upper() for c in commands)
        + " |",
        "|---|--:|--:|--:|--:|" + "--:|" * len(commands),
    ]
    data = []
    for r in rows:
        per = r.redis_per_message()
        out.append(
            f"| {r.id} W={r.workers} {r.shape} | {fmt(per.get('total'), 2)} "
            f"| {fmt(per.get('reads'), 2)} | {fmt(per.get('cpu_us'), 1)} "
            f"| {fmt(r.redis_cpu_us_per_op(), 1)} | "
            + " | ".join(fmt(per.get(c), 2) for c in commands)
            + " |"
        )
        data.append(
            {"row": r.label, "per_message": per, "redis_cpu_us_per_op": r.redis_cpu_us_per_op()}
        )
    return "\n".join(out), data


def sizing(bench: Bench) -> tuple[str, list[dict[str, Any]]]:
    """Messages per hour per relay core and what a fleet asks of one Redis."""
    w = max(bench.s.workers)
    picks = [
        ("transactional, 1 rcpt", "tx-1", 1),
        ("signed marketing, 1 rcpt (RSA-2048)", "mkt-rsa-1", 1),
        ("fan-out, per delivered copy (100 rcpts, RSA-2048)", "mkt-rsa-100", 100),
    ]
    data: list[dict[str, Any]] = []
    out = [
        f"Sizing (from the W={w} rows; assumptions: relay CPU µs per message = the relay"
        " processes' CPU over the throughput phase / messages, so messages/hour per relay"
        " core = 3.6e9 / that; a relay host = "
        f"{HOST_CORES} cores all running relay workers at 100 % (the upper bound its Redis"
        " must take); Redis capacity = one Redis core saturated at the Redis CPU per command"
        f" measured here (at this load, so conservative), of which {REDIS_HEADROOM:.0%} is"
        " counted on (headroom); one instance or a Sentinel primary is one such core; a"
        " Cluster adds that capacity per shard, the suppression keys spreading by their"
        " {address} hash tag)",
        "",
        "| workload | shape | relay µs/unit | units/hour per relay core | Redis ops/unit "
        f"| Redis ops/s per {HOST_CORES}-core host | Redis µs/op | one Redis, usable ops/s "
        "| relay hosts per Redis | Cluster when |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for title, sid, per_msg in picks:
        for shape in SHAPES:
            r = find(bench, sid, w, shape)
            if not r or not r.relay_cpu_us() or not r.throughput:
                continue
            copies = (r.throughput.copies_seen / r.throughput.messages) if per_msg > 1 else 1.0
            if not copies:
                continue
            relay_us = (r.relay_cpu_us() or 0) / copies
            per_hour = 3.6e9 / relay_us
            ops = r.redis_per_message().get("total", 0.0) / copies
            host_ops = HOST_CORES * 1e6 / relay_us * ops
            op_us = r.redis_cpu_us_per_op()
            usable = REDIS_HEADROOM * 1e6 / op_us if op_us else None
            hosts = usable / host_ops if usable and host_ops else None
            per_redis_hour = usable * 3600 / ops if usable and ops else None
            cluster = (
                f"> {fmt(hosts, 1)} hosts ({fmt(per_redis_hour / 1e6, 1)}M units/h):"
                f" a shard per {fmt(hosts, 1)} hosts"
                if hosts and per_redis_hour
                else "-"
            )
            out.append(
                f"| {title} | {SHAPE_TITLES[shape]} | {fmt(relay_us)} | {fmt(per_hour)} "
                f"| {fmt(ops, 2)} | {fmt(host_ops)} | {fmt(op_us, 1)} | {fmt(usable)} "
                f"| {fmt(hosts, 1)} | {cluster} |"
            )
            data.append(
                {
                    "workload": title,
                    "scenario": sid,
                    "shape": shape,
                    "workers": w,
                    "unit": "copy" if per_msg > 1 else "message",
                    "relay_cpu_us_per_unit": relay_us,
                    "units_per_hour_per_relay_core": per_hour,
                    "redis_ops_per_unit": ops,
                    "redis_ops_per_s_per_host": host_ops,
                    "host_cores": HOST_CORES,
                    "redis_cpu_us_per_op": op_us,
                    "redis_headroom": REDIS_HEADROOM,
                    "redis_usable_ops_per_s": usable,
                    "relay_hosts_per_redis": hosts,
                    "units_per_hour_per_redis": per_redis_hour,
                }
            )
    if not data:
        return "", []
    return "\n".join(out), data


def find(bench: Bench, sid: str, workers: int, shape: str = PERSISTENT) -> Row | None:
    return next(
        (
            r
            for r in bench.rows
            if r.kind == "relay" and r.id == sid and r.workers == workers and r.shape == shape
        ),
        None,
    )


def targets(bench: Bench) -> list[dict[str, Any]]:
    w = max(bench.s.workers)
    out: list[dict[str, Any]] = []

    def add(
        name: str,
        value: float | None,
        limit: str,
        met: bool | None,
        detail: str,
        phases: tuple[Phase | None, ...] = (),
    ) -> None:
        status = "not measured" if met is None else ("met" if met else "NOT met")
        worst = max((p.outside_share for p in phases if p is not None), default=0.0)
        if worst > QUIET_SHARE:
            status += " (disturbed)"
            detail += f"; other processes used {worst:.0%} of the CPU meanwhile"
        out.append(
            {"target": name, "value": value, "limit": limit, "status": status, "detail": detail}
        )

    for shape in bench.s.shapes:
        ratio_targets(bench, w, shape, add)
    floor = bench.sign_floor.get("rsa-2048")
    floor_note = f"; an RSA-2048 signature alone costs {floor * 1000:.2f} ms here" if floor else ""
    mkt = find(bench, "mkt-rsa-1", w)
    if mkt and mkt.cpu_us() is not None:
        cpu = mkt.cpu_us()
        assert cpu is not None
        add(
            "CPU per signed marketing message <= 1.0 ms (machine, all processes)", cpu / 1000,
            "<= 1.0 ms", cpu <= 1000,
            f"mkt-rsa-1 W={w}: {cpu:.0f} µs machine, {mkt.relay_cpu_us() or 0:.0f} µs relay"
            f" only{floor_note}",
        )  # fmt: skip
    fan = find(bench, "mkt-rsa-100", w)
    if fan and fan.throughput and fan.throughput.copies_rate:
        rate = fan.throughput.copies_rate
        ceiling = (
            f"; {os.cpu_count()} cores signing, nothing else:"
            f" {(os.cpu_count() or 1) / floor:,.0f}/s"
            if floor
            else ""
        )
        add(
            "100-recipient fan-out >= 5,000 signed copies/s", rate, ">= 5,000", rate >= 5000,
            f"mkt-rsa-100 W={w}: {rate:,.0f} copies/s{ceiling}", (fan.throughput,),
        )  # fmt: skip
    worst: tuple[float, Row] | None = None
    for r in bench.rows:
        if r.kind == "relay" and r.rcpts == 1 and r.workers == w:
            v = added_half(r)
            if v is not None and (worst is None or v > worst[0]):
                worst = (v, r)
    if worst:
        add(
            "p99 added latency at half max rate <= 10 ms (1-rcpt scenarios)", worst[0],
            "<= 10 ms", worst[0] <= 10, f"worst: {worst[1].id} W={w}",
            (worst[1].half, worst[1].half_baseline),
        )  # fmt: skip
    pairs = []
    for workers in bench.s.workers:
        for sid in ("mkt-rsa-1", "mkt-rsa-100"):
            small, big = find(bench, sid, workers), find(bench, sid + "@1M", workers)
            if small and big and small.delivered() and small.throughput and big.throughput:
                quiet = max(small.throughput.outside_share, big.throughput.outside_share)
                pairs.append((big.delivered() / small.delivered() - 1, sid, workers, quiet))
    if pairs:
        # judged on the pairs measured on a quiet machine when there are any
        judged = [p for p in pairs if p[3] <= QUIET_SHARE] or pairs
        change, sid, workers, quiet = max(judged, key=lambda p: abs(p[0]))
        shown = "; ".join(
            f"{s} W={wk}: {c * 100:+.1f} %" + (" (disturbed)" if q > QUIET_SHARE else "")
            for c, s, wk, q in pairs
        )
        status_note = "" if quiet <= QUIET_SHARE else " [all pairs disturbed]"
        add(
            "1M vs 1k suppression entries within 10% throughput", change * 100, "|Δ| <= 10 %",
            abs(change) <= 0.10, f"judged on {sid} W={workers}; {shown}{status_note}",
        )  # fmt: skip
    return out


def ratio_targets(bench: Bench, w: int, shape: str, add: Callable[..., None]) -> None:
    """The throughput targets for one shape: the relay's best against each baseline's best."""
    suffix = "" if shape == PERSISTENT else f" ({SHAPE_TITLES[shape]})"
    pf = bench.baselines.get(("postfix", 1, shape))
    pf_dkim = bench.baselines.get(("postfix+dkim", 1, shape))
    for sid, base, name, limit, needs in (
        (
            "mkt-rsa-1", pf_dkim, "marketing 1 rcpt RSA-2048 >= 3x Postfix+OpenDKIM delivered"
            " msg/s", 3.0, "the mkt-rsa-1 scenario and Postfix + OpenDKIM",
        ),
        (
            "milter-rsa-1", pf_dkim, "Postfix + oneclick milter >= 2x Postfix + OpenDKIM"
            " delivered msg/s (1 rcpt, RSA)", 2.0,
            "Postfix, OpenDKIM and the milter-rsa-1 scenario",
        ),
        (
            "tx-1", pf, "transactional >= 2x Postfix relay delivered msg/s", 2.0,
            "the tx-1 scenario and Postfix",
        ),
    ):  # fmt: skip
        row = find(bench, sid, w, shape)
        if row and base and base.delivered():
            x = row.delivered() / base.delivered()
            add(
                name + suffix, x, f">= {limit}", x >= limit,
                f"{row.delivered():.0f} msg/s (W={w}, {row.setting}) vs"
                f" {base.delivered():.0f} msg/s ({base.setting})",
                (row.throughput, base.throughput),
            )  # fmt: skip
        else:
            add(name + suffix, None, f">= {limit}", None, f"needs {needs}")


def report(bench: Bench, elapsed: float) -> tuple[str, dict[str, Any]]:
    s = bench.s
    assert bench.sink is not None
    lines = [
        "oneclick-relay benchmark"
        + (" (--quick)" if s.quick else "")
        + f": {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" {elapsed:.0f} s",
        f"relay: {bench.version}; uvloop "
        + ("importable (the relay runs on it)" if bench.uvloop else "NOT importable (asyncio loop)")
        + f" in the relay's interpreter ({sys.executable}); upstream sink: {bench.sink.kind}",
        "signature floor (one core, cryptography): "
        + ", ".join(f"{k} {v * 1e6:.0f} µs" for k, v in bench.sign_floor.items()),
        "load: "
        + ("Postfix smtp-source" if s.smtp_source else "bench/loadgen.py")
        + " for throughput and CPU, bench/loadgen.py for latency; 4 KB messages; shapes: "
        + ", ".join(SHAPE_TITLES[x] for x in s.shapes)
        + f"; throughput swept over {'/'.join(map(str, s.sessions))} sessions (relay)"
        + (f" and {len(s.postfix_sweep)} Postfix points" if s.postfix else "")
        + (" (--quick: reduced sweep)" if s.quick else "")
        + f"; latency at {LATENCY_SESSIONS} sessions",
        "Postfix relay and Postfix + OpenDKIM: "
        + (
            "throwaway instance on loopback (queue on disk)"
            if s.postfix
            else "not installed (bash bench/install-postfix.sh)"
        ),
        "",
        table(bench),
        "",
    ]
    sweeps = sweep_table(bench)
    if any(r.sweep for r in bench.rows):
        lines += [sweeps, ""]
    redis_text, redis_data = redis_table(bench)
    if redis_text:
        lines += [redis_text, ""]
    sizing_text, sizing_data = sizing(bench)
    if sizing_text:
        lines += [sizing_text, ""]
    info = bench.redis_info
    lines.append(
        "Redis memory per stored address (INFO memory used_memory): "
        + f"{fmt(info.get('per_address_1k_bytes'))} B at 1k entries"
        + (
            f", {fmt(info.get('per_address_1m_bytes'))} B at 1M entries"
            f" ({fmt(info.get('used_1m_bytes', 0) / 2**20)} MiB in all, loaded in"
            f" {fmt(info.get('load_seconds'), 1)} s)"
            if "per_address_1m_bytes" in info
            else ""
        )
    )
    lines.append("")
    result_targets = targets(bench)
    lines.append("Targets")
    lines.append("")
    for t in result_targets:
        v = t["value"]
        lines.append(
            f"- {t['status']:>12}: {t['target']} — {fmt(v, 2) if v is not None else '-'}"
            f" ({t['limit']}); {t['detail']}"
        )
    disturbed = []
    for r in bench.rows:
        if r.throughput and r.throughput.outside_share > QUIET_SHARE:
            disturbed.append(f"{r.label} ({r.throughput.outside_share:.0%})")
    if disturbed:
        lines.append("")
        lines.append(
            "WARNING: other processes on this machine used CPU during these throughput runs,"
            " so their figures are low: " + ", ".join(disturbed)
        )
    errors = [(r, e) for r in bench.rows for e in r.errors]
    lines.append("")
    if errors:
        lines.append(f"ERRORS ({len(errors)}):")
        lines.extend(f"- {r.label}: {e}" for r, e in errors[:30])
    else:
        lines.append(
            "Checks: every copy expected reached the sink and no more, no client saw an error,"
            " the relay's counters match what the clients sent and suppressed, no WARNING/ERROR"
            " in the relay logs."
        )
    lines.append("")
    lines.append(
        "CPU per message by process group, µs (throughput phase; driver = smtp-source or"
        " loadgen, bench = this script, kernel = machine minus all processes (network"
        " softirqs, kernel threads), foreign = processes the bench did not start):"
    )
    for r in bench.rows:
        t = r.throughput
        if t and t.messages and t.cpu:
            parts = ", ".join(
                f"{k} {v / t.messages * 1e6:,.0f}"
                for k, v in t.cpu.items()
                if k not in ("machine", "tree", "ours")
            )
            w = f" W={r.workers}" if r.kind == "relay" else ""
            lines.append(f"- {r.id}{w} {r.shape}: {parts}")
    stage_lines = []
    for r in bench.rows:
        if r.kind == "relay" and r.stages_ms:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in r.stages_ms.items())
            stage_lines.append(f"- {r.label}: {parts}")
    profiles = [r for r in bench.rows if r.profile and Path(r.profile).exists()]
    if profiles:
        lines.append("")
        lines.append(
            "Profiles (py-spy, throughput phase; sampling overhead is in these runs' CPU figures):"
        )
        for r in profiles:
            lines.append(f"- {r.id} W={r.workers}: {r.profile}")
            lines.append(spy.summarize(Path(r.profile)))
    if stage_lines:
        lines.append("")
        lines.append("Mean time per pipeline stage, ms (oneclick_stage_seconds, all phases):")
        lines.extend(stage_lines)
    data = {
        "settings": asdict(s) | {"only": sorted(s.only) if s.only else None},
        "elapsed_seconds": elapsed,
        "relay_version": bench.version,
        "sink": bench.sink.kind,
        "driver": "smtp-source" if s.smtp_source else "loadgen",
        "postfix": s.postfix,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "uvloop_importable": bench.uvloop,
        "signature_floor_seconds": bench.sign_floor,
        "shapes": s.shapes,
        "postfix_profiles": POSTFIX_PROFILES,
        "redis": info,
        "redis_per_message": redis_data,
        "sizing": sizing_data,
        "rows": [
            asdict(r)
            | {
                "accepted_msgs_per_s": r.accepted(),
                "delivered_msgs_per_s": r.delivered(),
                "delivered_copies_per_s": r.throughput.copies_rate if r.throughput else None,
                "cpu_us_per_msg": r.cpu_us(),
                "relay_cpu_us_per_msg": r.relay_cpu_us(),
                "added_p50_ms": added(r, bench.baselines.get(("sink", r.rcpts, r.shape)), "p50")
                if r.kind == "relay"
                else None,
                "added_p99_ms": added(r, bench.baselines.get(("sink", r.rcpts, r.shape)), "p99")
                if r.kind == "relay"
                else None,
                "added_p99_half_rate_ms": added_half(r) if r.kind == "relay" else None,
            }
            for r in bench.rows
        ],
        "targets": result_targets,
        "disturbed": disturbed,
        "errors": [f"{r.label}: {e}" for r, e in errors],
    }
    return "\n".join(lines), data


# ---------------------------------------------------------------------------
# Main


def relay_version(source: Path) -> str:
    """The commit the relay ran from, and whether relay/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--", "relay"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    where = "" if source == REPO else f" in {source}"
    return head + (" + uncommitted changes in relay/" if dirty else "") + where


def signature_floor(keys: dict[str, Path], seconds: float = 1.0) -> dict[str, float]:
    """CPU seconds per DKIM signature with the bench's keys: the cost no signer avoids.

    The relay's own ``DkimKey.sign`` over 600 octets of header data (what a 4 KB
    message's signed fields come to), timed on one core in this process.
    """
    from relay.config import DkimKeyConfig
    from relay.mail.dkim import load_key

    out: dict[str, float] = {}
    for name, (domain, selector, path) in {
        "rsa-2048": ("rsa.bench.test", "b2048", keys["rsa"]),
        "ed25519": ("ed.bench.test", "bed", keys["ed"]),
    }.items():
        key = load_key(DkimKeyConfig(domain=domain, selector=selector, private_key_file=path))
        data = os.urandom(600)
        count, started = 0, time.process_time()
        while time.process_time() - started < seconds / 2:
            key.sign(data)
            count += 1
        out[name] = (time.process_time() - started) / count
    return out


def uvloop_importable(source: Path) -> bool:
    """Whether ``import uvloop`` works where the relay runs (relay/runtime/loop.py uses it)."""
    done = subprocess.run(
        [sys.executable, "-c", "import uvloop"], cwd=source, capture_output=True, check=False
    )
    return done.returncode == 0


def become_subreaper() -> None:
    """Postfix's master daemonizes: make its orphans our children so they can be reaped."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short phases, reduced sweep, ~2 min")
    p.add_argument(
        "--smoke", action="store_true", help="a few seconds: tx-1, W=1, no Postfix (for tests)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--workers", default=None, help="comma list (default 2,1; --quick: 2)")
    p.add_argument("--only", default=None, help="comma list of scenario ids (e.g. tx-1,mkt-rsa-1)")
    p.add_argument("--duration", type=float, default=None, help="seconds per throughput phase")
    p.add_argument("--no-postfix", action="store_true", help="ignore an installed Postfix")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma list of load shapes: persistent (a session keeps its connection),"
        " connection (a new connection per message); default both",
    )
    p.add_argument(
        "--sessions",
        default=None,
        help="comma list: the relay's throughput sweep (default 20,100, as Postfix's)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        help="seconds the run may wait in all for other CPU load to stop (30; --quick: 2)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="where to save the JSON")
    p.add_argument(
        "--relay-dir",
        type=Path,
        default=REPO,
        help="run the relay/ package of another checkout (A/B a change; default: this one)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="record each relay throughput phase with py-spy (pip install py-spy) into --out",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    have_postfix = (
        postfix_available() and not args.no_postfix and not args.smoke and os.geteuid() == 0
    )
    if args.quick:
        settings = Settings(True, 1.0, 0.6, 0.6, [2], have_postfix, have_postfix, None)
        settings.sessions = list(RELAY_SESSIONS_QUICK)
        settings.postfix_sweep = list(POSTFIX_SWEEP_QUICK)
    else:
        settings = Settings(False, 4.0, 2.5, 3.0, [2, 1], have_postfix, have_postfix, None)
    if args.smoke:
        settings = Settings(True, 0.3, 0.3, 0.3, [1], False, False, {"tx-1"})
        settings.sessions = [LATENCY_SESSIONS]
        args.no_postfix = True
    if args.workers:
        settings.workers = [int(w) for w in args.workers.split(",")]
    if args.duration:
        settings.duration = args.duration
    if args.only:
        settings.only = set(args.only.split(","))
    if args.shapes:
        settings.shapes = [x.strip() for x in args.shapes.split(",")]
        unknown = set(settings.shapes) - set(SHAPES)
        if unknown:
            log(f"--shapes: unknown {', '.join(sorted(unknown))} (known: {', '.join(SHAPES)})")
            return 2
    if args.sessions:
        settings.sessions = [int(n) for n in args.sessions.split(",")]
    if args.wait_quiet is not None:
        settings.wait_quiet = args.wait_quiet
    elif settings.quick:
        settings.wait_quiet = 2.0
    settings.relay_dir = args.relay_dir.resolve()
    if not (settings.relay_dir / "relay" / "__main__.py").exists():
        log(f"--relay-dir: no relay/ package in {settings.relay_dir}")
        return 2
    if args.profile:
        if spy.PY_SPY is None:
            log("--profile needs py-spy: pip install py-spy")
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        settings.profile = args.out
    if not have_postfix and postfix_available() and not args.no_postfix:
        log("Postfix is installed but the bench is not root: running without it")
    become_subreaper()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oneclick-bench-") as tmp:
        bench = Bench(settings, Path(tmp))

        def on_signal(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_signal)
        try:
            bench.run()
        except BenchError as exc:
            log(f"FAILED: {exc}")
            return 1
        except KeyboardInterrupt:
            log("interrupted: stopping everything the bench started")
            return 130
        finally:
            bench.teardown()
            reap()
        text, data = report(bench, time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / time.strftime("bench-%Y%m%d-%H%M%S.json")
    saved.write_text(json.dumps(data, indent=2, default=str))
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)
        print(f"\n(JSON saved to {saved})")
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
