"""The relay on a real 3-master Redis Cluster (``redis.cluster: true``), nothing mocked.

Suppressions, one-click POSTs, scan/export/import, patterns, the retry queue and the
CLI all go through ``RedisCluster``; where the keys land is checked on each node
directly, so "across the cluster" means three real servers each holding a share.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Sink
from helpers import message, smtp_send, write_yaml
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis_topologies import ClusterTopology

from relay.runtime.app import Relay
from relay.suppression import transfer
from relay.suppression.store import GLOBAL, SuppressionStore, group_scope, sender_scope

ROOT = Path(__file__).resolve().parents[2]
ALICE, BOB, CAROL, DAN = (
    "alice@example.net",
    "bob@example.org",
    "carol@example.com",
    "dan@example.net",
)
KEPT = [ALICE, BOB, CAROL, DAN]
UNSUBSCRIBED = [f"unsub{i}@example.net" for i in range(12)]  # group newsletter
BOUNCED = [f"bounced{i}@example.org" for i in range(12)]  # global hard bounce
SENDER_BLOCKED = [f"nonews{i}@example.com" for i in range(12)]  # news@ only, manual
SUPPRESSED = UNSUBSCRIBED + BOUNCED + SENDER_BLOCKED


def sup_key(address: str) -> bytes:
    return f"ocr:sup:{{{address}}}".encode()


def spread(prefix: str, per_third: int) -> list[str]:
    """Addresses whose keys fall ``per_third`` into each third of the slots (one per node)."""
    thirds: list[list[str]] = [[], [], []]
    i = 0
    while min(len(t) for t in thirds) < per_third:
        address = f"{prefix}{i}@example.net"
        third = thirds[min(key_slot(sup_key(address)) * 3 // 16384, 2)]
        if len(third) < per_third:
            third.append(address)
        i += 1
    return sorted(a for t in thirds for a in t)


@pytest.fixture
def cluster_config(config_dict: dict[str, Any], cluster_url: str) -> dict[str, Any]:
    config_dict["redis"] = {"url": cluster_url, "cluster": True, "timeout": 2}
    return config_dict


@pytest.fixture
async def relay(make_relay: Any, cluster_config: dict[str, Any]) -> Relay:
    return await make_relay(cluster_config)


def store_of(relay: Relay) -> SuppressionStore:
    assert relay.store is not None
    return relay.store


async def suppress_all(store: SuppressionStore) -> None:
    """One after the other (concurrent use is ``test_concurrent_sessions_right_after_start``)."""
    for address in UNSUBSCRIBED:
        await store.add(address, group_scope("newsletter"), "unsubscribe", "test")
    for address in BOUNCED:
        await store.add(address, GLOBAL, "hard-bounce", "test")
    for address in SENDER_BLOCKED:
        await store.add(address, sender_scope("news@example.com"), "manual", "test")


def assert_spread(cluster: ClusterTopology, addresses: list[str]) -> None:
    """Each address's key is on the node that owns its slot, and every node has some."""
    by_node = cluster.keys_by_node("ocr:sup:*")
    for address in addresses:
        owner = cluster.node_of(sup_key(address).decode())
        assert sup_key(address) in by_node[owner], (address, owner)
    wanted = {sup_key(a) for a in addresses}
    shares = {port: len(keys & wanted) for port, keys in by_node.items()}
    assert all(shares.values()), f"some node holds none of the entries: {shares}"
    assert sum(shares.values()) == len(wanted)


def delivered_to(sink: Sink, since: int = 0) -> list[str]:
    return sorted(r for m in sink.handler.messages[since:] for r in m.rcpt_tos)


