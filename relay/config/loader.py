"""Configuration: YAML in, frozen dataclasses out, built once and passed in.

This is the only module that reads YAML. Every problem raises ``ConfigError``
naming the dotted key (``upstream.port: expected an integer 1-65535``); unknown
keys are errors so that a typo never silently falls back to a default.
Secrets are read from files named in the config (or environment variables) and
kept in ``Secret`` objects whose ``repr`` never shows them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import idna
import yaml

from relay.config.schema import (
    DEFAULT_CONFIG_ENV,
    DEFAULT_FOOTER_HTML,
    DEFAULT_FOOTER_TEXT,
    DEFAULT_PLACEHOLDER,
    DEFAULT_STATE_DIR,
    DEFAULT_TOKEN_MAX_AGE_DAYS,
    ESP_PROVIDERS,
    FEEDBACK_ID_FIELDS,
    MAX_MAILTO_LOCAL_PART,
    BouncesConfig,
    BounceThresholds,
    ComplianceConfig,
    Config,
    DkimConfig,
    DkimKeyConfig,
    EspProvider,
    EspWebhookConfig,
    EventsConfig,
    GroupConfig,
    HostPort,
    HttpConfig,
    LogConfig,
    MiB,
    MilterConfig,
    Network,
    NotifyConfig,
    PolicyConfig,
    RedisConfig,
    RedisOnError,
    RetryConfig,
    Secret,
    SenderRule,
    SentinelConfig,
    SmtpConfig,
    SmtpTlsConfig,
    SuppressionConfig,
    TokenKey,
    TokensConfig,
    UnsubscribeConfig,
    UpstreamConfig,
    WebhookConfig,
)
from relay.errors import ConfigError
from relay.model import BOUNCE_KINDS, NOT_FAILURES, REASONS, MessageClass

_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
_GROUP = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}$")


T = TypeVar("T")


class _Section:
    """A mapping being read; remembers which keys were used to flag the rest."""

    def __init__(
        self, raw: object, path: str, base: Path, secrets: list[tuple[str, Path]] | None = None
    ) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(path or "(top level)", "expected a mapping")
        self.raw: dict[str, Any] = raw
        self.path = path
        self.base = base
        self.used: set[str] = set()
        self.secrets: list[tuple[str, Path]] = [] if secrets is None else secrets
        """Shared by every section of one file: the key and secret files read."""

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def get(self, name: str, default: T, conv: Callable[[object, str], T]) -> T:
        self.used.add(name)
        value = self.raw.get(name)
        if value is None:
            return default
        return conv(value, self.key(name))

    def require(self, name: str, conv: Callable[[object, str], T]) -> T:
        self.used.add(name)
        value = self.raw.get(name)
        if value is None:
            raise ConfigError(self.key(name), "is required")
        return conv(value, self.key(name))

    def section(self, name: str) -> _Section:
        self.used.add(name)
        return _Section(self.raw.get(name), self.key(name), self.base, self.secrets)

    def child(self, raw: object, key: str) -> _Section:
        return _Section(raw, key, self.base, self.secrets)

    def file(self, name: str) -> Path:
        """A required, readable file; relative paths are relative to the config file."""
        path = self.base / self.require(name, _str)
        if not path.is_file():
            raise ConfigError(self.key(name), f"file not found: {path}")
        if not os.access(path, os.R_OK):
            raise ConfigError(self.key(name), f"file not readable: {path}")
        return path

    def secret_file(self, name: str) -> Path:
        """``file()`` for keys, secrets and password hashes: noted for the mode check."""
        path = self.file(name)
        self.secrets.append((self.key(name), path))
        return path

    def items(self, name: str) -> Iterator[tuple[object, str]]:
        self.used.add(name)
        value = self.raw.get(name)
        if value is None:
            return
        if not isinstance(value, list):
            raise ConfigError(self.key(name), "expected a list")
        for index, item in enumerate(value):
            yield item, f"{self.key(name)}[{index}]"

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise ConfigError(self.key(str(unknown[0])), "unknown key")


def _str(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, "expected a non-empty string")
    return value.strip()


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, "expected true or false")
    return value


def _int_range(low: int, high: int) -> Callable[[object, str], int]:
    def conv(value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(key, f"expected an integer {low}-{high}")
        return value

    return conv


def _seconds(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(key, "expected a positive number of seconds")
    return float(value)


def _size(value: object, key: str) -> int:
    """Bytes, as an integer or with a unit: 25MiB, 512KiB, 10MB."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B|B)?\s*", value, re.IGNORECASE)
        if m:
            units = {"b": 1, "kb": 1000, "mb": 10**6, "gb": 10**9}
            units |= {"kib": 1024, "mib": MiB, "gib": 1024 * MiB}
            size = int(m.group(1)) * units[(m.group(2) or "b").lower()]
            if size > 0:
                return size
    raise ConfigError(key, "expected a positive size in bytes, e.g. 26214400 or 25MiB")


