"""Settings that cannot hurt: each refusal and warning of ``serve`` and ``check-config``.

Open relays and empty ``smtp.allowed_networks`` are refused by the loader; key and
secret files others can read are refused (as ssh refuses them) unless
``--insecure-permissions``; plain-http one-click URLs, Ed25519-only marketing domains
and the embedded store are warned about. Every case runs the real command line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Keys
from helpers import build_config, write_yaml

from relay.cli.keygen import dkim_keygen, token_keygen
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
STORE_REQUIRED = 'required for {}; use "embedded" with redis.data_dir for a single host'
OPEN = (
    "admits every IPv{} address without smtp.auth: that is an open relay;"
    " list only your applications' networks, or configure smtp.auth"
)
EMPTY = (
    "empty and smtp.auth is not set, so no client could ever send: list the networks"
    ' of the applications that send through the relay (e.g. ["127.0.0.0/8"]),'
    " or configure smtp.auth"
)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ONECLICK_RELAY_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def warnings_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("WARNING: ")]


@pytest.fixture
def private_keys(tmp_path: Path) -> Keys:
    """Keys of this test only (their modes are changed), written 0600 by the keygen."""
    folder = tmp_path / "keys"
    rsa, _ = dkim_keygen("example.com", "s2026", "rsa", 1024, folder)
    ed, _ = dkim_keygen("example.com", "e2026", "ed25519", 0, folder)
    token_keygen(folder / "k1.key")
    token_keygen(folder / "k2.key")
    return Keys(folder, rsa, ed, folder / "k1.key", folder / "k2.key", {})


def dkim_entry(selector: str, path: Path) -> dict[str, str]:
    return {"domain": "example.com", "selector": selector, "private_key_file": str(path)}


@pytest.fixture
def raw(private_keys: Keys) -> dict[str, Any]:
    return {
        "smtp": {"listen": "127.0.0.1:0", "allowed_networks": ["127.0.0.0/8", "::1/128"]},
        "upstream": {"host": "127.0.0.1", "port": 2500},
        "http": {"listen": "127.0.0.1:0", "public_url": "https://unsub.example.com"},
        "redis": {"url": "redis://127.0.0.1:1/0"},
        "tokens": {"keys": [{"id": "k1", "secret_file": str(private_keys.token_k1)}]},
        "dkim": [dkim_entry("s2026", private_keys.rsa)],
        "policy": {"senders": [{"match": "news@example.com", "class": "marketing"}]},
    }


def check(raw: dict[str, Any], tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return cli("check-config", "-c", str(write_yaml(tmp_path / "relay.yaml", raw)), *flags)


def serve_refused(raw: dict[str, Any], tmp_path: Path, *flags: str) -> str:
    """``serve`` must exit 2 at once (nothing listens: the ports are never bound)."""
    result = cli("serve", "-c", str(write_yaml(tmp_path / "relay.yaml", raw)), *flags)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_a_safe_config_has_no_warning(raw: dict[str, Any], tmp_path: Path) -> None:
    result = check(raw, tmp_path)
    assert result.returncode == 0, result.stderr
    assert warnings_of(result) == []


# ---------------------------------------------------------------------------
# No throwaway store by accident


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_redis_url_is_required(raw: dict[str, Any], tmp_path: Path, command: str) -> None:
    del raw["redis"]
    result = cli(command, "-c", str(write_yaml(tmp_path / "relay.yaml", raw)))
    assert result.returncode == 2
    assert result.stderr == f"config error: redis.url: {STORE_REQUIRED.format(command)}\n"


def test_embedded_store_needs_a_data_dir(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["redis"] = {"url": "embedded"}
    result = check(raw, tmp_path)
    assert result.returncode == 2
    assert result.stderr == "config error: redis.data_dir: is required\n"


def test_embedded_data_dir_must_exist(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["redis"] = {"url": "embedded", "data_dir": str(tmp_path / "nope")}
    result = check(raw, tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        f"config error: redis.data_dir: not a directory: {tmp_path / 'nope'}"
        " (create it: mkdir -m 700)\n"
    )


def test_data_dir_only_with_embedded(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["redis"]["data_dir"] = str(tmp_path)
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert str(err.value) == 'redis.data_dir: only for redis.url "embedded"'


def test_check_config_says_loudly_the_store_is_embedded(
    raw: dict[str, Any], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    raw["redis"] = {"url": "embedded", "data_dir": "data"}  # relative to the config file
    result = check(raw, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"  redis    EMBEDDED, append-only file in {data} (single host)" in result.stdout
    assert warnings_of(result) == [
        f"WARNING: redis: EMBEDDED server, persisting to an append-only file in {data};"
        " single host only: every relay host needs the same Redis (a redis:// URL)"
    ]


def test_embedded_data_dir_others_can_read_is_refused(raw: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    raw["redis"] = {"url": "embedded", "data_dir": str(data)}
    result = check(raw, tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        f"config error: redis.data_dir: permissions 0755 for '{data}' are too open:"
        f" the suppression list is personal data (chmod 700 '{data}');"
        " --insecure-permissions skips this check\n"
    )


# ---------------------------------------------------------------------------
# Never an open relay


@pytest.mark.parametrize(
    ("networks", "key", "problem"),
    [
        (["127.0.0.0/8", "0.0.0.0/0"], "smtp.allowed_networks[1]", "0.0.0.0/0 " + OPEN.format(4)),
        (["::/0"], "smtp.allowed_networks[0]", "::/0 " + OPEN.format(6)),
        (["2000::/3"], "smtp.allowed_networks[0]", "2000::/3 " + OPEN.format(6)),
        (
            ["0.0.0.0/1", "128.0.0.0/1", "::1/128"],
            "smtp.allowed_networks",
            "together, 0.0.0.0/1, 128.0.0.0/1 " + OPEN.format(4),
        ),
        ([], "smtp.allowed_networks", EMPTY),
    ],
)
def test_open_or_empty_allowed_networks_is_refused(
    raw: dict[str, Any], tmp_path: Path, networks: list[str], key: str, problem: str
) -> None:
    raw["smtp"]["allowed_networks"] = networks
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert (err.value.key, err.value.problem) == (key, problem)
    assert serve_refused(raw, tmp_path) == f"config error: {key}: {problem}\n"
    result = check(raw, tmp_path, "--insecure-permissions")  # no flag makes it acceptable
    assert (result.returncode, result.stderr) == (2, f"config error: {key}: {problem}\n")


def test_wide_but_not_everything_is_accepted(raw: dict[str, Any]) -> None:
    raw["smtp"]["allowed_networks"] = ["10.0.0.0/8", "0.0.0.0/1", "fd00::/8"]
    assert len(build_config(raw).smtp.allowed_networks) == 3


def test_everything_is_accepted_with_smtp_auth(raw: dict[str, Any], tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem", "users"):
        (tmp_path / name).write_text("x\n")
    raw["smtp"]["allowed_networks"] = []
    raw["smtp"]["tls"] = {
        "cert_file": str(tmp_path / "cert.pem"),
        "key_file": str(tmp_path / "key.pem"),
    }
    raw["smtp"]["auth"] = {"users_file": str(tmp_path / "users")}
    assert build_config(raw).smtp.allowed_networks == ()
    raw["smtp"]["allowed_networks"] = ["0.0.0.0/0", "::/0"]
    assert len(build_config(raw).smtp.allowed_networks) == 2


# ---------------------------------------------------------------------------
# Key and secret files others can read (ssh's rule)


def too_open(key: str, path: Path, mode: int) -> str:
    return (
        f"config error: {key}: permissions {mode:04o} for '{path}' are too open: a key or"
        f" secret file must not be accessible by others (chmod 600 '{path}', or 640 with the"
        " relay's group when root owns it); --insecure-permissions skips this check\n"
    )


@pytest.mark.parametrize(
    ("which", "key", "mode"),
    [
        ("token", "tokens.keys[0].secret_file", 0o644),
        ("token", "tokens.keys[0].secret_file", 0o640),
        ("dkim", "dkim[0].private_key_file", 0o604),
        ("password", "upstream.password_file", 0o660),
    ],
)
def test_readable_secret_file_is_refused_naming_file_and_mode(
    raw: dict[str, Any], private_keys: Keys, tmp_path: Path, which: str, key: str, mode: int
) -> None:
    raw["upstream"] |= {"username": "relay", "password_file": str(private_keys.token_k2)}
    path = {"token": private_keys.token_k1, "dkim": private_keys.rsa}.get(
        which, private_keys.token_k2
    )
    path.chmod(mode)
    result = check(raw, tmp_path)
    assert result.returncode == 2
    assert result.stderr == too_open(key, path, mode)
    assert result.stdout == ""
    assert serve_refused(raw, tmp_path) == too_open(key, path, mode)


def test_insecure_permissions_overrides_with_a_warning(
    raw: dict[str, Any], private_keys: Keys, tmp_path: Path
) -> None:
    private_keys.token_k1.chmod(0o644)
    result = check(raw, tmp_path, "--insecure-permissions")
    assert result.returncode == 0, result.stderr
    refused = too_open("tokens.keys[0].secret_file", private_keys.token_k1, 0o644)
    skipped = "; --insecure-permissions skips this check\n"
    assert warnings_of(result) == [
        "WARNING: "
        + refused.removeprefix("config error: ").removesuffix(skipped)
        + " (ignored: --insecure-permissions)"
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another owner needs root")
def test_root_owned_group_readable_file_is_the_systemd_layout(
    raw: dict[str, Any], private_keys: Keys, tmp_path: Path
) -> None:
    """root:oneclick-relay 0640 read by the relay's user is fine; 0644 is not."""
    path = tmp_path / "given-away.key"
    shutil.copy(private_keys.token_k1, path)
    os.chown(path, 65534, 65534)  # not the user running the check
    raw["tokens"]["keys"][0]["secret_file"] = str(path)
    path.chmod(0o640)
    assert check(raw, tmp_path).returncode == 0
    path.chmod(0o644)
    result = check(raw, tmp_path)
    assert result.returncode == 2
    assert result.stderr == too_open("tokens.keys[0].secret_file", path, 0o644)


