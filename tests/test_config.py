"""relay.config: a valid file parses, every bad key is named, and ``check-config`` on the CLI."""

from __future__ import annotations

import copy
import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Keys
from helpers import write_yaml

from relay.config import HostPort, MiB, Secret, load_config, parse_config
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TOKEN_SECRET_ENV = "OCR_TEST_TOKEN_SECRET"


def base_config(keys: Keys) -> dict[str, Any]:
    """A complete, valid config touching every section (no servers needed)."""
    return {
        "smtp": {
            "listen": "127.0.0.1:2525",
            "allowed_networks": ["127.0.0.0/8", "::1/128", "192.0.2.0/24"],
            "hostname": "relay.example.com",
            "max_message_size": "25MiB",
            "max_recipients": 500,
            "timeout": 120,
            "drain_timeout": 10,
        },
        "upstream": {
            "host": "mx.example.com",
            "port": 587,
            "tls": "starttls",
            "username": "relay",
            "password_file": str(keys.token_k2),
            "timeout": 20,
            "connections": 4,
            "helo_name": "relay.example.com",
        },
        "http": {
            "listen": "[::1]:8080",
            "public_url": "https://unsubscribe.example.com/",
            "max_body_size": 4096,
        },
        "redis": {
            "url": "redis://127.0.0.1:6379/0",
            "key_prefix": "ocr",
            "timeout": 1.5,
            "on_error": {"marketing": "tempfail", "transactional": "deliver"},
        },
        "tokens": {
            "keys": [
                {"id": "k2", "secret_file": str(keys.token_k2)},
                {"id": "k1", "secret_file": str(keys.token_k1)},
            ],
            "max_age_days": 90,
        },
        "dkim": [
            {"domain": "Example.COM", "selector": "s2026", "private_key_file": str(keys.rsa)},
            {"domain": "example.com", "selector": "e2026", "private_key_file": str(keys.ed25519)},
        ],
        "policy": {
            "default_class": "transactional",
            "default_group": "general",
            "groups": {
                "newsletter": {
                    "display_name": "Example News",
                    "list_id": "Example News <newsletter.example.com>",
                    "mailto": "mailto:unsubscribe@example.com",
                }
            },
            "senders": [
                {"match": "News@Example.com", "class": "marketing", "group": "newsletter"},
                {"match": "*@promo.example.com", "class": "marketing"},
                {"match": "receipts@example.com", "class": "transactional"},
                {
                    "match": "offers-*@example.com",
                    "class": "marketing",
                    "group": "offers",
                    "unsubscribe_scope": "sender",
                    "keep_app_unsubscribe": True,
                },
            ],
        },
        "retry": {"max_age": 86400, "first_delay": 30, "max_delay": 600, "poll_interval": 1},
    }


# ---------------------------------------------------------------------------
# A valid config


def test_full_config_parses(keys: Keys) -> None:
    config = parse_config(base_config(keys))
    assert config.smtp.listen == HostPort("127.0.0.1", 2525)
    assert config.smtp.allowed_networks[2] == ipaddress.ip_network("192.0.2.0/24")
    assert config.smtp.max_message_size == 25 * MiB
    assert config.smtp.max_recipients == 500
    assert config.upstream.tls == "starttls"
    assert config.upstream.password == Secret(keys.token_k2.read_bytes().strip())
    assert config.http.listen == HostPort("::1", 8080)
    assert str(config.http.listen) == "[::1]:8080"
    assert config.http.public_url == "https://unsubscribe.example.com"  # trailing / dropped
    assert config.redis.on_error.for_class("marketing") == "tempfail"
    assert config.redis.on_error.for_class("transactional") == "deliver"
    assert [k.id for k in config.tokens.keys] == ["k2", "k1"]
    assert config.tokens.keys[1].secret.reveal() == keys.token_k1.read_bytes().strip()
    assert config.tokens.max_age_days == 90
    assert [(k.domain, k.selector) for k in config.dkim.keys] == [
        ("example.com", "s2026"),
        ("example.com", "e2026"),
    ]
    assert config.dkim.keys[1].private_key_file == keys.ed25519
    assert config.dkim.require_for_marketing is False
    rules = config.policy.senders
    assert rules[0].match == "news@example.com"
    assert rules[1].group == "general"  # marketing without a group gets default_group
    assert rules[2].group is None
    assert (rules[3].unsubscribe_scope, rules[3].keep_app_unsubscribe) == ("sender", True)
    newsletter = config.policy.groups["newsletter"]
    assert newsletter.mailto == "unsubscribe@example.com"
    assert newsletter.list_id == "Example News <newsletter.example.com>"
    assert config.retry.max_age == 86400.0


