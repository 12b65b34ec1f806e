"""What a reload applies and what waits for a restart (relay.runtime.reload)."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from helpers import build_config

from relay.config import HostPort
from relay.runtime.reload import RESTART_ONLY, changed_keys, is_restart_only, plan


def test_nothing_changed_is_an_empty_plan(config_dict: dict[str, Any]) -> None:
    config = build_config(config_dict)
    result = plan(config, config, build_config(config_dict))
    assert result.live == result.restart == ()
    assert result.config == config


def test_changed_keys_are_dotted_and_descend_into_sections(config_dict: dict[str, Any]) -> None:
    old = build_config(config_dict)
    new_dict = copy.deepcopy(config_dict)
    new_dict["upstream"]["port"] += 1
    new_dict["smtp"]["max_recipients"] = 7
    new_dict["bounces"] = {"thresholds": {"hard": 2}}
    assert sorted(changed_keys(old, build_config(new_dict))) == [
        "bounces.thresholds.hard",
        "smtp.max_recipients",
        "upstream.port",
    ]


def test_live_keys_apply_and_restart_only_keys_keep_their_running_value(
    config_dict: dict[str, Any],
) -> None:
    old = build_config(config_dict)
    new_dict = copy.deepcopy(config_dict)
    new_dict["upstream"]["port"] += 1
    new_dict["policy"]["senders"].insert(0, {"match": "x@example.com", "class": "marketing"})
    new_dict["smtp"]["max_recipients"] = 7
    new_dict["http"]["listen"] = "127.0.0.1:8999"
    new_dict["http"]["public_url"] = "https://other.example.com"
    new_dict["redis"]["on_error"] = {"marketing": "deliver"}
    new_dict["redis"]["key_prefix"] = "other"
    new = build_config(new_dict)
    result = plan(old, old, new)
    assert set(result.live) == {
        "upstream.port",
        "policy.senders",
        "http.public_url",
        "redis.on_error.marketing",
    }
    assert set(result.restart) == {"smtp.max_recipients", "http.listen", "redis.key_prefix"}
    cfg = result.config
    assert cfg.upstream == new.upstream and cfg.policy == new.policy
    assert cfg.http.public_url == "https://other.example.com"
    assert cfg.redis.on_error == new.redis.on_error
    assert cfg.smtp == old.smtp
    assert cfg.http.listen == old.http.listen
    assert cfg.redis.key_prefix == "ocr"


def test_a_supervisors_concrete_ports_are_kept_without_a_warning(
    config_dict: dict[str, Any],
) -> None:
    """With smtp.workers > 1 each worker runs on port 0 made concrete: not a change."""
    baseline = build_config(config_dict)
    running = replace(baseline, smtp=replace(baseline.smtp, listen=HostPort("127.0.0.1", 40001)))
    result = plan(baseline, running, build_config(config_dict))
    assert result.restart == ()
    assert result.config.smtp.listen == HostPort("127.0.0.1", 40001)


def test_every_restart_only_key_names_a_real_key(config_dict: dict[str, Any]) -> None:
    config = build_config(config_dict)
    for key in RESTART_ONLY:
        obj: object = config
        for name in key.split("."):
            assert hasattr(obj, name), key
            obj = getattr(obj, name)
    assert is_restart_only("smtp.tls.cert_file")
    assert not is_restart_only("http.public_url")
    assert not is_restart_only("smtpx")