def _choice(*options: str) -> Callable[[object, str], Any]:
    """A converter to one of ``options``; typed Any so Literal fields accept it."""

    def conv(value: object, key: str) -> str:
        if value not in options:
            raise ConfigError(key, f"expected one of: {', '.join(options)}")
        return str(value)

    return conv


def _host_port(value: object, key: str) -> HostPort:
    text = _str(value, key)
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not m:
        raise ConfigError(key, 'expected "host:port" (IPv6 as "[::1]:port")')
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(key, "port must be 0-65535")
    return HostPort(host, port)


def _network(value: object, key: str) -> Network:
    try:
        return ipaddress.ip_network(_str(value, key), strict=False)
    except ValueError as exc:
        raise ConfigError(key, f"not an IP network: {exc}") from None


def _https_url(value: object, key: str) -> str:
    text = _str(value, key).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.query:
        raise ConfigError(key, "expected an https:// URL without query string")
    return text


EMBEDDED = "embedded"
"""``redis.url: embedded``: the relay runs its own server, persisting to ``redis.data_dir``."""


def _redis_url(value: object, key: str) -> str:
    text = _str(value, key)
    if text == EMBEDDED:
        return text
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(key, 'expected a redis://, rediss:// or unix:// URL, or "embedded"')
    return text


def _data_dir(s: _Section) -> Path:
    path = s.base / s.require("data_dir", _str)
    if not path.is_dir():
        raise ConfigError(s.key("data_dir"), f"not a directory: {path} (create it: mkdir -m 700)")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(s.key("data_dir"), f"not writable: {path}")
    return path


