"""The admin dashboard over real HTTP and in a real headless browser (Debian's ``chromium``).

Redis is seeded through the relay itself: mail through SMTP to the capture sink,
one-click POSTs, ``DailyCounters`` (with a clock set to earlier days) for a month of
sends, bounces and complaints, and ``SuppressionStore.add`` for every reason. The
browser fetches the page through a small loopback proxy that adds the session
cookie a person gets from the sign-in form (a command-line browser cannot type
it), renders it, and writes a screenshot whose path the test prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import shutil
import struct
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import Sink
from helpers import message, smtp_send, unsubscribe_token

from relay.http.session import SESSION_COOKIE
from relay.runtime.app import Relay
from relay.store.client import connect
from relay.suppression.report import DailyCounters
from relay.suppression.store import GLOBAL, ImportRow, SuppressionStore, group_scope, sender_scope
from relay.suppression.transfer import StatsCache

TOKEN = "dashboard-admin-token-0123456789"
SVG = "{http://www.w3.org/2000/svg}"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1400",
]
# Daily sends per group (``-`` is transactional mail) and the whole month's complaint
# rate, oldest day first: it climbs past the 0.1 % goal, touches the 0.3 % limit, recovers.
SENT = {"newsletter": 14_000, "promotions": 6_000, "product-updates": 2_500, "-": 9_000}
PER_10K = (4, 5, 4, 6, 5, 7, 6, 8, 7, 9, 11, 13, 12, 16, 19, 24, 31, 27, 21, 17, 14, 12, 10, 9)
RATES = [n / 10_000 for n in (*PER_10K, 8, 7, 6, 6, 5)]


@dataclass
class Seeded:
    unsubscribed: list[str]
    """Recipients who pressed one-click today, all in group newsletter."""
    entries: dict[tuple[str, str], int]
    """Live suppression entries per (reason, scope kind)."""


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "Debian's chromium is required for the dashboard test: apt-get install chromium "
            "(bash tests/run installs it as root)",
            pytrace=False,
        )
    return path


@pytest.fixture
async def admin_relay(make_relay: Any, config_dict: dict[str, Any], tmp_path: Path) -> Relay:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    config_dict["http"]["admin_token_file"] = str(token_file)
    config_dict["policy"]["groups"]["product-updates"] = {"display_name": "Product updates"}
    config_dict["policy"]["senders"].append(
        {"match": "updates@example.com", "class": "marketing", "group": "product-updates"}
    )
    relay: Relay = await make_relay(config_dict)
    return relay


def base(relay: Relay) -> str:
    return f"http://127.0.0.1:{relay.http_port}"


async def seed(relay: Relay, sink: Sink, redis_url: str) -> Seeded:
    rng = random.Random(2026)
    # Today, through the relay: marketing and transactional mail, then one-click POSTs.
    people = [f"reader{i}@example.net" for i in range(8)]
    code, _ = await smtp_send(relay.smtp_port, "news@example.com", people, message())
    assert code == 250
    for sender in ("deals@promo.example.com", "updates@example.com", "receipts@example.com"):
        code, _ = await smtp_send(relay.smtp_port, sender, people[:3], message(sender=sender))
        assert code == 250
    tokens = {
        m.rcpt_tos[0]: unsubscribe_token(m.data)
        for m in sink.handler.messages
        if b"From: Example <news@example.com>" in m.data
    }
    unsubscribed = people[:5]
    async with aiohttp.ClientSession() as http:
        for rcpt in unsubscribed:
            async with http.post(
                f"{base(relay)}/u/{tokens[rcpt]}",
                data="List-Unsubscribe=One-Click",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as resp:
                assert resp.status == 200
    # Today's bulk traffic, bounces and complaints, counted as the relay counts them.
    for group, sent in SENT.items():
        relay.counters.add("sent", group, sent // 3)
        relay.counters.add("hard-bounce", group, sent // 900)
        relay.counters.add("soft-bounce", group, sent // 1500)
        relay.counters.add("policy-bounce", group, sent // 6000)
    relay.counters.add("complaint", "newsletter", 4)
    await relay.counters.flush()

    # The 29 days before: the same counters, with a clock set to each day.
    now = time.time()
    when = [now]
    redis = connect(redis_url, 2)
    try:
        past = DailyCounters(redis, relay.config.redis.key_prefix, clock=lambda: when[0])
        for back, rate in zip(range(29, 0, -1), RATES, strict=True):
            when[0] = now - back * 86400
            total = 0
            for group, usual in SENT.items():
                sent = int(usual * rng.uniform(0.85, 1.15))
                total += sent
                past.add("sent", group, sent)
                past.add("hard-bounce", group, int(sent * rng.uniform(0.002, 0.005)))
                past.add("soft-bounce", group, int(sent * rng.uniform(0.001, 0.003)))
                past.add("policy-bounce", group, int(sent * rng.uniform(0.0, 0.0008)))
                if group != "-":
                    past.add("unsubscribe", group, int(sent * rng.uniform(0.0008, 0.0025)))
            complaints = round(total * rate)
            past.add("complaint", "newsletter", complaints * 2 // 3)
            past.add("complaint", "promotions", complaints - complaints * 2 // 3)
        await past.flush()
    finally:
        await redis.aclose()

    # The suppression list: every reason and scope kind.
    store = relay.store
    assert store is not None
    additions = [
        ("hard-bounce", GLOBAL, 40),
        ("complaint", GLOBAL, 12),
        ("manual", GLOBAL, 5),
        ("soft-bounce", GLOBAL, 9),
        ("unsubscribe", group_scope("promotions"), 25),
        ("unsubscribe", group_scope("product-updates"), 14),
        ("unsubscribe", sender_scope("news@example.com"), 3),
    ]
    for reason, scope, count in additions:
        for _ in range(count):
            n = rng.randrange(10**9)
            await store.add(f"user{n}@example.org", scope, reason, source="test")
    entries = {
        ("hard-bounce", "global"): 40,
        ("complaint", "global"): 12,
        ("manual", "global"): 5,
        ("soft-bounce", "global"): 9,
        ("unsubscribe", "group"): 25 + 14 + len(unsubscribed),
        ("unsubscribe", "sender"): 3,
    }
    return Seeded(unsubscribed, entries)


@pytest.fixture
async def seeded(admin_relay: Relay, sink: Sink, redis_url: str) -> Seeded:
    return await seed(admin_relay, sink, redis_url)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str
    cookies: dict[str, str]
    set_cookie: str


async def request(relay: Relay, method: str, path: str, **kwargs: Any) -> Reply:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, base(relay) + path, allow_redirects=False, **kwargs) as resp,
    ):
        return Reply(
            resp.status,
            dict(resp.headers),
            await resp.text(),
            {name: morsel.value for name, morsel in resp.cookies.items()},
            resp.headers.get("Set-Cookie", ""),
        )


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def svgs(page: str) -> list[ET.Element]:
    """The page's inline SVGs as XML (our own output, so no XML attacks)."""
    return [ET.fromstring(m) for m in re.findall(r"<svg.*?</svg>", page, re.DOTALL)]  # noqa: S314


