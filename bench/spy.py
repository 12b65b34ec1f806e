"""Where the relay's CPU goes: py-spy while the bench drives load, summarized as text.

``python bench/run.py --profile`` records each relay scenario's throughput phase with
``py-spy record --subprocesses --format raw`` (collapsed stacks; ``pip install py-spy``)
into bench/results/, then prints for each the share of samples by component (the file
of the innermost frame: relay module, aiosmtpd, aiosmtplib, redis-py, asyncio, logging,
prometheus_client, OpenSSL via cryptography ...) and the heaviest functions, by self
and by inclusive time. ``python bench/spy.py FILE`` summarizes a saved file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

PY_SPY = shutil.which("py-spy")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::\d+)?\)$")

COMPONENTS = (
    ("relay/", None),
    ("aiosmtpd/", "aiosmtpd"),
    ("aiosmtplib/", "aiosmtplib"),
    ("redis/", "redis-py"),
    ("hiredis", "redis-py"),
    ("prometheus_client/", "prometheus_client"),
    ("logging/", "logging"),
    ("cryptography/", "cryptography (OpenSSL)"),
    ("dkim/", "dkimpy"),
    ("email/", "email (stdlib)"),
    ("asyncio/", "asyncio"),
    ("uvloop", "asyncio"),
    ("aiohttp/", "aiohttp"),
)


def start(pid: int, seconds: float, out: Path, rate: int = 200) -> subprocess.Popen[bytes] | None:
    """Sample ``pid`` and its child processes for ``seconds``; None without py-spy."""
    if PY_SPY is None:
        return None
    args = [
        PY_SPY, "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
        "--rate", str(rate), "--duration", str(max(1, round(seconds))),
        "--format", "raw", "--output", str(out),
    ]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def component(file: str) -> str:
    for marker, name in COMPONENTS:
        if marker in file:
            if name is None:  # relay/<module>.py
                return "relay." + file.split("relay/", 1)[1].removesuffix(".py")
            return name
    if file.startswith("<frozen"):
        return "python (frozen)"
    parts = file.removesuffix(".py").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        return parts[-2]
    return parts[-1] or "?"


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for raw in stack.split(";"):
            m = _FRAME.match(raw)
            if m:
                frames.append((m.group("func"), m.group("file")))
        if frames:
            stacks.append((frames, int(count)))
    return stacks


def summarize(path: Path, top: int = 12) -> str:
    # start-up frames (main, run_async ...) say nothing; coroutines resumed by the event
    # loop are often sampled without them anyway
    boring_files = ("relay/__main__.py", "relay/cli.py", "relay/workers.py")
    stacks = parse(path)
    total = sum(n for _, n in stacks)
    if not total:
        return f"(no samples in {path})"
    by_component: Counter[str] = Counter()
    by_self: Counter[str] = Counter()
    by_inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        func, file = frames[-1]
        by_component[component(file)] += n
        by_self[f"{func} ({file})"] += n
        seen = set()
        for func, file in frames:
            if ("relay/" in file or "aiosmtp" in file) and not file.endswith(boring_files):
                key = f"{func} ({file})"
                if key not in seen:
                    seen.add(key)
                    by_inclusive[key] += n

    def block(title: str, counter: Counter[str]) -> list[str]:
        rows = [f"  {title}:"]
        rows += [f"    {n / total:6.1%}  {name}" for name, n in counter.most_common(top)]
        return rows

    lines = [f"  {total} samples ({path.name})"]
    lines += block("self time by component (innermost frame)", by_component)
    lines += block("self time by function", by_self)
    lines += block("inclusive time, relay and aiosmtpd/aiosmtplib functions", by_inclusive)
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(name)
        print(summarize(Path(name)))
