"""Unsubscribe expiry (``suppression.unsubscribe_days``) at its boundary with the injected
clock, and bulk re-subscribe (``remove_lines``, ``suppress remove --file``, the admin API)
against the real Redis; complaints stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from helpers import NOW, Clock, write_yaml
from redis.asyncio import Redis

from relay.model import Route
from relay.runtime.app import Relay
from relay.suppression.store import (
    DAY,
    GLOBAL,
    SuppressionPolicy,
    SuppressionStore,
    group_scope,
)
from relay.suppression.transfer import remove_lines

ROOT = Path(__file__).resolve().parent.parent
NEWSLETTER = Route("marketing", "newsletter", "news@example.com")
RECEIPTS = Route("transactional", None, "receipts@example.com")
ALICE = "alice@example.net"
NEWS = group_scope("newsletter")


def with_days(redis: Redis, clock: Clock, days: float | None) -> SuppressionStore:
    return SuppressionStore(
        redis, "ocr", policy=SuppressionPolicy(unsubscribe_ttl=days and days * DAY), clock=clock
    )


async def test_unsubscribe_lapses_at_the_boundary(redis: Redis, clock: Clock) -> None:
    store = with_days(redis, clock, 90)
    assert await store.add(ALICE, NEWS, "unsubscribe", source="one-click")
    [entry] = await store.entries(ALICE)
    assert entry.expires == int(NOW) + 90 * DAY
    clock.now = NOW + 90 * DAY - 1
    assert ALICE in await store.blocked([ALICE], NEWSLETTER)
    clock.now = NOW + 90 * DAY
    assert ALICE not in await store.blocked([ALICE], NEWSLETTER)  # honoured at lookup
    # a new request after it lapsed is a new unsubscribe, with a new expiry
    assert await store.add(ALICE, NEWS, "unsubscribe", source="one-click")
    assert ALICE in await store.blocked([ALICE], NEWSLETTER)


async def test_default_never_and_complaints_never_expire(redis: Redis, clock: Clock) -> None:
    store = with_days(redis, clock, None)
    await store.add(ALICE, NEWS, "unsubscribe", source="one-click")
    await store.add("bob@example.org", GLOBAL, "complaint", source="arf")
    store = with_days(redis, clock, 1)  # a short unsubscribe expiry leaves complaints alone
    await store.add("carol@example.com", GLOBAL, "complaint", source="arf")
    clock.now = NOW + 3650 * DAY
    assert set(
        await store.blocked([ALICE, "bob@example.org", "carol@example.com"], NEWSLETTER)
    ) == {
        ALICE,
        "bob@example.org",
        "carol@example.com",
    }


async def test_bulk_resubscribe_reports_every_line(redis: Redis, clock: Clock) -> None:
    store = with_days(redis, clock, None)
    await store.add(ALICE, NEWS, "unsubscribe", source="one-click")
    await store.add(ALICE, group_scope("promotions"), "unsubscribe", source="one-click")
    await store.add("bob@example.org", NEWS, "unsubscribe", source="mailto")
    await store.add("bob@example.org", GLOBAL, "complaint", source="arf")
    await store.add("dave@example.com", GLOBAL, "hard-bounce", source="dsn")
    lines = [
        "# re-subscribed at the fair",
        "Alice@Example.NET",
        "",
        "bob@example.org",
        "not an address",
        "carol@example.com",
        "alice@example.net",
        "dave@example.com",
    ]
    dry = await remove_lines(store, lines, scope=NEWS, source="test", dry_run=True)
    assert [(r.line, r.outcome) for r in dry.lines] == [
        (2, "removed"),
        (4, "protected"),
        (5, "invalid"),
        (6, "not-suppressed"),
        (7, "duplicate"),
        (8, "not-suppressed"),  # dave's hard bounce is global, not in the newsletter scope
    ]
    assert len(await store.entries(ALICE)) == 2  # a dry run changes nothing
    report = await remove_lines(store, lines, scope=NEWS, source="test")
    assert [(r.line, r.outcome) for r in report.lines] == [(r.line, r.outcome) for r in dry.lines]
    assert report.lines[0].detail == "group:newsletter unsubscribe"
    assert "complaint" in report.lines[1].detail
    assert [e.scope for e in await store.entries(ALICE)] == [group_scope("promotions")]
    assert {e.reason for e in await store.entries("bob@example.org")} == {
        "unsubscribe",
        "complaint",
    }
    # every scope, from a CSV with an address column (and a per-row group column)
    csv_lines = ["name,address,group", "A,alice@example.net,", "D,dave@example.com,"]
    report = await remove_lines(store, csv_lines, scope=None, source="test")
    assert [(r.line, r.outcome) for r in report.lines] == [(2, "removed"), (3, "removed")]
    assert await store.entries(ALICE) == [] and await store.entries("dave@example.com") == []
    assert report.as_dict()["removed"] == 2


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ONECLICK_RELAY_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_remove_file(
    config_dict: dict[str, Any], tmp_path: Path, redis: Redis, clock: Clock
) -> None:
    cfg = str(write_yaml(tmp_path / "relay.yaml", config_dict))
    store = with_days(redis, clock, None)
    await store.add(ALICE, NEWS, "unsubscribe", source="one-click")
    await store.add("bob@example.org", GLOBAL, "complaint", source="arf")
    listing = tmp_path / "back.txt"
    listing.write_text("alice@example.net\nbob@example.org\nnope\n")
    dry = run("suppress", "-c", cfg, "remove", "--file", str(listing), "--dry-run")
    assert dry.returncode == 3, dry.stderr  # a line was not usable
    assert "line 1: alice@example.net: would remove: group:newsletter unsubscribe" in dry.stdout
    assert "line 2: bob@example.org: protected: global complaint" in dry.stdout
    assert "line 3: nope: invalid: not an e-mail address" in dry.stdout
    assert "would remove: 1, not suppressed: 0, protected: 1, duplicates: 0, invalid: 1" in (
        dry.stdout
    )
    assert len(await store.entries(ALICE)) == 1
    done = run(
        "suppress", "-c", cfg, "remove", "--file", "-", "--group", "newsletter",
        stdin="alice@example.net\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "line 1: alice@example.net: removed" in done.stdout
    assert await store.entries(ALICE) == []
    both = run("suppress", "-c", cfg, "remove", ALICE, "--file", str(listing))
    assert both.returncode == 2 and "either an address" in both.stderr
    missing = run("suppress", "-c", cfg, "remove", "--file", str(tmp_path / "none.txt"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr


async def test_admin_api_remove(
    make_relay: Any, config_dict: dict[str, Any], tmp_path: Path
) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("admin-token-0123456789abcdef\n")
    config_dict["http"]["admin_token_file"] = str(token_file)
    relay: Relay = await make_relay(config_dict)
    assert relay.store is not None
    await relay.store.add(ALICE, NEWS, "unsubscribe", source="one-click")
    await relay.store.add("bob@example.org", GLOBAL, "complaint", source="arf")
    url = f"http://127.0.0.1:{relay.http_port}/admin/suppressions/remove?group=newsletter"
    headers = {"Authorization": "Bearer admin-token-0123456789abcdef"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url, data="alice@example.net\nbob@example.org\nx\n", headers=headers
        ) as r:
            assert r.status == 200
            body = await r.json()
        async with http.post(url, data="alice@example.net\n") as r:
            assert r.status == 401
    assert (body["removed"], body["protected"], body["invalid"], body["dry_run"]) == (
        1,
        1,
        1,
        False,
    )
    assert [line["outcome"] for line in body["lines"]] == ["removed", "protected", "invalid"]
    assert await relay.store.entries(ALICE) == []
    assert [e.reason for e in await relay.store.entries("bob@example.org")] == ["complaint"]