def titles(svg: ET.Element, tag: str = "rect") -> list[str]:
    return [e.findtext(f"{SVG}title") or "" for e in svg.iter(SVG + tag)]


async def test_page_needs_the_token_or_a_session(admin_relay: Relay) -> None:
    anonymous = await request(admin_relay, "GET", "/admin/")
    assert anonymous.status == 401
    assert anonymous.headers["Content-Type"].startswith("text/html")
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    assert '<form method="post" action="login">' in anonymous.text
    assert "<svg" not in anonymous.text
    assert (await request(admin_relay, "GET", "/admin/", headers=bearer("wrong"))).status == 401
    moved = await request(admin_relay, "GET", "/admin")
    assert (moved.status, moved.headers["Location"]) == (308, "admin/")

    refused = await request(admin_relay, "POST", "/admin/login", data={"token": "guess"})
    assert refused.status == 401
    assert "That is not the admin token." in refused.text
    assert SESSION_COOKIE not in refused.cookies

    signed_in = await request(admin_relay, "POST", "/admin/login", data={"token": TOKEN})
    assert (signed_in.status, signed_in.headers["Location"]) == (303, "./")
    attributes = {a.strip().split("=")[0].lower() for a in signed_in.set_cookie.split(";")}
    assert {"httponly", "path", "max-age", "samesite"} <= attributes
    assert "SameSite=Strict" in signed_in.set_cookie
    assert "Path=/admin/" in signed_in.set_cookie
    assert "secure" not in attributes  # plain http on loopback
    session = signed_in.cookies[SESSION_COOKIE]
    assert TOKEN not in session

    cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
    assert (await request(admin_relay, "GET", "/admin/", headers=cookie)).status == 200
    # The cookie opens the page only: the JSON API still wants the bearer token.
    assert (await request(admin_relay, "GET", "/admin/stats", headers=cookie)).status == 401
    expires, _, mac = session.partition(".")
    forged = {"Cookie": f"{SESSION_COOKIE}={int(expires) + 86400}.{mac}"}
    assert (await request(admin_relay, "GET", "/admin/", headers=forged)).status == 401

    behind_tls = await request(
        admin_relay,
        "POST",
        "/admin/login",
        data={"token": TOKEN},
        headers={"X-Forwarded-Proto": "https"},
    )
    assert "Secure" in behind_tls.set_cookie

    signed_out = await request(admin_relay, "POST", "/admin/logout", headers=cookie)
    assert signed_out.status == 303
    assert f"{SESSION_COOKIE}=" in signed_out.set_cookie
    assert "Max-Age=0" in signed_out.set_cookie