def test_dkim_as_mapping_with_keys_and_require_for_marketing(keys: Keys) -> None:
    raw = base_config(keys)
    raw["dkim"] = {"keys": raw["dkim"], "require_for_marketing": True}
    config = parse_config(raw)
    assert config.dkim.require_for_marketing is True
    assert [k.selector for k in config.dkim.keys] == ["s2026", "e2026"]


def test_minimal_config_gets_defaults(keys: Keys) -> None:
    config = parse_config(
        {
            "http": {"public_url": "https://u.example.com"},
            "tokens": {"keys": [{"id": "k1", "secret_file": str(keys.token_k1)}]},
        }
    )
    assert config.redis.url is None  # embedded Redis
    assert config.dkim.keys == ()
    assert config.policy.default_class == "transactional"
    assert config.upstream.port == 25
    assert config.smtp.max_message_size == 25 * MiB
    assert config.tokens.max_age_days >= 60


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (100, 100),
        ("2048", 2048),
        ("2048B", 2048),
        ("512KiB", 512 * 1024),
        ("25MiB", 25 * MiB),
        (" 25 mib ", 25 * MiB),
        ("10MB", 10_000_000),
        ("1GiB", 1024 * MiB),
    ],
)
def test_max_message_size_units(keys: Keys, value: object, expected: int) -> None:
    raw = base_config(keys)
    raw["smtp"]["max_message_size"] = value
    assert parse_config(raw).smtp.max_message_size == expected


def test_secret_file_and_env(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_SECRET_ENV, "e" * 40)
    raw = base_config(keys)
    raw["tokens"]["keys"] = [{"id": "env", "secret_env": TOKEN_SECRET_ENV}]
    config = parse_config(raw)
    assert config.tokens.keys[0].secret.reveal() == b"e" * 40


