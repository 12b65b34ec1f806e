"""The lifecycle's pieces (relay.runtime.lifecycle): background tasks and listeners."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from relay.config import HostPort
from relay.runtime.lifecycle import (
    Drained,
    StartError,
    background,
    bound_port,
    check_port,
    listening,
)
from relay.smtp.server import ShieldedTransactions


async def test_a_background_task_that_honours_stop_ends_cleanly() -> None:
    stopped = asyncio.Event()

    async def run() -> None:
        await stopped.wait()

    async with background("honours", run, stopped.set) as task:
        assert not task.done()
    assert task.done() and not task.cancelled()


async def test_a_background_task_that_ignores_stop_is_cancelled_after_the_grace() -> None:
    async def run() -> None:
        await asyncio.sleep(3600)

    async with background("stubborn", run, lambda: None, grace=0.05) as task:
        pass
    assert task.cancelled()


async def test_a_background_task_that_failed_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR):
        async with background("failing", run) as task:
            await asyncio.wait({task})
    assert "failing stopped with error=ValueError" in caplog.text


def _occupied() -> tuple[socket.socket, HostPort]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, HostPort("127.0.0.1", holder.getsockname()[1])


async def test_a_port_in_use_is_a_start_error_naming_the_key() -> None:
    holder, listen = _occupied()
    transactions = ShieldedTransactions()
    with holder, pytest.raises(StartError) as caught:
        async with listening(
            "bounces.listen",
            listen,
            lambda: asyncio.get_running_loop().create_server(
                asyncio.Protocol, "127.0.0.1", listen.port
            ),
            transactions.drain,
            1.0,
            Drained(),
            "inbound messages",
        ):
            raise AssertionError("must not be entered")
    assert str(caught.value) == f"bounces.listen: cannot listen on {listen}: Address already in use"
    with _occupied()[0] as other, pytest.raises(StartError, match=r"^smtp\.listen: cannot listen"):
        check_port("smtp.listen", HostPort("127.0.0.1", other.getsockname()[1]))


def test_a_free_port_passes_the_check() -> None:
    holder, listen = _occupied()
    holder.close()
    check_port("smtp.listen", listen)


async def test_leaving_stops_accepting_then_counts_what_the_drain_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transactions = ShieldedTransactions()
    drained = Drained()
    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.ERROR):
        async with listening(
            "smtp.listen",
            HostPort("127.0.0.1", 0),
            lambda: loop.create_server(asyncio.Protocol, "127.0.0.1", 0),
            transactions.drain,
            0.1,
            drained,
            "transactions",
        ) as server:
            port = bound_port(server)
            slow = loop.create_task(transactions.run_shielded(asyncio.sleep(3600)))
            quick = loop.create_task(transactions.run_shielded(asyncio.sleep(0.01)))
            await asyncio.sleep(0)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
    assert drained.cut == 1
    assert "shutdown: 1 transactions still running were cut" in caplog.text
    await quick
    for task in (slow, *transactions.inflight):
        task.cancel()
    await asyncio.gather(slow, *transactions.inflight, return_exceptions=True)
