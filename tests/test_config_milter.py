"""relay.config for milter mode: ``milter.*``, an optional ``smtp.listen``, check-config's lines."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from conftest import Keys
from helpers import write_yaml
from test_config import base_config, run_cli

from relay.config import HostPort, parse_config
from relay.errors import ConfigError


def with_milter(keys: Keys, smtp_listen: object = "absent", **milter: Any) -> dict[str, Any]:
    raw = copy.deepcopy(base_config(keys))
    if smtp_listen == "absent":
        raw["smtp"].pop("listen", None)
    else:
        raw["smtp"]["listen"] = smtp_listen
    raw["smtp"].pop("workers", None)
    if milter:
        raw["milter"] = milter
    return raw


def test_inet_milter_and_no_smtp_listener(keys: Keys) -> None:
    config = parse_config(with_milter(keys, listen="inet:127.0.0.1:8891"))
    assert config.milter.listen == HostPort("127.0.0.1", 8891)
    assert config.milter.multi_recipient == "reinject"
    assert config.smtp.listen is None  # a milter-only host


def test_unix_milter_defaults_to_one_worker_and_keeps_smtp(keys: Keys) -> None:
    raw = with_milter(
        keys, "127.0.0.1:2525", listen="unix:/run/oneclick-relay/milter.sock", timeout=60
    )
    config = parse_config(raw)
    assert config.milter.listen == Path("/run/oneclick-relay/milter.sock")
    assert config.milter.timeout == 60
    assert config.smtp.listen == HostPort("127.0.0.1", 2525)
    assert config.smtp.workers == 1


def test_without_milter_smtp_listen_keeps_its_default(keys: Keys) -> None:
    config = parse_config(with_milter(keys))
    assert config.smtp.listen == HostPort("127.0.0.1", 2525)
    assert config.milter.listen is None


@pytest.mark.parametrize(
    ("raw_milter", "smtp", "key"),
    [
        ({"listen": "nonsense"}, {}, "milter.listen"),
        ({"listen": "unix:relative.sock"}, {}, "milter.listen"),
        ({"listen": "127.0.0.1:8891", "multi_recipient": "split"}, {}, "milter.multi_recipient"),
        ({"listen": "127.0.0.1:8891", "timeout": "soon"}, {}, "milter.timeout"),
        ({"listen": "127.0.0.1:8891", "bogus": 1}, {}, "milter.bogus"),
        ({}, {"listen": None}, "smtp.listen"),
        ({"listen": "unix:/run/m.sock"}, {"workers": 2}, "smtp.workers"),
    ],
)
def test_errors_name_the_key(
    keys: Keys, raw_milter: dict[str, Any], smtp: dict[str, Any], key: str
) -> None:
    raw = with_milter(keys, **raw_milter)
    raw["smtp"].update(smtp)
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.key == key


def test_check_config_prints_the_postfix_lines(keys: Keys, tmp_path: Path) -> None:
    raw = with_milter(keys, listen="127.0.0.1:8891")
    raw["upstream"] = {"host": "127.0.0.1", "port": 10026}
    path = write_yaml(tmp_path / "relay.yaml", raw)
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    for expected in (
        "smtp     no listener (milter only)",
        "smtpd_milters = inet:127.0.0.1:8891",
        "milter_default_action = tempfail",
        "milter_protocol = 6",
        "127.0.0.1:10026 inet n - n - - smtpd",
        "-o smtpd_milters=",
    ):
        assert expected in lines, result.stdout