async def test_page_shows_the_seeded_numbers(admin_relay: Relay, seeded: Seeded) -> None:
    page = await request(admin_relay, "GET", "/admin/", headers=bearer())
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-store"
    assert "<script" not in page.text

    charts = svgs(page.text)
    assert [c.get("class") for c in charts] == [
        "chart bars",
        "chart lines",
        "chart lines",
        "chart hbars",
        "chart histogram",
    ]
    unsubscribes, complaints, bounces, reasons, latency = charts
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert f"{today} · newsletter: {len(seeded.unsubscribed)}" in titles(unsubscribes)
    assert len({e.get("data-series") for e in unsubscribes.iter(f"{SVG}rect")}) == 3
    for chart in (complaints, bounces):
        thresholds = [e for e in chart.iter(f"{SVG}line") if e.get("class") == "threshold"]
        assert [e.get("data-value") for e in thresholds] == ["0.001", "0.003"]
    assert len(titles(complaints, "circle")) == 30  # mail was sent every day
    worst = max(float(t.rsplit(" ", 1)[1].rstrip("%")) for t in titles(complaints, "circle"))
    assert 0.3 <= worst < 0.35

    shown = {tuple(t.split(": ")[0].split(" · ")): int(t.split(": ")[1]) for t in titles(reasons)}
    assert shown == seeded.entries
    assert "over the last 5 unsubscribes" in page.text
    assert sum(int(t.rsplit(": ", 1)[1]) for t in titles(latency)) == 5
    assert re.search(r"p50<b>\d+\.\d+ ms</b>", page.text)
    metrics = (await request(admin_relay, "GET", "/metrics")).text
    assert "oneclick_unsubscribe_seconds_count 5.0" in metrics

    # The suppression counts come from a cache: a new entry shows only after it expires.
    computed = re.search(r"as of ([0-9: -]+ UTC)", page.text)
    assert computed
    assert admin_relay.store is not None
    await admin_relay.store.add("late@example.org", GLOBAL, "hard-bounce", source="test")
    again = await request(admin_relay, "GET", "/admin/?days=7", headers=bearer())
    assert f"as of {computed.group(1)}" in again.text
    assert "hard-bounce · global: 40" in again.text
    assert 'class="on">7 days' in again.text
    assert (await request(admin_relay, "GET", "/admin/?days=0", headers=bearer())).status == 400


