"""config.example.yaml documents every key: it must parse, with its files provided."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import Keys

from relay.config import parse_config

EXAMPLE = Path(__file__).parent.parent / "config.example.yaml"


def test_example_config_parses_with_its_files(keys: Keys, tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    text = text.replace("/etc/oneclick-relay/token-k1.key", str(keys.token_k1))
    text = text.replace("/etc/oneclick-relay/dkim/example.com.s2026.pem", str(keys.rsa))
    config = parse_config(yaml.safe_load(text), source=tmp_path / "c.yaml")
    assert config.smtp.max_message_size == 25 * 1024 * 1024
    assert config.policy.senders[0].match == "news@example.com"
    assert config.suppression.patterns == ("mailinator.com", "noreply@*")
    assert config.log.format == "text"


def test_every_commented_key_is_known(keys: Keys, tmp_path: Path) -> None:
    """Uncommenting the optional blocks still gives a valid file (no stale key names)."""
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if stripped.startswith("# ") and ":" in stripped and not stripped.startswith("# Or"):
            candidate = indent + stripped[2:]
            key = candidate.strip().removeprefix("- ").split(":")[0]
            if key.replace("_", "").isalnum():
                lines.append(candidate)
                continue
        lines.append(line)
    text = "\n".join(lines)
    for path in ("token-k1.key", "webhook.key", "admin.token", "metrics.token", "users"):
        target = tmp_path / path
        target.write_text("x" * 48 + "\n")
    text = text.replace("/etc/oneclick-relay/token-k1.key", str(tmp_path / "token-k1.key"))
    text = text.replace("/etc/oneclick-relay/webhook.key", str(tmp_path / "webhook.key"))
    text = text.replace("/etc/oneclick-relay/admin.token", str(tmp_path / "admin.token"))
    text = text.replace("/etc/oneclick-relay/metrics.token", str(tmp_path / "metrics.token"))
    text = text.replace("/etc/oneclick-relay/dkim/example.com.s2026.pem", str(keys.rsa))
    text = text.replace("/etc/oneclick-relay/dkim/example.com.e2026.pem", str(keys.ed25519))
    text = text.replace("/etc/oneclick-relay/tls/relay.crt", str(keys.rsa))
    text = text.replace("/etc/oneclick-relay/tls/relay.key", str(keys.rsa))
    text = text.replace("/etc/oneclick-relay/tls/mx.crt", str(keys.rsa))
    text = text.replace("/etc/oneclick-relay/tls/mx.key", str(keys.rsa))
    text = text.replace("/etc/oneclick-relay/users", str(tmp_path / "users"))
    text = text.replace("/etc/oneclick-relay/upstream.password", str(tmp_path / "users"))
    raw = yaml.safe_load(text)
    raw["redis"].pop("sentinel")  # the example shows both; they are alternatives
    raw["redis"].pop("cluster")
    data_dir = raw["redis"].pop("data_dir")  # only with url "embedded", below
    assert data_dir == "/var/lib/oneclick-relay/redis"
    config = parse_config(raw, source=tmp_path / "c.yaml")
    assert config.smtp.tls is not None
    assert config.bounces.tls is not None
    assert config.events.webhook is not None
    assert config.http.metrics_token is not None
    assert len(config.dkim.keys) == 2


def test_example_embedded_store(keys: Keys, tmp_path: Path) -> None:
    """The documented single-host alternative: url "embedded" with a data_dir."""
    text = EXAMPLE.read_text()
    text = text.replace("/etc/oneclick-relay/token-k1.key", str(keys.token_k1))
    text = text.replace("/etc/oneclick-relay/dkim/example.com.s2026.pem", str(keys.rsa))
    text = text.replace('url: "redis://127.0.0.1:6379/0"', 'url: "embedded"')
    text = text.replace('# data_dir: "/var/lib/oneclick-relay/redis"', f'data_dir: "{tmp_path}"')
    config = parse_config(yaml.safe_load(text), source=tmp_path / "c.yaml")
    assert (config.redis.embedded, config.redis.url, config.redis.data_dir) == (
        True,
        None,
        tmp_path,
    )
