"""The relay on a real Sentinel-managed master and replica (``redis.sentinel``), nothing mocked.

Besides plain delivery and suppression, two failovers happen while a background loop keeps
sending marketing mail that names suppressed recipients: one asked of the Sentinel
(``SENTINEL FAILOVER``) and one forced by killing the master. Whatever the timing, a
message may be answered ``250`` only after its suppression check: no suppressed recipient
ever reaches the sink, each accepted message's kept recipients arrive exactly once, and a
message that could not be checked is answered ``451`` (retryable) and sent nowhere.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from conftest import Sink
from helpers import build_config, message, smtp_send
from redis.asyncio.sentinel import SentinelConnectionPool
from redis_topologies import MASTER_NAME, SentinelTopology, client

from relay.runtime.app import Relay
from relay.suppression.store import GLOBAL, SuppressionStore, group_scope

ALICE, BOB = "alice@example.net", "bob@example.org"
UNSUBSCRIBED = [f"unsub{i}@example.net" for i in range(3)]
BOUNCED = [f"bounced{i}@example.org" for i in range(3)]
SUPPRESSED = UNSUBSCRIBED + BOUNCED
FOLLOW = 2.0
StartRelay = Callable[[SentinelTopology], Awaitable[Relay]]
"""Seconds after the Sentinel names the new master by which the relay must write there."""


@pytest.fixture
async def start_relay(
    config_dict: dict[str, Any],
) -> AsyncIterator[Callable[[SentinelTopology], Awaitable[Relay]]]:
    """Start relays on a topology's Sentinel; stop them at the end of the test.

    ``Relay.stop()`` leaves its connections to the Sentinel open (that is
    ``test_stop_closes_the_sentinel_connections``); they are closed here after it, so
    their ResourceWarnings do not fail whichever later test collects them.
    """
    started: list[Relay] = []

    async def factory(topology: SentinelTopology) -> Relay:
        relay = Relay(build_config(sentinel_config(config_dict, topology)))
        await relay.start()
        started.append(relay)
        return relay

    yield factory
    for relay in reversed(started):
        await relay.stop()
        await close_sentinel_connections(relay)


async def close_sentinel_connections(relay: Relay) -> None:
    """What ``Relay.stop()`` should do and does not (yet)."""
    pool = getattr(relay.redis, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        for sentinel_client in pool.sentinel_manager.sentinels:
            await sentinel_client.aclose()


def sentinel_config(config_dict: dict[str, Any], topology: SentinelTopology) -> dict[str, Any]:
    config_dict["redis"] = topology.redis_config
    return config_dict


def store_of(relay: Relay) -> SuppressionStore:
    assert relay.store is not None
    return relay.store


async def suppress(relay: Relay, topology: SentinelTopology) -> None:
    """Write the suppressions and wait until the replica has them (WAIT 1 1000)."""
    store = store_of(relay)
    for address in UNSUBSCRIBED:
        assert await store.add(address, group_scope("newsletter"), "unsubscribe", "test")
    for address in BOUNCED:
        assert await store.add(address, GLOBAL, "hard-bounce", "test")

    def replicated() -> int:
        with client(topology.master_port()) as master:
            return int(master.execute_command("WAIT", 1, 1000))

    assert await asyncio.to_thread(replicated) == 1, "the replica did not acknowledge"


def keys_on(port: int, pattern: str = "ocr:sup:*") -> set[bytes]:
    with client(port) as c:
        return set(c.scan_iter(match=pattern))


async def test_delivers_and_suppresses_through_sentinel(
    start_relay: StartRelay, sink: Sink, sentinel: SentinelTopology
) -> None:
    relay = await start_relay(sentinel)
    await suppress(relay, sentinel)
    master = sentinel.master_port()
    [replica] = [s.port for s in sentinel.servers if s.port != master]
    wanted = {f"ocr:sup:{{{a}}}".encode() for a in SUPPRESSED}
    assert keys_on(master) == wanted and keys_on(replica) == wanted

    code, text = await smtp_send(
        relay.smtp_port, "news@example.com", [ALICE, *SUPPRESSED, BOB], message()
    )
    assert code == 250, text
    assert f"suppressed {len(SUPPRESSED)}" in text, text
    assert sorted(r for m in sink.handler.messages for r in m.rcpt_tos) == [ALICE, BOB]

    before = len(sink.handler.messages)
    sender = "receipts@example.com"
    code, text = await smtp_send(relay.smtp_port, sender, [ALICE, *SUPPRESSED], message(sender))
    assert code == 250, text
    [got] = sink.handler.messages[before:]
    assert sorted(got.rcpt_tos) == sorted([ALICE, *UNSUBSCRIBED])  # hard bounces only

    # a one-click POST writes through the Sentinel-discovered master
    token = token_of(next(m.data for m in sink.handler.messages if m.rcpt_tos == (ALICE,)))
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{relay.http_port}/u/{token}",
            data="List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
    assert f"ocr:sup:{{{ALICE}}}".encode() in keys_on(master)
    before = len(sink.handler.messages)
    code, text = await smtp_send(relay.smtp_port, "news@example.com", [ALICE, BOB], message())
    assert code == 250 and "suppressed 1" in text, text
    assert [m.rcpt_tos for m in sink.handler.messages[before:]] == [(BOB,)]


def sentinel_clients(topology: SentinelTopology) -> set[str]:
    """The addresses of the clients connected to the Sentinel now."""
    with topology.sentinel_client() as s:
        return {c["addr"] for c in s.client_list()}


async def test_stop_closes_the_sentinel_connections(
    config_dict: dict[str, Any], sink: Sink, sentinel: SentinelTopology
) -> None:
    before = sentinel_clients(sentinel)
    relay = Relay(build_config(sentinel_config(config_dict, sentinel)))
    await relay.start()
    try:
        code, _ = await smtp_send(relay.smtp_port, "news@example.com", [ALICE], message())
        assert code == 250
        relays = sentinel_clients(sentinel) - before
        assert relays, "the relay never asked the Sentinel?"
    finally:
        await relay.stop()
    await asyncio.sleep(0.1)
    still = relays & sentinel_clients(sentinel)
    await close_sentinel_connections(relay)  # not to leak into later tests
    assert not still, "the stopped relay is still connected to the Sentinel"


def token_of(data: bytes) -> str:
    marker = b"List-Unsubscribe: <https://unsub.example.com/u/"
    start = data.index(marker) + len(marker)
    return data[start : data.index(b">", start)].decode()


# ---------------------------------------------------------------------------
# failover while mail is flowing


@dataclass(frozen=True)
class Sent:
    n: int
    started: float
    ended: float
    code: int
    text: str
    kept: tuple[str, str]


async def send_loop(relay: Relay, stop: asyncio.Event, results: list[Sent]) -> None:
    """Marketing messages one after another, each to two kept and two suppressed recipients."""
    n = 0
    while not stop.is_set():
        kept = (f"m{n}-a@example.net", f"m{n}-b@example.org")
        rcpts = [kept[0], SUPPRESSED[n % 6], kept[1], SUPPRESSED[(n + 1) % 6]]
        started = time.monotonic()
        code, text = await smtp_send(relay.smtp_port, "news@example.com", rcpts, message())
        results.append(Sent(n, started, time.monotonic(), code, text, kept))
        n += 1
        await asyncio.sleep(0.01)


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def run_failover(
    relay: Relay,
    sink: Sink,
    topology: SentinelTopology,
    trigger: Callable[[int], None],
    label: str,
) -> tuple[list[Sent], float, float]:
    """Send in the background, ``trigger(old_master_port)``, wait for the new master and
    for the relay to deliver through it; returns the results, trigger and switch times."""
    results: list[Sent] = []
    stop = asyncio.Event()
    loop_task = asyncio.create_task(send_loop(relay, stop, results))
    try:
        await until(lambda: len(results) >= 5, 10, "five messages before the failover")
        old = topology.master_port()
        triggered = time.monotonic()
        await asyncio.to_thread(trigger, old)
        new = old
        while new == old:
            assert time.monotonic() - triggered < 15, "the Sentinel did not promote the replica"
            await asyncio.sleep(0.05)
            new = await asyncio.to_thread(topology.master_port)
        switched = time.monotonic()
        await until(
            lambda: sum(r.started > switched and r.code == 250 for r in results) >= 8,
            15,
            "eight messages delivered through the new master",
        )
        # the relay may take a moment to follow the switch; two seconds is plenty
        await asyncio.sleep(max(0.0, switched + FOLLOW - time.monotonic()))
    finally:
        stop.set()
        await loop_task

    codes = Counter(r.code for r in results)
    refused = [r.ended - triggered for r in results if r.code != 250]
    window = f"{min(refused):.2f}-{max(refused):.2f}s after the trigger" if refused else "none"
    print(
        f"\n[{label}] sent={len(results)} 250={codes[250]} 451={codes[451]}"
        f" other={len(results) - codes[250] - codes[451]}"
        f" failover={switched - triggered:.2f}s (master {old} -> {new}) 451 window: {window}"
    )
    return results, triggered, switched


def assert_never_unchecked(results: list[Sent], sink: Sink, triggered: float) -> None:
    delivered = Counter(r for m in sink.handler.messages for r in m.rcpt_tos)
    assert not set(delivered) & set(SUPPRESSED), "a suppressed recipient reached the sink"
    for r in results:
        if r.code == 250:
            assert "delivered 2" in r.text and "suppressed 2" in r.text, r
            assert [delivered[k] for k in r.kept] == [1, 1], r
        else:
            assert (r.code, r.text[:5]) == (451, "4.3.0"), r  # retryable: lookup failed
            assert [delivered[k] for k in r.kept] == [0, 0], r
            assert r.ended >= triggered, f"a 451 before the failover: {r}"
    accepted = sum(r.code == 250 for r in results)
    assert sum(delivered.values()) == 2 * accepted  # nothing else was sent
    assert all(r.code == 250 for r in results[-5:]), "not delivering again after the failover"


async def assert_writes_reach_new_master(
    relay: Relay, sink: Sink, topology: SentinelTopology
) -> None:
    """Entries written before the failover are on the new master; new writes land there.

    Called ``FOLLOW`` seconds after the switch: a write acknowledged then must not go to
    the old master, whose data set is replaced (and the write lost) when it is demoted.
    """
    master = topology.master_port()
    assert {f"ocr:sup:{{{a}}}".encode() for a in SUPPRESSED} <= keys_on(master)
    assert await store_of(relay).add(ALICE, GLOBAL, "manual", "test")
    assert f"ocr:sup:{{{ALICE}}}".encode() in keys_on(master)
    before = len(sink.handler.messages)
    code, text = await smtp_send(relay.smtp_port, "news@example.com", [ALICE, BOB], message())
    assert code == 250 and "suppressed 1" in text, text
    assert [m.rcpt_tos for m in sink.handler.messages[before:]] == [(BOB,)]

    # the retry queue (MULTI writes, the claim script) works on the new master too
    carol = "carol@example.com"
    sink.handler.rcpt_replies[carol] = "451 4.2.0 later"
    code, text = await smtp_send(relay.smtp_port, "news@example.com", [BOB, carol], message())
    assert code == 250 and "queued 1" in text, text
    assert relay.retry is not None
    assert [item.rcpt for item in await relay.retry.list()] == [carol]
    assert keys_on(master, "ocr:{queue}:up:*")  # the upstream's retry partition
    del sink.handler.rcpt_replies[carol]
    await until(lambda: any(m.rcpt_tos == (carol,) for m in sink.handler.messages), 10, "retry")
    await until_empty(relay)


async def until_empty(relay: Relay) -> None:
    assert relay.retry is not None
    for _ in range(100):
        if not await relay.retry.list():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the retry queue did not empty")


async def test_sentinel_failover_during_send_loop(
    start_relay: StartRelay, sink: Sink, sentinel: SentinelTopology
) -> None:
    relay = await start_relay(sentinel)
    await suppress(relay, sentinel)

    def failover(_old: int) -> None:
        with sentinel.sentinel_client() as s:
            assert s.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)

    results, triggered, _ = await run_failover(relay, sink, sentinel, failover, "SENTINEL FAILOVER")
    assert_never_unchecked(results, sink, triggered)
    await assert_writes_reach_new_master(relay, sink, sentinel)


async def test_master_killed_during_send_loop(
    make_sentinel: Callable[[], SentinelTopology],  # first: its servers outlive the relay
    start_relay: StartRelay,
    sink: Sink,
) -> None:
    topology = make_sentinel()  # its own servers: this one loses a process
    relay = await start_relay(topology)
    await suppress(relay, topology)

    def kill(old: int) -> None:
        topology.server(old).kill()

    results, triggered, _ = await run_failover(relay, sink, topology, kill, "master killed")
    assert_never_unchecked(results, sink, triggered)
    # with the master gone, some lookups must have failed: they were answered 451
    assert any(r.code == 451 for r in results), "no lookup failed while the master was down?"
    await assert_writes_reach_new_master(relay, sink, topology)