async def test_suppressions_on_every_node_are_all_dropped_in_one_message(
    relay: Relay, sink: Sink, redis_cluster: ClusterTopology
) -> None:
    await suppress_all(store_of(relay))
    assert_spread(redis_cluster, SUPPRESSED)

    # marketing: one message to 36 suppressed (on three nodes) and 4 kept recipients
    rcpts = [*SUPPRESSED[::2], *KEPT, *SUPPRESSED[1::2]]
    code, text = await smtp_send(relay.smtp_port, "news@example.com", rcpts, message())
    assert code == 250, text
    assert f"delivered {len(KEPT)}" in text and f"suppressed {len(SUPPRESSED)}" in text, text
    assert delivered_to(sink) == sorted(KEPT)
    assert all(len(m.rcpt_tos) == 1 for m in sink.handler.messages)  # fanned out, one token each

    # another group and sender: only the global entries block it
    before = len(sink.handler.messages)
    sender = "deals@promo.example.com"
    code, text = await smtp_send(relay.smtp_port, sender, rcpts, message(sender=sender))
    assert code == 250, text
    assert delivered_to(sink, before) == sorted(KEPT + UNSUBSCRIBED + SENDER_BLOCKED)

    # transactional: only the global hard bounces block it
    before = len(sink.handler.messages)
    sender = "receipts@example.com"
    code, text = await smtp_send(relay.smtp_port, sender, rcpts, message(sender=sender))
    assert code == 250, text
    assert f"suppressed {len(BOUNCED)}" in text, text
    [got] = sink.handler.messages[before:]
    assert sorted(got.rcpt_tos) == sorted(KEPT + UNSUBSCRIBED + SENDER_BLOCKED)


async def test_concurrent_sessions_right_after_start(
    make_relay: Any, cluster_config: dict[str, Any], sink: Sink, cluster_url: str
) -> None:
    """A relay that just started gets eight SMTP sessions at once: its first lookups overlap."""
    writer = RedisCluster.from_url(cluster_url)
    try:
        await suppress_all(SuppressionStore(writer))
    finally:
        await writer.aclose()

    relay = await make_relay(cluster_config)
    rcpts = {n: [f"s{n}-{r}" for r in KEPT] + SUPPRESSED[n::8] for n in range(8)}
    replies = await asyncio.gather(
        *(smtp_send(relay.smtp_port, "news@example.com", rcpts[n], message()) for n in range(8))
    )
    assert [code for code, _ in replies] == [250] * 8, replies
    assert delivered_to(sink) == sorted(f"s{n}-{r}" for n in range(8) for r in KEPT)


async def test_concurrent_one_click_posts_right_after_start(
    make_relay: Any, cluster_config: dict[str, Any], sink: Sink
) -> None:
    """Sixteen one-click POSTs reach a relay that just started: its first writes overlap."""
    sender = await make_relay(cluster_config)
    rcpts = [f"p{n}@example.net" for n in range(16)]
    code, _ = await smtp_send(sender.smtp_port, "news@example.com", rcpts, message())
    assert code == 250
    tokens = {m.rcpt_tos[0]: token_of(m.data) for m in sink.handler.messages}
    assert sorted(tokens) == sorted(rcpts)

    fresh = await make_relay(cluster_config)  # its Redis client has sent nothing yet
    statuses = await asyncio.gather(*(post(fresh, token) for token in tokens.values()))
    assert statuses == [200] * len(tokens)
    entries = [e async for e in store_of(fresh).scan()]
    assert sorted(e.address for e in entries if e.source == "post") == sorted(rcpts)


async def post(relay: Relay, token: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{relay.http_port}/u/{token}",
            data="List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            allow_redirects=False,
        ) as resp,
    ):
        return resp.status


async def test_one_click_post_writes_to_the_owning_node(
    relay: Relay, sink: Sink, redis_cluster: ClusterTopology
) -> None:
    code, _ = await smtp_send(relay.smtp_port, "news@example.com", KEPT, message())
    assert code == 250
    tokens = {m.rcpt_tos[0]: token_of(m.data) for m in sink.handler.messages}
    assert sorted(tokens) == sorted(KEPT)

    for rcpt in (ALICE, CAROL):
        assert await post(relay, tokens[rcpt]) == 200

    by_node = redis_cluster.keys_by_node("ocr:sup:*")
    for rcpt in (ALICE, CAROL):
        owner = redis_cluster.node_of(sup_key(rcpt).decode())
        assert [port for port, keys in by_node.items() if sup_key(rcpt) in keys] == [owner]
    [entry] = await store_of(relay).entries(ALICE)
    assert (entry.scope, entry.reason, entry.source) == (
        group_scope("newsletter"),
        "unsubscribe",
        "post",
    )

    before = len(sink.handler.messages)
    code, text = await smtp_send(relay.smtp_port, "news@example.com", KEPT, message())
    assert code == 250 and "suppressed 2" in text, text
    assert delivered_to(sink, before) == sorted([BOB, DAN])

    assert relay.redis is not None
    events = await relay.redis.xrange("ocr:events")
    posted = sorted(f[b"address"].decode() for _, f in events if f[b"source"] == b"post")
    assert posted == sorted([ALICE, CAROL])