def _domain(value: object, key: str) -> str:
    text = _str(value, key).removesuffix(".")
    try:  # the mapping of relay.mail.address.canonical_domain (config is below mail)
        text = idna.encode(text, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise ConfigError(key, "not a valid domain name (IDNA 2008)") from None
    if not _DOMAIN.match(text):
        raise ConfigError(key, "not a valid domain name")
    return text


def _secret_from(section: _Section, name: str, *, required: bool) -> Secret | None:
    """Read ``NAME_file`` (a path) or ``NAME_env`` (an environment variable)."""
    file_key, env_key = f"{name}_file", f"{name}_env"
    if section.has(file_key):
        path = section.secret_file(file_key)
        section.used.add(env_key)
        value = path.read_bytes().strip()
        if not value:
            raise ConfigError(section.key(file_key), f"file is empty: {path}")
        return Secret(value)
    if section.has(env_key):
        var = section.require(env_key, _str)
        env_value = os.environ.get(var, "").strip()
        if not env_value:
            raise ConfigError(section.key(env_key), f"environment variable {var} is not set")
        return Secret(env_value.encode())
    section.used.update({file_key, env_key})
    if required:
        raise ConfigError(section.key(file_key), "is required (or set " + env_key + ")")
    return None


def _read_smtp(s: _Section, milter_listen: HostPort | Path | None) -> SmtpConfig:
    """With a milter configured, no ``listen`` means no SMTP listener.

    A milter on a Unix socket is served by one process, so ``workers`` defaults to 1.
    """
    milter = milter_listen is not None
    unix = isinstance(milter_listen, Path)
    d = SmtpConfig()
    networks = tuple(_network(item, key) for item, key in s.items("allowed_networks"))
    listen: HostPort | None = None if milter else d.listen
    if "listen" in s.raw:  # an explicit null: no SMTP listener
        listen = s.get("listen", None, _host_port)
    if listen is None and not milter:
        raise ConfigError(s.key("listen"), "is required unless milter.listen is set")
    cfg = SmtpConfig(
        listen=listen,
        allowed_networks=networks if "allowed_networks" in s.raw else d.allowed_networks,
        hostname=s.get("hostname", d.hostname, _str),
        max_message_size=s.get("max_message_size", d.max_message_size, _size),
        max_recipients=s.get("max_recipients", d.max_recipients, _int_range(1, 100_000)),
        timeout=s.get("timeout", d.timeout, _seconds),
        drain_timeout=s.get("drain_timeout", d.drain_timeout, _seconds),
        workers=s.get("workers", 1 if unix else os.cpu_count() or 1, _int_range(1, 256)),
        tls=_read_smtp_tls(s.section("tls")) if s.has("tls") else None,
        auth_users_file=_read_smtp_auth(s.section("auth")) if s.has("auth") else None,
        max_connections=s.get("max_connections", d.max_connections, _int_range(1, 100_000)),
        max_connections_per_client=s.get(
            "max_connections_per_client", d.max_connections_per_client, _int_range(1, 100_000)
        ),
        auth_failure_delay=s.get("auth_failure_delay", d.auth_failure_delay, _seconds),
        auth_max_failures=s.get("auth_max_failures", d.auth_max_failures, _int_range(1, 100)),
        auth_max_failures_per_client=s.get(
            "auth_max_failures_per_client", d.auth_max_failures_per_client, _int_range(1, 10_000)
        ),
    )
    s.used.update({"tls", "auth"})
    if unix and cfg.workers > 1:
        raise ConfigError(
            s.key("workers"), "must be 1 with milter.listen on a Unix socket (or use host:port)"
        )
    if cfg.auth_users_file is not None and cfg.tls is None:
        raise ConfigError(s.key("auth"), "needs smtp.tls: passwords are only taken over TLS")
    if cfg.auth_users_file is None:
        _check_not_open(cfg.allowed_networks, s.key("allowed_networks"))
    s.done()
    return cfg


_EVERY_IPV4 = ipaddress.ip_network("0.0.0.0/0")
_EVERY_IPV6 = ipaddress.ip_network("2000::/3")
"""All globally routed IPv6 unicast: a list covering it takes mail from the whole Internet."""


def _check_not_open(networks: tuple[Network, ...], key: str) -> None:
    """Without AUTH, allowed_networks is the only gate: refuse one that admits everybody."""
    if not networks:
        raise ConfigError(
            key,
            "empty and smtp.auth is not set, so no client could ever send: list the networks"
            ' of the applications that send through the relay (e.g. ["127.0.0.0/8"]),'
            " or configure smtp.auth",
        )
    problem = (
        "admits every IPv{} address without smtp.auth: that is an open relay;"
        " list only your applications' networks, or configure smtp.auth"
    )
    for every in (_EVERY_IPV4, _EVERY_IPV6):
        for index, network in enumerate(networks):
            if _covers(network, every):
                raise ConfigError(f"{key}[{index}]", f"{network} {problem.format(every.version)}")
        same = [n for n in networks if n.version == every.version]
        if any(_covers(n, every) for n in ipaddress.collapse_addresses(same)):  # type: ignore[type-var]
            listed = ", ".join(str(n) for n in same if _covers(every, n) or _covers(n, every))
            raise ConfigError(key, f"together, {listed} {problem.format(every.version)}")


def _covers(network: Network, other: Network) -> bool:
    """``network`` contains all of ``other`` (False across IPv4 and IPv6)."""
    if isinstance(network, ipaddress.IPv4Network) and isinstance(other, ipaddress.IPv4Network):
        return network.supernet_of(other)
    if isinstance(network, ipaddress.IPv6Network) and isinstance(other, ipaddress.IPv6Network):
        return network.supernet_of(other)
    return False


def _read_smtp_tls(s: _Section) -> SmtpTlsConfig:
    cfg = SmtpTlsConfig(
        cert_file=s.file("cert_file"),
        key_file=s.secret_file("key_file"),
        mode=s.get("mode", "starttls", _choice("starttls", "implicit")),
    )
    s.done()
    return cfg


def _read_smtp_auth(s: _Section) -> Path:
    path = s.secret_file("users_file")
    s.done()
    return path


def _read_upstream(s: _Section) -> UpstreamConfig:
    d = UpstreamConfig()
    cfg = UpstreamConfig(
        host=s.get("host", d.host, _str),
        port=s.get("port", d.port, _int_range(1, 65535)),
        tls=s.get("tls", d.tls, _choice("none", "starttls", "implicit")),
        username=s.get("username", None, _str),
        password=_secret_from(s, "password", required=False),
        timeout=s.get("timeout", d.timeout, _seconds),
        connections=s.get("connections", d.connections, _int_range(1, 256)),
        helo_name=s.get("helo_name", None, _str),
        name=s.get("name", None, _str),
    )
    if cfg.username and cfg.password is None:
        raise ConfigError(s.key("password_file"), "is required when username is set")
    s.done()
    return cfg


def _read_http(s: _Section) -> HttpConfig:
    d = HttpConfig()
    cfg = HttpConfig(
        listen=s.get("listen", d.listen, _host_port),
        public_url=s.require("public_url", _https_url),
        max_body_size=s.get("max_body_size", d.max_body_size, _int_range(256, MiB)),
        admin_token=_secret_from(s, "admin_token", required=False),
        metrics_token=_secret_from(s, "metrics_token", required=False),
        trusted_proxies=tuple(_network(item, key) for item, key in s.items("trusted_proxies")),
        max_connections=s.get("max_connections", d.max_connections, _int_range(1, 100_000)),
        max_connections_per_client=s.get(
            "max_connections_per_client", d.max_connections_per_client, _int_range(1, 100_000)
        ),
        header_timeout=s.get("header_timeout", d.header_timeout, _seconds),
        body_timeout=s.get("body_timeout", d.body_timeout, _seconds),
    )
    if cfg.admin_token is not None and len(cfg.admin_token.reveal()) < 16:
        raise ConfigError(s.key("admin_token_file"), "token too short: use 16+ random characters")
    if cfg.metrics_token is not None and len(cfg.metrics_token.reveal()) < 16:
        raise ConfigError(s.key("metrics_token_file"), "token too short: use 16+ random characters")
    s.done()
    return cfg


def _read_redis(s: _Section) -> RedisConfig:
    d = RedisConfig()
    on_error = s.section("on_error")
    choice = _choice("tempfail", "deliver")
    sentinel = None
    if s.has("sentinel"):
        ss = s.section("sentinel")
        addresses = tuple(_host_port(item, key) for item, key in ss.items("addresses"))
        if not addresses:
            raise ConfigError(ss.key("addresses"), "at least one sentinel host:port is required")
        sentinel = SentinelConfig(
            master=ss.require("master", _str),
            addresses=addresses,
            db=ss.get("db", 0, _int_range(0, 15)),
        )
        ss.done()
    s.used.add("sentinel")
    url = s.get("url", None, _redis_url)
    embedded = url == EMBEDDED
    if embedded and sentinel is not None:
        raise ConfigError(s.key("sentinel"), 'use redis.url "embedded" or redis.sentinel, not both')
    if s.has("data_dir") and not embedded:
        raise ConfigError(s.key("data_dir"), 'only for redis.url "embedded"')
    cfg = RedisConfig(
        cluster=s.get("cluster", False, _bool),
        sentinel=sentinel,
        url=None if embedded else url,
        embedded=embedded,
        data_dir=_data_dir(s) if embedded else None,
        key_prefix=s.get("key_prefix", d.key_prefix, _str),
        timeout=s.get("timeout", d.timeout, _seconds),
        on_error=RedisOnError(
            marketing=on_error.get("marketing", d.on_error.marketing, choice),
            transactional=on_error.get("transactional", d.on_error.transactional, choice),
        ),
    )
    on_error.done()
    s.used.add("data_dir")
    s.done()
    if cfg.cluster and cfg.url is None:
        raise ConfigError(s.key("url"), "redis.cluster needs the URL of one cluster node")
    if cfg.cluster and cfg.sentinel is not None:
        raise ConfigError(s.key("sentinel"), "use redis.cluster or redis.sentinel, not both")
    return cfg


def _read_tokens(s: _Section) -> TokensConfig:
    keys: list[TokenKey] = []
    for item, key in s.items("keys"):
        k = s.child(item, key)
        key_id = k.require("id", _str)
        if not _KEY_ID.match(key_id):
            raise ConfigError(k.key("id"), "expected 1-16 characters of A-Z a-z 0-9 _ -")
        if any(existing.id == key_id for existing in keys):
            raise ConfigError(k.key("id"), f"duplicate key id {key_id!r}")
        secret = _secret_from(k, "secret", required=True)
        assert secret is not None
        if len(secret.reveal()) < 32:
            where = "secret_file" if k.has("secret_file") else "secret_env"
            raise ConfigError(
                k.key(where), "secret too short: need at least 32 bytes of random data"
            )
        k.done()
        keys.append(TokenKey(key_id, secret))
    if not keys:
        raise ConfigError(s.key("keys"), "at least one key is required (the first one issues)")
    cfg = TokensConfig(
        keys=tuple(keys),
        max_age_days=s.get("max_age_days", DEFAULT_TOKEN_MAX_AGE_DAYS, _int_range(30, 3650)),
    )
    s.done()
    return cfg


def _read_dkim(top: _Section) -> DkimConfig:
    """``dkim:`` is a list of keys (the contract), or a mapping with ``keys`` and options."""
    top.used.add("dkim")
    raw = top.raw.get("dkim")
    require = False
    if raw is None or isinstance(raw, list):
        items = [(item, f"dkim[{i}]") for i, item in enumerate(raw or [])]
    else:
        s = top.section("dkim")
        require = s.get("require_for_marketing", False, _bool)
        items = list(s.items("keys"))
        s.done()
    keys: list[DkimKeyConfig] = []
    for item, key in items:
        k = top.child(item, key)
        entry = DkimKeyConfig(
            domain=k.require("domain", _domain),
            selector=k.require("selector", _selector),
            private_key_file=k.secret_file("private_key_file"),
            key=key,
        )
        k.done()
        if any((e.domain, e.selector) == (entry.domain, entry.selector) for e in keys):
            raise ConfigError(
                k.key("selector"), f"duplicate selector {entry.selector} for {entry.domain}"
            )
        keys.append(entry)
    return DkimConfig(keys=tuple(keys), require_for_marketing=require)


def _selector(value: object, key: str) -> str:
    text = _str(value, key)
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,62})", text):
        raise ConfigError(key, "not a valid DKIM selector")
    return text


