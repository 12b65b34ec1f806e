"""relay.config: the ``bounces:`` and ``unsubscribe:`` sections, every error naming its key."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from conftest import Keys
from test_config import base_config

from relay.config import BounceThresholds, HostPort, MiB, parse_config
from relay.errors import ConfigError


def with_bounces(keys: Keys) -> dict[str, Any]:
    raw = base_config(keys)
    raw["bounces"] = {
        "return_path_domain": "Bounce.Example.COM",
        "local_part": "rp",
        "listen": "127.0.0.1:2526",
        "protocol": "lmtp",
        "feedback_addresses": ["FBL@example.com"],
        "keep_days": 14,
        "max_message_size": "2MiB",
        "timeout": 30,
        "accept_unsigned": True,
        "thresholds": {"hard": 2, "soft": 4, "unknown": "never", "policy": 10},
        "classify": {
            "5.4.1": "hard",
            "4.7": "soft",
            "5.7.1": "blocked",
            "Not our customer": "user-unknown",
        },
        "suppress_suspended": True,
    }
    raw["unsubscribe"] = {"mailto_domain": "unsub.example.com", "mailto_local_part": "leave"}
    return raw


def test_sections_parse(keys: Keys) -> None:
    config = parse_config(with_bounces(keys))
    b = config.bounces
    assert (b.return_path_domain, b.local_part) == ("bounce.example.com", "rp")
    assert (b.listen, b.protocol) == (HostPort("127.0.0.1", 2526), "lmtp")
    assert b.feedback_addresses == ("fbl@example.com",)
    assert (b.keep_days, b.max_message_size, b.timeout) == (14.0, 2 * MiB, 30.0)
    assert b.accept_unsigned is True
    assert b.thresholds == BounceThresholds(hard=2, soft=4, unknown=0, policy=10)
    assert b.classify == (
        ("5.4.1", "hard"),
        ("4.7", "soft"),
        ("5.7.1", "blocked"),
        ("Not our customer", "user-unknown"),
    )
    assert b.suppress_suspended is True
    assert b.accepted_addresses() == ("rp@bounce.example.com", "fbl@example.com")
    assert config.unsubscribe.mailto_address == "leave@unsub.example.com"


def test_defaults(keys: Keys) -> None:
    config = parse_config(base_config(keys))
    b = config.bounces
    assert (b.return_path_domain, b.listen, b.local_part) == (None, None, "bounces")
    assert b.thresholds == BounceThresholds(hard=1, soft=5, unknown=3, policy=0)
    assert (b.keep_days, b.accept_unsigned, b.classify) == (30.0, False, ())
    assert b.suppress_suspended is False
    assert config.unsubscribe.mailto_address is None


def _set(raw: dict[str, Any], dotted: str, value: object) -> None:
    *path, last = dotted.split("/")
    node = raw
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


@pytest.mark.parametrize(
    ("dotted", "value", "key"),
    [
        ("bounces/return_path_domain", "not a domain", "bounces.return_path_domain"),
        ("bounces/local_part", "bounces+x", "bounces.local_part"),
        ("bounces/local_part", "a" * 17, "bounces.local_part"),
        ("bounces/listen", "nowhere", "bounces.listen"),
        ("bounces/protocol", "pop3", "bounces.protocol"),
        ("bounces/feedback_addresses", ["not-an-address"], "bounces.feedback_addresses[0]"),
        ("bounces/feedback_addresses", "fbl@example.com", "bounces.feedback_addresses"),
        ("bounces/keep_days", 0, "bounces.keep_days"),
        ("bounces/max_message_size", "huge", "bounces.max_message_size"),
        ("bounces/timeout", -1, "bounces.timeout"),
        ("bounces/accept_unsigned", "yes", "bounces.accept_unsigned"),
        ("bounces/thresholds/soft", 0, "bounces.thresholds.soft"),
        ("bounces/thresholds/hard", "twice", "bounces.thresholds.hard"),
        ("bounces/thresholds/spam", 1, "bounces.thresholds.spam"),
        ("bounces/classify/5.1.x", "hard", "bounces.classify.5.1.x"),
        ("bounces/classify/5.1.1", "fatal", "bounces.classify.5.1.1"),
        ("bounces/classify/6.0.0", "hard", "bounces.classify.6.0.0"),
        ("bounces/classify/ab", "hard", "bounces.classify.ab"),
        ("bounces/classify/not our customer", "complaint", "bounces.classify.not our customer"),
        ("bounces/classify/not our customer", "auto-reply", "bounces.classify.not our customer"),
        ("bounces/suppress_suspended", "yes", "bounces.suppress_suspended"),
        ("bounces/bogus", 1, "bounces.bogus"),
        ("unsubscribe/mailto_domain", "-bad-.example", "unsubscribe.mailto_domain"),
        ("unsubscribe/mailto_local_part", "un sub", "unsubscribe.mailto_local_part"),
        ("unsubscribe/mailto", "x@example.com", "unsubscribe.mailto"),
    ],
)
def test_error_names_the_dotted_key(keys: Keys, dotted: str, value: object, key: str) -> None:
    raw = copy.deepcopy(with_bounces(keys))
    _set(raw, dotted, value)
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.key == key, str(err.value)


def test_unquoted_code_is_refused_with_a_hint(keys: Keys) -> None:
    raw = with_bounces(keys)
    raw["bounces"]["classify"] = {5.7: "hard"}  # what YAML makes of an unquoted 5.7
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.key == "bounces.classify.5.7"
    assert "quote" in err.value.problem


def test_listener_needs_an_address_to_accept_mail_for(keys: Keys) -> None:
    raw = base_config(keys)
    raw["policy"]["groups"]["newsletter"].pop("mailto")
    raw["bounces"] = {"listen": "127.0.0.1:2526"}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.key == "bounces.listen"
    raw["bounces"]["feedback_addresses"] = ["fbl@example.com"]
    assert parse_config(raw).bounces.listen == HostPort("127.0.0.1", 2526)


def test_listener_must_not_share_the_relay_port(keys: Keys) -> None:
    raw = with_bounces(keys)
    raw["bounces"]["listen"] = raw["smtp"]["listen"]
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.key == "bounces.listen"


def test_check_config_describes_bounces(keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    from relay.cli.commands import check_config

    assert check_config(parse_config(with_bounces(keys))) == 0
    out = capsys.readouterr().out
    assert "bounces  return path rp+<code>@bounce.example.com (VERP)" in out
    assert "lmtp listen 127.0.0.1:2526, thresholds hard=2 soft=4 unknown=never policy=10" in out
    assert "mailto   leave+<code>@unsub.example.com?subject=unsubscribe%20<token>" in out