def token_of(data: bytes) -> str:
    marker = b"List-Unsubscribe: <https://unsub.example.com/u/"
    start = data.index(marker) + len(marker)
    return data[start : data.index(b">", start)].decode()


async def test_scan_export_and_stats_see_every_node(
    relay: Relay, redis_cluster: ClusterTopology
) -> None:
    store = store_of(relay)
    many = [f"user{i}@example.net" for i in range(90)]
    for address in many:
        await store.add(address, GLOBAL, "manual", "test")
    await suppress_all(store)
    everyone = many + SUPPRESSED
    assert_spread(redis_cluster, everyone)

    scanned = [e async for e in store.scan(batch=7)]  # small batches: many SCAN pages per node
    assert sorted(e.address for e in scanned) == sorted(everyone)

    chunks = [c async for c in transfer.export_csv(store, transfer.ExportFilter())]
    rows = list(csv.DictReader(io.StringIO("".join(chunks))))
    assert sorted(r["address"] for r in rows) == sorted(everyone)
    assert {r["reason"] for r in rows} == {"manual", "unsubscribe", "hard-bounce"}

    only_group = transfer.ExportFilter(group="newsletter")
    chunks = [c async for c in transfer.export_csv(store, only_group)]
    rows = list(csv.DictReader(io.StringIO("".join(chunks))))
    assert sorted(r["address"] for r in rows) == sorted(UNSUBSCRIBED)

    result = await transfer.scan_stats(store)
    assert result.addresses == len(everyone)
    kept = await transfer.stats(store)  # kept across nodes, in a key of its own slot
    assert dict(kept.by_scope_reason) == dict(result.by_scope_reason)
    reconciled = await store.reconcile()  # one MULTI over the two {stats} keys
    assert reconciled.addresses == len(everyone)
    assert dict(reconciled.by_scope_reason) == dict(result.by_scope_reason)


async def test_import_lines_writes_across_nodes(
    relay: Relay, sink: Sink, redis_cluster: ClusterTopology
) -> None:
    store = store_of(relay)
    imported = [f"imported{i}@example.org" for i in range(60)]
    lines = [
        "address,reason,group",
        *(f"{a},hard-bounce," for a in imported[:30]),
        *(f"{a},unsubscribe,newsletter" for a in imported[30:]),
        f"{imported[0]},hard-bounce,",  # duplicate in the file
        "not-an-address,manual,",
    ]
    dry = await transfer.import_lines(
        store, lines, scope=GLOBAL, reason="manual", source="import", dry_run=True
    )
    assert (dry.accepted, dry.duplicates, len(dry.invalid)) == (60, 1, 1)

    report = await transfer.import_lines(
        store, lines, scope=GLOBAL, reason="manual", source="import"
    )
    assert (report.accepted, report.duplicates, len(report.invalid)) == (60, 1, 1)
    assert_spread(redis_cluster, imported)
    assert sorted({e.address async for e in store.scan()}) == sorted(imported)

    again = await transfer.import_lines(
        store, lines, scope=GLOBAL, reason="manual", source="import"
    )
    assert (again.accepted, again.duplicates) == (0, 61)

    rcpts = [*imported[::6], ALICE]
    code, text = await smtp_send(relay.smtp_port, "news@example.com", rcpts, message())
    assert code == 250, text
    assert delivered_to(sink) == [ALICE]


async def test_retry_queue_on_cluster(
    relay: Relay, sink: Sink, redis_cluster: ClusterTopology
) -> None:
    await suppress_all(store_of(relay))
    sink.handler.rcpt_replies[BOB] = "451 4.2.0 later"
    sink.handler.rcpt_replies[CAROL] = "451 4.2.0 later"
    rcpts = [ALICE, BOB, CAROL, *BOUNCED]
    code, text = await smtp_send(relay.smtp_port, "news@example.com", rcpts, message())
    assert code == 250, text
    assert "delivered 1" in text and "queued 2" in text and f"suppressed {len(BOUNCED)}" in text

    assert relay.retry is not None
    queued = await relay.retry.list()
    assert sorted(item.rcpt for item in queued) == [BOB, CAROL]
    # the queue and its items share one hash tag: all on one node, the claim script is atomic
    holders = {p: k for p, k in redis_cluster.keys_by_node("ocr:{queue}*").items() if k}
    assert len(holders) == 1
    [(_, queue_keys)] = holders.items()
    # the upstream's partition ZSET, the set of partitions, the message's one body, and
    # two items (each only its own header block)
    assert len(queue_keys) == 5, queue_keys
    assert len([k for k in queue_keys if b":msg:" in k]) == 1

    del sink.handler.rcpt_replies[BOB], sink.handler.rcpt_replies[CAROL]
    for _ in range(100):
        if len(sink.handler.messages) == 3 and not await relay.retry.list():
            break
        await asyncio.sleep(0.1)
    assert delivered_to(sink) == sorted([ALICE, BOB, CAROL])
    assert await relay.retry.list() == []
    left = [k for keys in redis_cluster.keys_by_node("ocr:{queue}*").values() for k in keys]
    assert left == [b"ocr:{queue}:upstreams"]  # only the names of the partitions stay