def _read_policy(s: _Section) -> PolicyConfig:
    class_choice = _choice("marketing", "transactional")
    default_class: MessageClass = s.get("default_class", "transactional", class_choice)
    default_group = s.get("default_group", "default", _group_name)
    groups: dict[str, GroupConfig] = {}
    g = s.section("groups")
    for name in list(g.raw):
        key = g.key(str(name))
        _group_name(name, key)
        gs = g.section(str(name))
        groups[str(name)] = GroupConfig(
            name=str(name),
            display_name=gs.get("display_name", str(name), _str),
            list_id=gs.get("list_id", None, _list_id),
            mailto=gs.get("mailto", None, _mailto),
            feedback_id=gs.get("feedback_id", None, _feedback_id),
        )
        gs.done()
    g.done()
    senders: list[SenderRule] = []
    for item, key in s.items("senders"):
        r = s.child(item, key)
        match = r.require("match", _str).lower()
        if "@" not in match:
            raise ConfigError(r.key("match"), 'expected an address, "*@domain" or a glob')
        message_class = r.require("class", class_choice)
        group = r.get("group", None, _group_name)
        if message_class == "marketing" and group is None:
            group = default_group
        if message_class == "transactional" and group is not None:
            raise ConfigError(r.key("group"), "only marketing senders have a group")
        rule = SenderRule(
            match=match,
            message_class=message_class,
            group=group,
            unsubscribe_scope=r.get(
                "unsubscribe_scope", "group", _choice("group", "sender", "all_marketing")
            ),
            keep_app_unsubscribe=r.get("keep_app_unsubscribe", False, _bool),
        )
        r.done()
        senders.append(rule)
    cfg = PolicyConfig(
        default_class=default_class,
        default_group=default_group,
        senders=tuple(senders),
        groups=groups,
    )
    s.done()
    return cfg