@contextlib.asynccontextmanager
async def session_proxy(relay: Relay, session: str) -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback server that forwards GETs to the relay with the session cookie added."""
    seen: list[str] = []
    passed = {"content-type", "content-security-policy", "cache-control", "location"}

    async def forward(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                base(relay) + request.path_qs,
                headers={"Cookie": f"{SESSION_COOKIE}={session}"},
                allow_redirects=False,
            ) as resp,
        ):
            body = await resp.read()
            keep = {k: v for k, v in resp.headers.items() if k.lower() in passed}
            return web.Response(status=resp.status, body=body, headers=keep)

    app = web.Application()
    app.router.add_get("/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


async def run_chromium(chromium: str, profile: Path, *args: str) -> bytes:
    """Run the browser without blocking the loop the relay answers on; its stdout."""
    proc = await asyncio.create_subprocess_exec(
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("chromium did not finish within 120 s")
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return out


def png_rows(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and decoded RGB(A) rows of an 8-bit PNG, with the stdlib only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, header, idat = 8, b"", []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, interlace) == (8, 0) and colour in (2, 6), (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(b"".join(idat))
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, previous, strict=True))
        elif kind in (3, 4):
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                up = previous[i]
                if kind == 3:
                    line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
                    continue
                corner = previous[i - bpp] if i >= bpp else 0
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                best = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
                line[i] = (line[i] + best) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, rows


async def test_page_renders_in_headless_chromium(
    admin_relay: Relay,
    seeded: Seeded,
    chromium: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    signed_in = await request(admin_relay, "POST", "/admin/login", data={"token": TOKEN})
    session = signed_in.cookies[SESSION_COOKIE]
    screenshot = tmp_path / "dashboard.png"
    async with session_proxy(admin_relay, session) as (url, seen):
        dom = (
            await run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", url + "/admin/")
        ).decode()
        await run_chromium(
            chromium, tmp_path / "profile-png", f"--screenshot={screenshot}", url + "/admin/"
        )
    with capsys.disabled():
        print(f"\ndashboard screenshot: {screenshot}")

    # The browser built the charts into its DOM, from the seeded data.
    assert "Sign in" not in dom
    for css in ("chart bars", "chart lines", "chart hbars"):
        assert f'<svg class="{css}"' in dom, css
    assert dom.count('class="threshold"') == 4
    assert dom.count('<rect class="bar"') >= 60
    assert dom.count("<polyline") >= 2
    assert "newsletter" in dom and "hard-bounce" in dom
    assert set(seen) <= {"/admin/", "/favicon.ico"}  # nothing else fetched: no external assets

    data = screenshot.read_bytes()
    assert len(data) > 40_000, len(data)
    width, height, rows = png_rows(data)
    assert (width, height) == (1280, 1400)
    bpp = len(rows[0]) // width
    pixels = {row[x : x + 3] for row in rows[::4] for x in range(0, len(row), bpp * 2)}
    assert len(pixels) > 200, "the screenshot is (nearly) one colour"
    header, first_group = bytes.fromhex("1F2937"), bytes.fromhex("0072B2")
    assert header in pixels and first_group in pixels


async def wait_idle(cache: StatsCache) -> None:
    for _ in range(500):
        if not cache.refreshing:
            return
        await asyncio.sleep(0.01)
    pytest.fail("the suppression scan did not finish")


async def test_stats_cache_recomputes_only_when_old(redis_url: str) -> None:
    redis = connect(redis_url, 1)
    store = SuppressionStore(redis)
    now = [1_000_000.0]
    cache = StatsCache(store, max_age=300, wait=5, clock=lambda: now[0])
    try:
        await store.add("a@example.org", GLOBAL, "manual", source="test")
        first = await cache.get()
        assert first is not None
        assert first.stats.by_scope_reason == {("global", "manual"): 1}
        assert first.computed == now[0]
        await store.add("b@example.org", GLOBAL, "complaint", source="test")
        now[0] += 299
        assert await cache.get() is first
        assert not cache.refreshing
        now[0] += 1
        second = await cache.get()
        assert second is not None and second is not first
        assert second.stats.by_scope_reason[("global", "complaint")] == 1
    finally:
        await cache.close()
        await redis.aclose()


async def test_stats_cache_serves_the_old_result_while_a_scan_runs(redis_url: str) -> None:
    redis = connect(redis_url, 1)
    store = SuppressionStore(redis)
    now = [1_000_000.0]
    cache = StatsCache(store, max_age=60, wait=0, clock=lambda: now[0])
    try:
        rows = [ImportRow(i, f"user{i}@example.org", GLOBAL, "manual") for i in range(5000)]
        await store.add_many(rows, source="test")  # a scan takes 10 round trips or more
        assert await cache.get() is None  # wait=0: a page view never waits for the scan
        assert cache.refreshing
        await wait_idle(cache)
        first = await cache.get()
        assert first is not None
        assert first.stats.by_scope_reason == {("global", "manual"): 5000}
        now[0] += 61
        assert await cache.get() is first  # stale: shown while the next scan runs
        assert cache.refreshing
        await wait_idle(cache)
        assert await cache.get() is not first
        now[0] += 61
        await cache.get()
        assert cache.refreshing
        await cache.close()  # what the app's cleanup does at shutdown: the scan is cancelled
        assert not cache.refreshing
    finally:
        await cache.close()
        await redis.aclose()


async def test_stats_cache_reports_redis_down() -> None:
    redis = connect("redis://127.0.0.1:1/0", 0.5)  # nothing listens on port 1
    cache = StatsCache(SuppressionStore(redis), wait=10)
    try:
        assert await cache.get() is None
        assert cache.error is not None and "suppression stats" in cache.error
        assert not cache.refreshing
    finally:
        await cache.close()
        await redis.aclose()


def test_token_is_read_from_the_list_unsubscribe_header_only() -> None:
    """A DKIM b= value can hold "/u/"; a later header can hold ">": neither is the token."""
    data = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s2026;\r\n"
        b"\tb=Zm9v/u/YmFyYmF6cXV4Kw==\r\n"
        b"List-Unsubscribe:\r\n <https://unsub.example.com/u/k1.Abc-_9>\r\n"
        b"Message-ID: <x@example.com>\r\n"
        b"\r\nbody /u/nope>\r\n"
    )
    assert unsubscribe_token(data) == "k1.Abc-_9"
    assert re.search(rb"/u/([^>]+)>", data).group(1) != b"k1.Abc-_9"  # type: ignore[union-attr]