async def test_patterns_on_cluster(relay: Relay, sink: Sink) -> None:
    store = store_of(relay)
    await suppress_all(store)
    assert await store.add_pattern("blocked.example", "test")
    assert await store.patterns() == ["*@blocked.example"]
    assert await store.pattern_match("X@Blocked.Example") == "*@blocked.example"

    rcpts = ["x@blocked.example", ALICE, "y@blocked.example", *UNSUBSCRIBED, BOB]
    code, text = await smtp_send(relay.smtp_port, "news@example.com", rcpts, message())
    assert code == 250, text
    assert f"suppressed {2 + len(UNSUBSCRIBED)}" in text, text
    assert delivered_to(sink) == sorted([ALICE, BOB])

    before = len(sink.handler.messages)
    sender = "receipts@example.com"
    code, _ = await smtp_send(relay.smtp_port, sender, ["x@blocked.example"], message(sender))
    assert code == 250
    assert delivered_to(sink, before) == ["x@blocked.example"]  # patterns: marketing only

    assert await store.remove_pattern("blocked.example", "test")
    before = len(sink.handler.messages)
    code, _ = await smtp_send(relay.smtp_port, "news@example.com", ["x@blocked.example"], message())
    assert code == 250
    assert delivered_to(sink, before) == ["x@blocked.example"]


# ---------------------------------------------------------------------------
# the command line against the cluster


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ONECLICK_RELAY_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "relay", "suppress", "-c", str(config), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def cluster_yaml(cluster_config: dict[str, Any], tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "relay.yaml", cluster_config)


async def test_cli_add_show_list_export_on_cluster(
    cluster_yaml: Path, redis_cluster: ClusterTopology, tmp_path: Path
) -> None:
    addresses = spread("cli", 2)
    for address in addresses[:3]:
        done = cli(
            cluster_yaml, "add", address.upper(), "--group", "newsletter", "--reason", "unsubscribe"
        )
        assert done.returncode == 0, done.stderr
        assert "added" in done.stdout
    for address in addresses[3:]:
        done = cli(cluster_yaml, "add", address, "--reason", "hard-bounce")
        assert done.returncode == 0, done.stderr
    again = cli(cluster_yaml, "add", addresses[3], "--reason", "hard-bounce")
    assert (again.returncode, again.stdout.split(":")[0]) == (0, "already present")
    assert_spread(redis_cluster, addresses)

    shown = cli(cluster_yaml, "show", addresses[0])
    assert shown.returncode == 0, shown.stderr
    assert "group:newsletter" in shown.stdout and "unsubscribe" in shown.stdout
    assert "source=cli" in shown.stdout

    listed = cli(cluster_yaml, "list")
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split("\t")[0] for line in listed.stdout.splitlines()) == addresses

    out = tmp_path / "export.csv"
    exported = cli(cluster_yaml, "export", "--reason", "hard-bounce", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert sorted(r["address"] for r in rows) == addresses[3:]
    assert {(r["scope"], r["reason"], r["source"]) for r in rows} == {
        ("global", "hard-bounce", "cli")
    }


async def test_cli_import_on_cluster(
    cluster_yaml: Path, redis_cluster: ClusterTopology, tmp_path: Path
) -> None:
    addresses = spread("bulk", 10)
    source = tmp_path / "list.txt"
    source.write_text("\n".join(["# one per line", *addresses, addresses[0]]) + "\n")
    done = cli(cluster_yaml, "import", str(source), "--reason", "manual")
    assert done.returncode == 0, done.stderr
    assert "added: 30, duplicates: 1, invalid: 0" in done.stdout
    assert_spread(redis_cluster, addresses)