def _group_name(value: object, key: str) -> str:
    text = _str(value, key)
    if not _GROUP.match(text):
        raise ConfigError(key, "expected 1-64 characters of A-Z a-z 0-9 . _ -")
    return text


def _list_id(value: object, key: str) -> str:
    text = _str(value, key)
    if any(ch in text for ch in "\r\n\0") or not text.isascii():
        raise ConfigError(key, "expected printable ASCII, e.g. News <news.example.com>")
    return text


def _mailto(value: object, key: str) -> str:
    text = _str(value, key).removeprefix("mailto:")
    if not re.fullmatch(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+", text):
        raise ConfigError(key, "expected a plain address such as unsubscribe@example.com")
    if len(text.rpartition("@")[0]) > MAX_MAILTO_LOCAL_PART:
        raise ConfigError(
            key,
            f"local part longer than {MAX_MAILTO_LOCAL_PART} characters: no room for the"
            " unsubscribe code within 64 octets",
        )
    return text


def _read_retry(s: _Section) -> RetryConfig:
    d = RetryConfig()
    cfg = RetryConfig(
        max_age=s.get("max_age", d.max_age, _seconds),
        first_delay=s.get("first_delay", d.first_delay, _seconds),
        max_delay=s.get("max_delay", d.max_delay, _seconds),
        poll_interval=s.get("poll_interval", d.poll_interval, _seconds),
    )
    s.done()
    return cfg


def _days_or_never(value: object, key: str) -> float | None:
    if value == "never":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(key, 'expected a positive number of days or "never"')
    return float(value)


def _pattern(value: object, key: str) -> str:
    text = _str(value, key).lower()
    if any(ch.isspace() for ch in text) or text.count("@") > 1:
        raise ConfigError(key, 'expected a domain, "@domain" or an address glob')
    return text


def _read_suppression(s: _Section) -> SuppressionConfig:
    d = SuppressionConfig()
    soft = tuple(_days(item, key) for item, key in s.items("soft_bounce_days"))
    cfg = SuppressionConfig(
        hard_bounce_days=s.get("hard_bounce_days", d.hard_bounce_days, _days_or_never),
        soft_bounce_days=soft or d.soft_bounce_days,
        manual_days=s.get("manual_days", None, _days_or_never),
        unsubscribe_days=s.get("unsubscribe_days", None, _days_or_never),
        patterns=tuple(_pattern(item, key) for item, key in s.items("patterns")),
        patterns_block_transactional=s.get("patterns_block_transactional", False, _bool),
    )
    s.done()
    return cfg


def _days(value: object, key: str) -> float:
    days = _days_or_never(value, key)
    if days is None:
        raise ConfigError(key, "expected a positive number of days")
    return days


def _address(value: object, key: str) -> str:
    text = _str(value, key)
    if not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+", text):
        raise ConfigError(key, "expected an e-mail address")
    return text


def _read_events(s: _Section) -> EventsConfig:
    webhook = notify = None
    if s.has("webhook"):
        w = s.section("webhook")
        secret = _secret_from(w, "secret", required=True)
        assert secret is not None
        webhook = WebhookConfig(
            url=w.require("url", _https_url),
            secret=secret,
            timeout=w.get("timeout", 10.0, _seconds),
        )
        w.done()
    if s.has("notify_email"):
        n = s.section("notify_email")
        reasons = tuple(
            _choice("unsubscribe", "hard-bounce", "soft-bounce", "complaint", "manual")(item, key)
            for item, key in n.items("reasons")
        )
        notify = NotifyConfig(
            to=n.require("to", _address),
            sender=n.require("from", _address),
            reasons=reasons or ("unsubscribe",),
        )
        n.done()
    s.used.update({"webhook", "notify_email"})
    cfg = EventsConfig(
        webhook=webhook,
        notify_email=notify,
        retry_first_delay=s.get("retry_first_delay", 5.0, _seconds),
        retry_max_delay=s.get("retry_max_delay", 600.0, _seconds),
    )
    s.done()
    return cfg


def _read_log(s: _Section) -> LogConfig:
    cfg = LogConfig(
        format=s.get("format", "text", _choice("text", "json")),
        level=s.get("level", "info", _choice("debug", "info", "warning", "error")),
    )
    s.done()
    return cfg


_LOCAL_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,15}$")
_ENHANCED_PREFIX = re.compile(r"^[245](\.\d{1,3}){0,2}$")


