"""One-click POST throughput: wrk against the relay's HTTP handler and a real Redis.

    python bench/unsubscribe_http.py [--seconds 10] [--connections 32] [--tokens 20000]

Starts an embedded Redis and the relay (HTTP side on a free port), issues
``--tokens`` distinct tokens (so each request writes a new suppression, like real
clicks), and drives ``POST /u/TOKEN`` with ``List-Unsubscribe=One-Click`` from
wrk (Debian package ``wrk``). The baseline, measured in the same run, is the
same wrk load against ``GET /healthz`` (aiohttp plus one Redis PING), so the
ratio shows what token verification and the suppression write cost. Prints
requests/s, latency percentiles, and the entries written.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from relay.cli.keygen import token_keygen
from relay.config import load_config
from relay.mail.tokens import TokenCodec
from relay.runtime.app import Relay
from relay.store.embedded import free_port

LUA = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", paths[(i %% #paths) + 1],
    {["Content-Type"] = "application/x-www-form-urlencoded"}, "List-Unsubscribe=One-Click")
end
"""


def wrk(url: str, seconds: int, connections: int, script: Path | None) -> dict[str, str]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    result = {"rps": re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[f"p{pct}"] = m.group(1) if m else "?"
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = non2xx.group(1) if non2xx else "0"
    return result


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20000)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("needs wrk: apt-get install wrk", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        token_keygen(folder / "k1.key")
        port = free_port()
        raw = {
            "smtp": {"listen": "127.0.0.1:0", "workers": 1},
            "upstream": {"host": "127.0.0.1", "port": free_port()},
            "http": {"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}"},
            "tokens": {"keys": [{"id": "k1", "secret_file": "k1.key"}]},
            "policy": {"senders": [{"match": "news@example.com", "class": "marketing"}]},
        }
        (folder / "c.yaml").write_text(yaml.safe_dump(raw))
        config = load_config(folder / "c.yaml")
        relay = Relay(config)
        await relay.start()
        try:
            codec = TokenCodec(config.tokens)
            paths = folder / "paths.txt"
            paths.write_text(
                "\n".join(
                    f"/u/{codec.issue(f'user{i}@example.net', 'newsletter')}"
                    for i in range(args.tokens)
                )
                + "\n"
            )
            script = folder / "post.lua"
            script.write_text(LUA % paths)
            base = f"http://127.0.0.1:{relay.http_port}"
            loop = asyncio.get_running_loop()
            health = await loop.run_in_executor(
                None, wrk, f"{base}/healthz", args.seconds, args.connections, None
            )
            post = await loop.run_in_executor(
                None, wrk, f"{base}/u/x", args.seconds, args.connections, script
            )
            assert relay.store is not None
            written = 0
            async for _ in relay.store.scan():
                written += 1
        finally:
            await relay.stop()
    print(f"one-click POST, {args.connections} connections, {args.seconds}s, 1 relay process")
    print(f"{'endpoint':<28}{'req/s':>10}{'p50':>10}{'p99':>10}{'non-2xx':>9}")
    for name, r in (("GET /healthz (baseline)", health), ("POST /u/TOKEN", post)):
        print(f"{name:<28}{r['rps']:>10}{r['p50']:>10}{r['p99']:>10}{r['errors']:>9}")
    ratio = float(post["rps"]) / float(health["rps"])
    print(f"POST/baseline ratio: {ratio:.2f}; distinct suppressions written: {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