def test_secret_never_in_repr(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    password = "hunter2-upstream-password-value"
    monkeypatch.setenv("OCR_TEST_UPSTREAM_PASSWORD", password)
    raw = base_config(keys)
    del raw["upstream"]["password_file"]
    raw["upstream"]["password_env"] = "OCR_TEST_UPSTREAM_PASSWORD"
    config = parse_config(raw)
    text = repr(config)
    assert config.upstream.password is not None
    assert config.upstream.password.reveal() == password.encode()
    assert password not in text
    for key in config.tokens.keys:
        secret = key.secret.reveal().decode()
        assert secret not in text
        assert secret[:12] not in text
    assert "Secret(***)" in text
    assert str(config.tokens.keys[0].secret) == "Secret(***)"


def test_relative_paths_resolve_against_the_config_folder(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    (etc / "keys").mkdir(parents=True)
    (etc / "dkim").mkdir()
    shutil.copy(keys.token_k1, etc / "keys" / "k1.key")
    shutil.copy(keys.rsa, etc / "dkim" / "example.com.pem")
    raw = base_config(keys)
    raw["tokens"]["keys"] = [{"id": "k1", "secret_file": "keys/k1.key"}]
    raw["dkim"] = [
        {"domain": "example.com", "selector": "s1", "private_key_file": "dkim/example.com.pem"}
    ]
    raw["upstream"]["password_file"] = "keys/k1.key"
    write_yaml(etc / "relay.yaml", raw)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config("../etc/relay.yaml")

    assert config.source == (etc / "relay.yaml").resolve()
    assert config.tokens.keys[0].secret.reveal() == keys.token_k1.read_bytes().strip()
    assert config.dkim.keys[0].private_key_file == (etc / "dkim" / "example.com.pem").resolve()
    assert config.dkim.keys[0].private_key_file.is_absolute()


def test_config_path_from_environment(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_yaml(tmp_path / "relay.yaml", base_config(keys))
    monkeypatch.setenv("ONECLICK_RELAY_CONFIG", str(path))
    assert load_config(None).source == path.resolve()
    monkeypatch.delenv("ONECLICK_RELAY_CONFIG")
    with pytest.raises(ConfigError) as err:
        load_config(None)
    assert err.value.key == "-c/--config"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    assert err.value.key == "-c/--config"


def test_yaml_syntax_error_says_what_and_where(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("smtp:\n  listen: [unclosed\nhttp: {\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == str(path)
    assert err.value.problem == (
        "line 3, column 5: expected ',' or ']', but got ':' (while parsing a flow sequence)"
    )


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("smtp:\n  listen: a: b\n", "line 2, column 12", "mapping values are not allowed here"),
        (
            "smtp:\n\tlisten: x\n",
            "line 2, column 1",
            "found character '\\t' that cannot start any token",
        ),
        ("http: {public_url: x\n", "line 2, column 1", "expected ',' or '}'"),
    ],
)
def test_yaml_errors_carry_pyyaml_problem_line_and_column(
    tmp_path: Path, text: str, where: str, problem: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problem.startswith(f"{where}: {problem}"), err.value.problem


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ('smtp:\n  listen: "1.2.3.4:1"\n  timeout: 3\n  listen: "1.2.3.4:2"\n', "smtp.listen", 4),
        ("http: {}\nhttp: {}\n", "http", 2),
        ("policy:\n  senders:\n    - match: a@b\n      class: marketing\n      match: c@d\n",
         "policy.senders[0].match", 5),
        ('bounces:\n  classify:\n    "5.7": soft\n    "5.7": hard\n', "bounces.classify.5.7", 4),
    ],
)  # fmt: skip
def test_duplicate_key_is_an_error_naming_it(
    tmp_path: Path, text: str, key: str, line: int
) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key
    assert err.value.problem.startswith(f"duplicate key ({path}: line {line}, column ")
    assert err.value.problem.endswith("YAML would keep only the last one")


def test_same_key_in_two_mappings_is_no_duplicate(keys: Keys, tmp_path: Path) -> None:
    raw = base_config(keys)
    path = write_yaml(tmp_path / "relay.yaml", raw)  # listen: under smtp and under http
    assert load_config(path).http.listen == HostPort("::1", 8080)


# ---------------------------------------------------------------------------
# Every error names its dotted key

Mutation = Callable[[dict[str, Any], Path], None]
_DELETE = object()


def _walk(raw: dict[str, Any], path: str) -> tuple[Any, str | int]:
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = raw
    for part in parts[:-1]:
        node = node[part]
    return node, parts[-1]


def setting(path: str, value: object) -> Mutation:
    """Set (or with ``_DELETE`` remove) the value at a dotted path; digits index lists."""

    def mutate(raw: dict[str, Any], tmp: Path) -> None:
        node, last = _walk(raw, path)
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


def secret_file(content: bytes | None) -> Mutation:
    def mutate(raw: dict[str, Any], tmp: Path) -> None:
        path = tmp / "token.key"
        if content is not None:
            path.write_bytes(content)
        raw["tokens"]["keys"][0]["secret_file"] = str(path)

    return mutate


def secret_env(value: str | None) -> Mutation:
    def mutate(raw: dict[str, Any], tmp: Path) -> None:
        del raw["tokens"]["keys"][0]["secret_file"]
        raw["tokens"]["keys"][0]["secret_env"] = TOKEN_SECRET_ENV
        if value is None:
            os.environ.pop(TOKEN_SECRET_ENV, None)
        else:
            os.environ[TOKEN_SECRET_ENV] = value

    return mutate


def duplicate_token_id(raw: dict[str, Any], tmp: Path) -> None:
    raw["tokens"]["keys"][1]["id"] = raw["tokens"]["keys"][0]["id"]


def duplicate_selector(raw: dict[str, Any], tmp: Path) -> None:
    raw["dkim"][1]["selector"] = "s2026"


def dkim_mapping(**extra: Any) -> Mutation:
    def mutate(raw: dict[str, Any], tmp: Path) -> None:
        raw["dkim"] = {"keys": raw["dkim"], **extra}

    return mutate


def dkim_mapping_missing_file(raw: dict[str, Any], tmp: Path) -> None:
    raw["dkim"][0]["private_key_file"] = str(tmp / "missing.pem")
    raw["dkim"] = {"keys": raw["dkim"]}


def no_secret(raw: dict[str, Any], tmp: Path) -> None:
    del raw["tokens"]["keys"][0]["secret_file"]


def username_without_password(raw: dict[str, Any], tmp: Path) -> None:
    del raw["upstream"]["password_file"]


def top_level_list(raw: dict[str, Any], tmp: Path) -> None:
    raw.clear()


ERRORS: list[tuple[str, Mutation, str]] = [
    # upstream
    ("port-0", setting("upstream.port", 0), "upstream.port"),
    ("port-70000", setting("upstream.port", 70000), "upstream.port"),
    ("port-string", setting("upstream.port", "x"), "upstream.port"),
    ("port-bool", setting("upstream.port", True), "upstream.port"),
    ("port-float", setting("upstream.port", 25.5), "upstream.port"),
    ("tls", setting("upstream.tls", "ssl"), "upstream.tls"),
    ("upstream-timeout", setting("upstream.timeout", 0), "upstream.timeout"),
    ("connections", setting("upstream.connections", 0), "upstream.connections"),
    ("username-no-password", username_without_password, "upstream.password_file"),
    ("upstream-host-empty", setting("upstream.host", " "), "upstream.host"),
    # unknown keys
    ("unknown-top", setting("bogus", 1), "bogus"),
    ("unknown-smtp", setting("smtp.bogus", 1), "smtp.bogus"),
    ("unknown-upstream", setting("upstream.bogus", None), "upstream.bogus"),
    ("unknown-policy", setting("policy.bogus", 1), "policy.bogus"),
    ("unknown-retry", setting("retry.bogus", 1), "retry.bogus"),
    ("smtp-not-mapping", setting("smtp", ["x"]), "smtp"),
    # smtp
    ("listen-no-port", setting("smtp.listen", "localhost"), "smtp.listen"),
    ("listen-port-range", setting("smtp.listen", "127.0.0.1:70000"), "smtp.listen"),
    ("listen-ipv6-no-brackets", setting("smtp.listen", "::1:25"), "smtp.listen"),
    ("listen-not-string", setting("smtp.listen", 2525), "smtp.listen"),
    ("network", setting("smtp.allowed_networks", ["nope"]), "smtp.allowed_networks[0]"),
    (
        "network-second",
        setting("smtp.allowed_networks", ["127.0.0.0/8", "10.0.0.0/33"]),
        "smtp.allowed_networks[1]",
    ),
    ("networks-not-list", setting("smtp.allowed_networks", "127.0.0.0/8"), "smtp.allowed_networks"),
    ("size-junk", setting("smtp.max_message_size", "25 potatoes"), "smtp.max_message_size"),
    ("size-negative", setting("smtp.max_message_size", -1), "smtp.max_message_size"),
    ("size-zero", setting("smtp.max_message_size", 0), "smtp.max_message_size"),
    ("size-zero-string", setting("smtp.max_message_size", "0"), "smtp.max_message_size"),
    ("size-zero-unit", setting("smtp.max_message_size", "0MiB"), "smtp.max_message_size"),
    ("size-fraction", setting("smtp.max_message_size", "1.5MiB"), "smtp.max_message_size"),
    ("size-bool", setting("smtp.max_message_size", True), "smtp.max_message_size"),
    ("max-recipients", setting("smtp.max_recipients", 0), "smtp.max_recipients"),
    ("smtp-timeout", setting("smtp.timeout", -5), "smtp.timeout"),
    # http
    ("http-missing", setting("http", _DELETE), "http"),
    ("public-url-missing", setting("http.public_url", _DELETE), "http.public_url"),
    ("public-url-ftp", setting("http.public_url", "ftp://u.example.com"), "http.public_url"),
    ("public-url-no-scheme", setting("http.public_url", "u.example.com"), "http.public_url"),
    (
        "public-url-query",
        setting("http.public_url", "https://u.example.com/?a=1"),
        "http.public_url",
    ),
    ("http-body-size", setting("http.max_body_size", 10), "http.max_body_size"),
    # redis
    ("redis-scheme", setting("redis.url", "http://127.0.0.1:6379"), "redis.url"),
    ("redis-on-error-m", setting("redis.on_error.marketing", "drop"), "redis.on_error.marketing"),
    (
        "redis-on-error-t",
        setting("redis.on_error.transactional", "bounce"),
        "redis.on_error.transactional",
    ),
    ("redis-on-error-unknown", setting("redis.on_error.bogus", "x"), "redis.on_error.bogus"),
    ("redis-timeout", setting("redis.timeout", 0), "redis.timeout"),
    # tokens
    ("tokens-missing", setting("tokens", _DELETE), "tokens"),
    ("tokens-keys-empty", setting("tokens.keys", []), "tokens.keys"),
    ("tokens-keys-missing", setting("tokens.keys", _DELETE), "tokens.keys"),
    ("tokens-keys-not-list", setting("tokens.keys", "k1"), "tokens.keys"),
    ("tokens-key-not-mapping", setting("tokens.keys.0", "k1"), "tokens.keys[0]"),
    ("token-id-duplicate", duplicate_token_id, "tokens.keys[1].id"),
    ("token-id-chars", setting("tokens.keys.0.id", "k 1"), "tokens.keys[0].id"),
    ("token-id-slash", setting("tokens.keys.0.id", "k/1"), "tokens.keys[0].id"),
    ("token-id-long", setting("tokens.keys.0.id", "k" * 17), "tokens.keys[0].id"),
    ("token-id-missing", setting("tokens.keys.0.id", _DELETE), "tokens.keys[0].id"),
    ("secret-file-missing", secret_file(None), "tokens.keys[0].secret_file"),
    ("secret-file-short", secret_file(b"x" * 31 + b"\n"), "tokens.keys[0].secret_file"),
    ("secret-file-empty", secret_file(b"\n"), "tokens.keys[0].secret_file"),
    ("secret-none", no_secret, "tokens.keys[0].secret_file"),
    ("secret-env-unset", secret_env(None), "tokens.keys[0].secret_env"),
    ("secret-env-short", secret_env("too-short"), "tokens.keys[0].secret_env"),
    ("token-unknown-key", setting("tokens.keys.0.bogus", 1), "tokens.keys[0].bogus"),
    ("token-max-age", setting("tokens.max_age_days", 29), "tokens.max_age_days"),
    # dkim
    (
        "dkim-file-missing",
        setting("dkim.0.private_key_file", "/nonexistent/k.pem"),
        "dkim[0].private_key_file",
    ),
    (
        "dkim-file-not-given",
        setting("dkim.1.private_key_file", _DELETE),
        "dkim[1].private_key_file",
    ),
    ("dkim-duplicate-selector", duplicate_selector, "dkim[1].selector"),
    ("dkim-domain-underscore", setting("dkim.0.domain", "exa_mple.com"), "dkim[0].domain"),
    ("dkim-domain-empty-label", setting("dkim.0.domain", "example..com"), "dkim[0].domain"),
    ("dkim-domain-hyphen", setting("dkim.0.domain", "-example.com"), "dkim[0].domain"),
    ("dkim-selector", setting("dkim.0.selector", "bad selector"), "dkim[0].selector"),
    ("dkim-unknown", setting("dkim.0.bogus", 1), "dkim[0].bogus"),
    ("dkim-not-list-or-mapping", setting("dkim", "example.com"), "dkim"),
    (
        "dkim-map-require",
        dkim_mapping(require_for_marketing="yes"),
        "dkim.require_for_marketing",
    ),
    ("dkim-map-unknown", dkim_mapping(bogus=1), "dkim.bogus"),
    ("dkim-map-file", dkim_mapping_missing_file, "dkim.keys[0].private_key_file"),
    # policy
    ("default-class", setting("policy.default_class", "bulk"), "policy.default_class"),
    ("default-group", setting("policy.default_group", "bad group"), "policy.default_group"),
    (
        "match-no-at",
        setting("policy.senders.0.match", "news.example.com"),
        "policy.senders[0].match",
    ),
    ("match-missing", setting("policy.senders.1.match", _DELETE), "policy.senders[1].match"),
    ("class-bad", setting("policy.senders.0.class", "bulk"), "policy.senders[0].class"),
    ("class-missing", setting("policy.senders.0.class", _DELETE), "policy.senders[0].class"),
    (
        "transactional-with-group",
        setting("policy.senders.2.group", "newsletter"),
        "policy.senders[2].group",
    ),
    ("group-chars", setting("policy.senders.0.group", "news letter"), "policy.senders[0].group"),
    (
        "unsubscribe-scope",
        setting("policy.senders.0.unsubscribe_scope", "everything"),
        "policy.senders[0].unsubscribe_scope",
    ),
    (
        "keep-app-unsubscribe",
        setting("policy.senders.0.keep_app_unsubscribe", "yes"),
        "policy.senders[0].keep_app_unsubscribe",
    ),
    ("sender-unknown", setting("policy.senders.0.bogus", 1), "policy.senders[0].bogus"),
    ("senders-not-list", setting("policy.senders", {"a": 1}), "policy.senders"),
    (
        "mailto-bad",
        setting("policy.groups.newsletter.mailto", "not an address"),
        "policy.groups.newsletter.mailto",
    ),
    (
        "mailto-query",
        setting("policy.groups.newsletter.mailto", "mailto:u@example.com?subject=x"),
        "policy.groups.newsletter.mailto",
    ),
    (
        "list-id-newline",
        setting("policy.groups.newsletter.list_id", "News\n<news.example.com>"),
        "policy.groups.newsletter.list_id",
    ),
    (
        "list-id-non-ascii",
        setting("policy.groups.newsletter.list_id", "Nouvelles <é.example.com>"),
        "policy.groups.newsletter.list_id",
    ),
    (
        "group-unknown-key",
        setting("policy.groups.newsletter.bogus", 1),
        "policy.groups.newsletter.bogus",
    ),
    ("group-name", setting("policy.groups.bad name", {}), "policy.groups.bad name"),
    # limits (issue 15)
    ("smtp-max-conn", setting("smtp.max_connections", 0), "smtp.max_connections"),
    (
        "smtp-per-client",
        setting("smtp.max_connections_per_client", "many"),
        "smtp.max_connections_per_client",
    ),
    ("auth-delay", setting("smtp.auth_failure_delay", -1), "smtp.auth_failure_delay"),
    ("auth-max", setting("smtp.auth_max_failures", 0), "smtp.auth_max_failures"),
    ("http-header-timeout", setting("http.header_timeout", 0), "http.header_timeout"),
    ("http-body-timeout", setting("http.body_timeout", "slow"), "http.body_timeout"),
    ("http-max-conn", setting("http.max_connections", -5), "http.max_connections"),
    ("dkim-domain-idna", setting("dkim.0.domain", "xn--zz.example"), "dkim[0].domain"),
    (
        "bounces-networks",
        setting("bounces", {"allowed_networks": ["not a network"]}),
        "bounces.allowed_networks[0]",
    ),
    ("bounces-budget", setting("bounces", {"audit_max_bytes": "lots"}), "bounces.audit_max_bytes"),
    (
        "bounces-tls",
        setting("bounces", {"tls": {"cert_file": "/nonexistent.pem", "key_file": "/x"}}),
        "bounces.tls.cert_file",
    ),
    (
        "bounces-rate",
        setting("bounces", {"max_messages_per_client": 0}),
        "bounces.max_messages_per_client",
    ),
    # retry
    ("retry-negative", setting("retry.max_age", -1), "retry.max_age"),
    ("retry-string", setting("retry.first_delay", "soon"), "retry.first_delay"),
]


@pytest.mark.parametrize(("mutate", "key"), [pytest.param(m, k, id=i) for i, m, k in ERRORS])
def test_error_names_the_dotted_key(keys: Keys, tmp_path: Path, mutate: Mutation, key: str) -> None:
    raw = copy.deepcopy(base_config(keys))
    saved = os.environ.get(TOKEN_SECRET_ENV)
    try:
        mutate(raw, tmp_path)
        with pytest.raises(ConfigError) as err:
            parse_config(raw)
    finally:
        if saved is None:
            os.environ.pop(TOKEN_SECRET_ENV, None)
        else:
            os.environ[TOKEN_SECRET_ENV] = saved
    assert err.value.key == key, str(err.value)
    assert str(err.value).startswith(f"{key}: ")
    assert err.value.problem


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(["http", "tokens"])
    assert err.value.key == "(top level)"


def test_short_secret_error_does_not_show_the_secret(keys: Keys, tmp_path: Path) -> None:
    raw = base_config(keys)
    secret_file(b"short-but-secret-value\n")(raw, tmp_path)
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert "short-but-secret-value" not in str(err.value)


# ---------------------------------------------------------------------------
# oneclick-relay check-config


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "ONECLICK_RELAY_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_ok_prints_routes(keys: Keys, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "relay.yaml", base_config(keys))
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"config OK: {path.resolve()}" in out
    assert "routes (first match wins):" in out
    routes = out.split("routes (first match wins):", 1)[1].splitlines()
    routes = [" ".join(line.split()) for line in routes if line.strip()]
    assert routes == [
        "news@example.com -> marketing group=newsletter scope=group",
        "*@promo.example.com -> marketing group=general scope=group",
        "receipts@example.com -> transactional",
        "offers-*@example.com -> marketing group=offers scope=sender",
        "(any other sender) -> transactional",
    ]
    assert "d=example.com s=s2026" in out
    assert "WARNING" not in result.stderr


def test_check_config_from_environment_variable(keys: Keys, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "relay.yaml", base_config(keys))
    result = run_cli("check-config", env={"ONECLICK_RELAY_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout


def test_check_config_bad_file_exits_2_naming_the_key(keys: Keys, tmp_path: Path) -> None:
    raw = base_config(keys)
    raw["upstream"]["port"] = 0
    path = write_yaml(tmp_path / "relay.yaml", raw)
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 2
    assert "upstream.port" in result.stderr
    assert "config OK" not in result.stdout
    assert "Traceback" not in result.stderr


def test_check_config_yaml_syntax_error_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("http: {public_url: [\n")
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"config error: {path}: line 2, column 1: ")
    assert "Traceback" not in result.stderr


def test_check_config_unloadable_dkim_key_exits_2(keys: Keys, tmp_path: Path) -> None:
    not_a_key = tmp_path / "not-a-key.pem"
    not_a_key.write_text("this is not a PEM private key\n")
    raw = base_config(keys)
    raw["dkim"][0]["private_key_file"] = str(not_a_key)
    path = write_yaml(tmp_path / "relay.yaml", raw)
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 2
    assert "dkim[0].private_key_file" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_warns_marketing_sender_without_dkim_key(keys: Keys, tmp_path: Path) -> None:
    raw = base_config(keys)
    raw["policy"]["senders"].append(
        {"match": "news@other.example", "class": "marketing", "group": "newsletter"}
    )
    path = write_yaml(tmp_path / "relay.yaml", raw)
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, result.stderr
    assert "news@other.example" in warnings[0]
    assert "other.example" in warnings[0]