def _local_part(value: object, key: str) -> str:
    text = _str(value, key)
    if not _LOCAL_PART.match(text):
        raise ConfigError(key, "expected 1-16 characters of A-Z a-z 0-9 . _ - (no +)")
    return text


def _threshold(value: object, key: str) -> int:
    if value == "never":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise ConfigError(key, 'expected an integer 1-1000 or "never"')
    return value


def _read_bounces(s: _Section) -> BouncesConfig:
    d = BouncesConfig()
    t = s.section("thresholds")
    thresholds = BounceThresholds(
        **{kind: t.get(kind, d.thresholds.of(kind), _threshold) for kind in BOUNCE_KINDS}
    )
    t.done()
    c = s.section("classify")
    value_choice = _choice(*BOUNCE_KINDS, *(r for r in REASONS if r not in NOT_FAILURES))
    classify: list[tuple[str, str]] = []
    for code in list(c.raw):
        key = c.key(str(code))
        if not isinstance(code, str):
            raise ConfigError(key, 'quote the code: "5.7" (unquoted, YAML reads a number)')
        if code[:1].isdigit() and not _ENHANCED_PREFIX.match(code):
            raise ConfigError(key, 'expected an RFC 3463 code or prefix such as "5.1.1" or "5.7"')
        if not code[:1].isdigit() and not 3 <= len(code.strip()) <= 200:
            raise ConfigError(key, "expected a code prefix or a phrase of 3-200 characters")
        classify.append((code, c.get(code, "unknown", value_choice)))
    c.done()
    feedback = tuple(_address(item, key).lower() for item, key in s.items("feedback_addresses"))
    networks = tuple(_network(item, key) for item, key in s.items("allowed_networks"))
    cfg = BouncesConfig(
        return_path_domain=s.get("return_path_domain", None, _domain),
        local_part=s.get("local_part", d.local_part, _local_part),
        listen=s.get("listen", None, _host_port),
        protocol=s.get("protocol", d.protocol, _choice("smtp", "lmtp")),
        feedback_addresses=feedback,
        keep_days=s.get("keep_days", d.keep_days, _days),
        max_message_size=s.get("max_message_size", d.max_message_size, _size),
        timeout=s.get("timeout", d.timeout, _seconds),
        accept_unsigned=s.get("accept_unsigned", d.accept_unsigned, _bool),
        thresholds=thresholds,
        classify=tuple(classify),
        allowed_networks=networks if "allowed_networks" in s.raw else d.allowed_networks,
        tls=_read_inbound_tls(s.section("tls")) if s.has("tls") else None,
        max_connections=s.get("max_connections", d.max_connections, _int_range(1, 100_000)),
        max_connections_per_client=s.get(
            "max_connections_per_client", d.max_connections_per_client, _int_range(1, 100_000)
        ),
        max_messages_per_client=s.get(
            "max_messages_per_client", d.max_messages_per_client, _int_range(1, 100_000)
        ),
        audit_max_bytes=s.get("audit_max_bytes", d.audit_max_bytes, _size),
        digest_bytes=s.get("digest_bytes", d.digest_bytes, _int_range(0, 64 * 1024)),
        suppress_suspended=s.get("suppress_suspended", d.suppress_suspended, _bool),
    )
    s.used.add("tls")
    s.done()
    return cfg


def _read_inbound_tls(s: _Section) -> SmtpTlsConfig:
    cfg = SmtpTlsConfig(cert_file=s.file("cert_file"), key_file=s.file("key_file"))
    s.done()
    return cfg


def _placeholder(value: object, key: str) -> str:
    text = _str(value, key)
    if not re.fullmatch(r"[\x21-\x7e]{3,64}", text):
        raise ConfigError(key, "expected 3-64 printable ASCII characters, e.g. %unsubscribe_url%")
    return text


def _read_unsubscribe(s: _Section) -> UnsubscribeConfig:
    placeholder = s.get("placeholder", DEFAULT_PLACEHOLDER, _placeholder)

    def footer(value: object, key: str) -> str:
        if not isinstance(value, str):
            raise ConfigError(key, "expected a string")
        text = value  # not stripped: leading and trailing line breaks are the operator's
        if placeholder not in text:
            raise ConfigError(key, f"must contain the placeholder {placeholder}")
        return text.replace("\r\n", "\n").replace("\n", "\r\n")

    default_text = DEFAULT_FOOTER_TEXT.replace(DEFAULT_PLACEHOLDER, placeholder)
    default_html = DEFAULT_FOOTER_HTML.replace(DEFAULT_PLACEHOLDER, placeholder)
    cfg = UnsubscribeConfig(
        mailto_domain=s.get("mailto_domain", None, _domain),
        mailto_local_part=s.get("mailto_local_part", "unsubscribe", _local_part),
        placeholder=placeholder,
        footer=s.get("footer", False, _bool),
        footer_text=s.get("footer_text", default_text, footer),
        footer_html=s.get("footer_html", default_html, footer),
    )
    s.done()
    return cfg