# ---------------------------------------------------------------------------
# Warnings: the mail would go out, but providers would not honour it


def test_plain_http_public_url_is_a_warning(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["http"]["public_url"] = "http://unsub.example.com"
    result = check(raw, tmp_path)
    assert result.returncode == 0, result.stderr
    assert warnings_of(result) == [
        "WARNING: http.public_url: http://unsub.example.com is plain http://: the one-click"
        " URL must be https (RFC 8058 section 3.1); mailbox providers do not POST to"
        " http:// links"
    ]


def test_ed25519_only_marketing_domain_is_a_warning(
    raw: dict[str, Any], private_keys: Keys, tmp_path: Path
) -> None:
    raw["dkim"] = [dkim_entry("e2026", private_keys.ed25519)]
    raw["policy"]["senders"] = [
        {"match": "receipts@example.com", "class": "transactional"},
        {"match": "news@example.com", "class": "marketing"},
    ]
    result = check(raw, tmp_path)
    assert result.returncode == 0, result.stderr
    assert warnings_of(result) == [
        "WARNING: policy.senders[1]: example.com has only Ed25519 DKIM keys: Gmail and"
        " SpamAssassin do not verify Ed25519-only mail; add an RSA key for the domain and"
        " dual-sign"
    ]
    raw["dkim"].append(dkim_entry("s2026", private_keys.rsa))
    assert warnings_of(check(raw, tmp_path)) == []  # dual-signed: nothing to say
