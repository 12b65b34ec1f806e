"""The composition root (relay.runtime.parts): one set of factories for serve, ingest and
the store commands, against a real Redis."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from helpers import build_config, children

from relay.errors import ConfigError, StoreUnavailable
from relay.metrics import Metrics
from relay.runtime import parts
from relay.store.embedded import free_port


async def test_the_live_parts_share_one_store_and_one_set_of_counters(
    config_dict: dict[str, Any],
) -> None:
    """What the pipeline counts and what a click counts land in the same daily counters."""
    config = build_config(config_dict)
    async with parts.open_stores(config) as stores:
        live = parts.live(config, stores, Metrics())
        token = live.handling.tokens.issue("ann@example.net", "newsletter")
        await live.handling.unsubscriber.unsubscribe(token, "post", "test", "127.0.0.1")
        [entry] = await stores.store.entries("ann@example.net")
        assert entry.reason == "unsubscribe"
        await stores.counters.flush()
        [row] = await stores.counters.report(1)
        assert row.counts == {"unsubscribe": 1}


async def test_live_keeps_a_given_upstream_and_reads_the_dkim_keys(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    config = build_config(config_dict)
    async with parts.open_stores(config) as stores:
        first = parts.live(config, stores, Metrics())
        again = parts.live(config, stores, Metrics(), upstream=first.upstream)
        assert again.upstream is first.upstream
        assert again.signer.domains == ["example.com"]
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("not a key\n")
        config_dict["dkim"][0]["private_key_file"] = str(garbage)
        with pytest.raises(ConfigError, match=r"^dkim\[0\]\.private_key_file"):
            parts.live(build_config(config_dict), stores, Metrics())
        await first.upstream.close()


async def test_command_stores_name_where_redis_is_when_it_refuses(
    config_dict: dict[str, Any],
) -> None:
    port = free_port()
    config_dict["redis"]["url"] = f"redis://:hunter2@127.0.0.1:{port}/0"
    config = build_config(config_dict)
    with pytest.raises(StoreUnavailable) as caught:
        async with parts.command_stores(config) as stores:
            await stores.store.entries("a@example.net")
    assert str(caught.value).endswith(f"(redis at 127.0.0.1:{port})")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(StoreUnavailable, match=r"^redis: ConnectionError \(redis at"):
        async with parts.command_stores(config) as stores:
            await stores.redis.xread({"ocr:events": "$"}, block=100)  # a raw call


async def test_command_stores_need_a_shared_redis(config_dict: dict[str, Any]) -> None:
    del config_dict["redis"]
    with pytest.raises(ConfigError, match=r"^redis\.url: the CLI needs a shared Redis"):
        async with parts.command_stores(build_config(config_dict)):
            raise AssertionError("must not be entered")


def _redis_children() -> set[int]:
    found = set()
    for pid in children(os.getpid()):
        try:
            if b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            pass
    return found


async def test_the_embedded_redis_stops_when_its_block_fails() -> None:
    before = _redis_children()
    seen: list[int] = []

    async def fail_after_start() -> None:
        async with parts.embedded_redis():
            seen.extend(_redis_children() - before)
            raise RuntimeError("a later step failed")

    with pytest.raises(RuntimeError, match="later step failed"):
        await fail_after_start()
    assert len(seen) == 1
    assert _redis_children() == before


def test_check_files_names_the_key_of_a_bad_certificate(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    garbage = tmp_path / "cert.pem"
    garbage.write_text("not a certificate\n")
    config_dict["smtp"]["tls"] = {"cert_file": str(garbage), "key_file": str(garbage)}
    with pytest.raises(ConfigError, match=r"^smtp\.tls\.cert_file: cannot load"):
        parts.check_files(build_config(config_dict))