def _milter_listen(value: object, key: str) -> HostPort | Path:
    text = _str(value, key)
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise ConfigError(key, "expected unix:/absolute/path or host:port")
        return Path(path)
    if text.startswith("inet:"):
        text = text[len("inet:") :]
    return _host_port(text, key)


def _read_milter(s: _Section) -> MilterConfig:
    d = MilterConfig()
    cfg = MilterConfig(
        listen=s.get("listen", None, _milter_listen),
        multi_recipient=s.get(
            "multi_recipient", d.multi_recipient, _choice("reinject", "tempfail")
        ),
        timeout=s.get("timeout", d.timeout, _seconds),
    )
    s.done()
    return cfg


def _feedback_id(value: object, key: str) -> str:
    """A ``Feedback-ID`` template: printable ASCII, only the known ``{fields}``."""
    text = _str(value, key)
    if not re.fullmatch(r"[\x21-\x7e]{1,200}", text):
        raise ConfigError(key, "expected up to 200 printable ASCII characters without spaces")
    rest = text
    for name in FEEDBACK_ID_FIELDS:
        rest = rest.replace("{" + name + "}", "")
    if "{" in rest or "}" in rest:
        fields = ", ".join("{" + f + "}" for f in FEEDBACK_ID_FIELDS)
        raise ConfigError(key, f"unknown or unbalanced {{field}}; the fields are {fields}")
    return text


def _plain_address(value: object, key: str) -> str:
    text = _str(value, key).lower()
    if not re.fullmatch(r"[a-z0-9._%+-]{1,64}@[a-z0-9-]+(\.[a-z0-9-]+)+", text):
        raise ConfigError(key, "expected a plain address such as fbl@example.com")
    return text


def _read_compliance(s: _Section) -> ComplianceConfig:
    cfg = ComplianceConfig(
        cfbl_address=s.get("cfbl_address", None, _plain_address),
        feedback_id=s.get("feedback_id", None, _feedback_id),
        require_body_link=s.get("require_body_link", False, _bool),
    )
    s.done()
    return cfg


def _check_inbound(config: Config) -> None:
    """The listener needs at least one address to accept mail for (it never relays)."""
    bounces = config.bounces
    if bounces.listen is None:
        return
    group_mailto = any(g.mailto for g in config.policy.groups.values())
    cfbl = config.compliance.cfbl_address
    if not (
        bounces.accepted_addresses() or config.unsubscribe.mailto_domain or group_mailto or cfbl
    ):
        raise ConfigError(
            "bounces.listen",
            "no address to accept mail for: set bounces.return_path_domain,"
            " bounces.feedback_addresses, unsubscribe.mailto_domain or a group's mailto",
        )
    smtp = config.smtp.listen
    if smtp is not None and bounces.listen == smtp and bounces.listen.port != 0:
        raise ConfigError("bounces.listen", "must differ from smtp.listen")


_TOPIC_ARN = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}$")


def _topic_arn(value: object, key: str) -> str:
    text = _str(value, key)
    if not _TOPIC_ARN.match(text):
        raise ConfigError(key, f"not an SNS topic ARN: {text!r}")
    return text


def _read_esp_webhooks(top: _Section) -> tuple[EspWebhookConfig, ...]:
    """``esp_webhooks:``, a list with one entry per provider; each names its credentials."""
    entries: list[EspWebhookConfig] = []
    needs = {
        "ses": "topic_arns",
        "sendgrid": "public_key_file",
        "mailgun": "signing_key_file",
        "postmark": "basic_auth_file",
    }
    for item, key in top.items("esp_webhooks"):
        s = top.child(item, key)
        provider: EspProvider = s.require("provider", _choice(*ESP_PROVIDERS))
        if any(e.provider == provider for e in entries):
            raise ConfigError(s.key("provider"), f"{provider} is configured twice")
        allowed = {"provider", needs[provider], "groups", "max_skew"}
        if provider == "ses":
            allowed.add("signing_cert_file")
        if provider in ("mailgun", "postmark"):
            allowed.add(needs[provider].replace("_file", "_env"))
        for name in s.raw:
            if name not in allowed:
                raise ConfigError(s.key(name), f"unknown key for provider {provider}")
        groups: dict[str, str] = {}
        g = s.section("groups")
        for name in list(g.raw):
            groups[str(name)] = g.require(name, _group_name)
        g.done()
        entry = EspWebhookConfig(
            provider=provider,
            topic_arns=tuple(_topic_arn(v, k) for v, k in s.items("topic_arns")),
            signing_cert_pem=s.file("signing_cert_file").read_bytes()
            if s.has("signing_cert_file")
            else None,
            public_key=s.file("public_key_file").read_bytes().strip()
            if provider == "sendgrid"
            else None,
            signing_key=_secret_from(s, "signing_key", required=True)
            if provider == "mailgun"
            else None,
            basic_auth=_secret_from(s, "basic_auth", required=True)
            if provider == "postmark"
            else None,
            groups=groups,
            max_skew=s.get("max_skew", 300.0, _seconds),
            key=key,
        )
        s.used.update(s.raw)
        s.done()
        if provider == "ses" and not entry.topic_arns:
            raise ConfigError(s.key("topic_arns"), "at least one SNS topic ARN is required")
        if entry.basic_auth is not None and b":" not in entry.basic_auth.reveal():
            raise ConfigError(s.key("basic_auth_file"), "expected user:password")
        entries.append(entry)
    return tuple(entries)


