"""relay.config: the ``unsubscribe:`` body-link and ``compliance:`` keys, errors naming keys."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Keys
from test_config import base_config

from relay.config import parse_config
from relay.config.schema import DEFAULT_FOOTER_TEXT
from relay.errors import ConfigError


def with_unsubscribe(keys: Keys, **section: Any) -> dict[str, Any]:
    raw = base_config(keys)
    raw["unsubscribe"] = section
    return raw


def test_defaults_and_values(keys: Keys) -> None:
    u = parse_config(base_config(keys)).unsubscribe
    assert (u.placeholder, u.footer, u.footer_text) == (
        "%unsubscribe_url%",
        False,
        DEFAULT_FOOTER_TEXT,
    )
    u = parse_config(
        with_unsubscribe(
            keys, placeholder="[[unsub]]", footer=True, footer_text="\nBye: [[unsub]]\n"
        )
    ).unsubscribe
    assert u.placeholder == "[[unsub]]" and u.footer
    assert u.footer_text == "\r\nBye: [[unsub]]\r\n"  # line breaks kept, made CRLF
    assert "[[unsub]]" in u.footer_html  # the default footer follows the placeholder


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"placeholder": "a b"}, "unsubscribe.placeholder"),
        ({"placeholder": "%u"}, "unsubscribe.placeholder"),
        ({"placeholder": "%unsubscribe_ü%"}, "unsubscribe.placeholder"),
        ({"footer": "yes"}, "unsubscribe.footer"),
        ({"footer_text": "no link here"}, "unsubscribe.footer_text"),
        ({"footer_html": 3}, "unsubscribe.footer_html"),
    ],
)
def test_error_names_the_dotted_key(keys: Keys, section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(with_unsubscribe(keys, **section))
    assert err.value.key == key, str(err.value)


def test_group_mailto_leaves_room_for_the_code(keys: Keys) -> None:
    raw = base_config(keys)
    raw["policy"]["groups"]["newsletter"]["mailto"] = "u" * 48 + "@example.com"
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.key == "policy.groups.newsletter.mailto"
    raw["policy"]["groups"]["newsletter"]["mailto"] = "u" * 47 + "@example.com"
    assert parse_config(raw).policy.groups["newsletter"].mailto


def test_compliance_section(keys: Keys) -> None:
    assert parse_config(base_config(keys)).compliance.cfbl_address is None
    raw = base_config(keys)
    raw["compliance"] = {
        "cfbl_address": "FBL@Example.com",
        "feedback_id": "{group}:{class}:exco",
        "require_body_link": True,
    }
    raw["policy"]["groups"]["newsletter"]["feedback_id"] = "news:{domain}:exco"
    config = parse_config(raw)
    c = config.compliance
    assert (c.cfbl_address, c.feedback_id, c.require_body_link) == (
        "fbl@example.com",
        "{group}:{class}:exco",
        True,
    )
    assert config.policy.groups["newsletter"].feedback_id == "news:{domain}:exco"


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("compliance.cfbl_address", "not an address"),
        ("compliance.cfbl_address", "fbl@example.com; report=arf"),
        ("compliance.feedback_id", "{campaign}:{class}"),
        ("compliance.feedback_id", "{group:x"),
        ("compliance.feedback_id", "has space"),
        ("compliance.require_body_link", "yes"),
        ("compliance.unknown", 1),
        ("policy.groups.newsletter.feedback_id", "{nope}"),
    ],
)
def test_compliance_errors_name_the_key(keys: Keys, dotted: str, value: object) -> None:
    raw = base_config(keys)
    *path, last = dotted.split(".")
    node = raw
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.key == dotted, str(err.value)


def test_unsubscribe_days(keys: Keys) -> None:
    from relay.suppression.store import DAY, SuppressionPolicy

    config = parse_config(base_config(keys))
    assert config.suppression.unsubscribe_days is None
    assert SuppressionPolicy.from_config(config.suppression).default_ttl("unsubscribe") is None
    raw = base_config(keys)
    raw["suppression"] = {"unsubscribe_days": 90}
    policy = SuppressionPolicy.from_config(parse_config(raw).suppression)
    assert policy.default_ttl("unsubscribe") == 90 * DAY
    assert policy.default_ttl("complaint") is None
    raw["suppression"] = {"unsubscribe_days": 0}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.key == "suppression.unsubscribe_days"