def require_store(config: Config, command: str) -> None:
    """``serve`` and ``check-config`` need a store that outlives the process."""
    redis = config.redis
    if redis.url is None and redis.sentinel is None and not redis.embedded:
        raise ConfigError(
            "redis.url",
            f'required for {command}; use "embedded" with redis.data_dir for a single host',
        )


def parse_config(raw: object, source: Path | None = None) -> Config:
    """Build a Config from already-parsed YAML; relative paths are relative to ``source``.

    ``redis.url`` may be omitted here (the demo's throwaway store); ``require_store``
    is what ``serve`` and ``check-config`` call.
    """
    base = source.parent if source is not None else Path.cwd()
    top = _Section(raw, "", base)
    for required in ("http", "tokens"):
        if not top.has(required):
            raise ConfigError(required, "is required")
    milter = _read_milter(top.section("milter"))
    config = Config(
        smtp=_read_smtp(top.section("smtp"), milter.listen),
        milter=milter,
        upstream=_read_upstream(top.section("upstream")),
        http=_read_http(top.section("http")),
        redis=_read_redis(top.section("redis")),
        tokens=_read_tokens(top.section("tokens")),
        dkim=_read_dkim(top),
        policy=_read_policy(top.section("policy")),
        retry=_read_retry(top.section("retry")),
        suppression=_read_suppression(top.section("suppression")),
        events=_read_events(top.section("events")),
        bounces=_read_bounces(top.section("bounces")),
        unsubscribe=_read_unsubscribe(top.section("unsubscribe")),
        compliance=_read_compliance(top.section("compliance")),
        log=_read_log(top.section("log")),
        esp_webhooks=_read_esp_webhooks(top),
        state_dir=top.get("state_dir", DEFAULT_STATE_DIR, lambda v, k: base / _str(v, k)),
        source=source,
        secret_files=tuple(top.secrets),
    )
    top.done()
    _check_inbound(config)
    return config


def load_config(path: Path | str | None) -> Config:
    """Read and validate the YAML file at ``path`` (or ``$ONECLICK_RELAY_CONFIG``)."""
    if path is None:
        env = os.environ.get(DEFAULT_CONFIG_ENV)
        if not env:
            raise ConfigError("-c/--config", f"no config file given (or set {DEFAULT_CONFIG_ENV})")
        path = env
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("-c/--config", f"cannot read {path}: {exc.strerror}") from None
    return parse_config(parse_yaml(text, path), source=path.resolve())


def _check_duplicates(node: yaml.Node | None, source: Path | str) -> None:
    """A key given twice in one mapping is an error naming it (PyYAML keeps the last)."""
    stack: list[tuple[yaml.Node, str]] = [(node, "")] if node is not None else []
    visited: set[int] = set()
    while stack:
        current, where = stack.pop()
        if id(current) in visited:  # anchors and aliases share nodes
            continue
        visited.add(id(current))
        if isinstance(current, yaml.SequenceNode):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(current.value))
        elif isinstance(current, yaml.MappingNode):
            seen: dict[tuple[str, str], yaml.Node] = {}
            for key_node, value_node in current.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                    continue
                name = str(key_node.value)
                dotted = f"{where}.{name}" if where else name
                first = seen.get((key_node.tag, name))
                if first is not None:
                    mark = key_node.start_mark
                    raise ConfigError(
                        dotted,
                        f"duplicate key ({source}: line {mark.line + 1}, column"
                        f" {mark.column + 1}; first at line {first.start_mark.line + 1}):"
                        " YAML would keep only the last one",
                    )
                seen[(key_node.tag, name)] = key_node
                stack.append((value_node, dotted))


def parse_yaml(text: str, path: Path | str = "<config>") -> object:
    """YAML to Python objects; syntax errors say what and where, duplicate keys are errors."""
    try:
        _check_duplicates(yaml.compose(text, Loader=yaml.SafeLoader), path)
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "not valid YAML"
        if exc.context and exc.problem:
            problem = f"{problem} ({exc.context})"
        raise ConfigError(str(path), f"{where}{problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {exc}") from None
