"""The command line, run as ``python -m relay ...`` in a subprocess against the real Redis."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import shlex
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dkim
import pytest
import redis
from helpers import message, write_yaml

from relay.config import DkimKeyConfig, RetryConfig, parse_config
from relay.mail.dkim import Signer, body_hash, load_key
from relay.mail.message import Message
from relay.mail.tokens import TokenCodec
from relay.outbound.retry import RetryQueue
from relay.store import client as redis_client
from relay.store.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
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


@pytest.fixture
def config_file(config_dict: dict[str, Any], tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "relay.yaml", config_dict)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------
# suppress


def test_suppress_round_trip(config_file: Path, redis_url: str) -> None:
    cfg = str(config_file)
    added = run(
        "suppress", "-c", cfg, "add", "Alice@Example.NET", "--group", "newsletter",
        "--reason", "unsubscribe",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "added" in added.stdout
    assert "group:newsletter" in added.stdout

    again = run(
        "suppress", "-c", cfg, "add", "alice@example.net", "--group", "newsletter",
        "--reason", "unsubscribe",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "already present" in again.stdout

    bob = run("suppress", "-c", cfg, "add", "bob@example.org", "--expires-days", "2")
    assert bob.returncode == 0, bob.stderr
    assert "global" in bob.stdout

    # what the CLI wrote is in Redis under the store's key layout
    client = redis.Redis.from_url(redis_url)
    try:
        alice_fields = client.hgetall("ocr:sup:{alice@example.net}")
        bob_fields = client.hgetall("ocr:sup:{bob@example.org}")
    finally:
        client.close()
    assert list(alice_fields) == [b"g:newsletter|unsubscribe"]
    assert alice_fields[b"g:newsletter|unsubscribe"].endswith(b"|cli")
    assert list(bob_fields) == [b"*|manual"]

    show = run("suppress", "-c", cfg, "show", "ALICE@example.net")
    assert show.returncode == 0, show.stderr
    [line] = show.stdout.splitlines()
    fields = line.split("\t")
    assert fields[:3] == ["alice@example.net", "group:newsletter", "unsubscribe"]
    assert "expires=never" in fields
    assert "source=cli" in fields
    assert fields[-1] == "live"

    show_bob = run("suppress", "-c", cfg, "show", "bob@example.org")
    [bob_line] = show_bob.stdout.splitlines()
    assert "\tglobal\tmanual\t" in bob_line
    assert "expires=never" not in bob_line
    assert re.search(r"expires=\d{4}-\d\d-\d\dT", bob_line)

    nobody = run("suppress", "-c", cfg, "show", "carol@example.com")
    assert nobody.returncode == 0
    assert "not suppressed" in nobody.stdout

    listed = run("suppress", "-c", cfg, "list")
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split("\t")[0] for line in listed.stdout.splitlines()) == [
        "alice@example.net",
        "bob@example.org",
    ]
    limited = run("suppress", "-c", cfg, "list", "--limit", "1")
    assert len(limited.stdout.splitlines()) == 1

    removed = run("suppress", "-c", cfg, "remove", "alice@example.net", "--group", "newsletter")
    assert removed.returncode == 0, removed.stderr
    assert "removed" in removed.stdout
    assert "alice@example.net" in removed.stdout
    nothing = run("suppress", "-c", cfg, "remove", "alice@example.net")
    assert nothing.returncode == 1  # nothing matched
    assert "not suppressed" in run("suppress", "-c", cfg, "show", "alice@example.net").stdout
    assert "bob@example.org" in run("suppress", "-c", cfg, "list").stdout


def test_suppress_add_sender_scope(config_file: Path) -> None:
    cfg = str(config_file)
    result = run("suppress", "-c", cfg, "add", "alice@example.net", "--sender", "News@Example.com")
    assert result.returncode == 0, result.stderr
    assert "sender:news@example.com" in result.stdout
    show = run("suppress", "-c", cfg, "show", "alice@example.net")
    assert "\tsender:news@example.com\tmanual\t" in show.stdout


def test_suppress_group_and_sender_together_is_a_usage_error(config_file: Path) -> None:
    result = run(
        "suppress", "-c", str(config_file), "add", "a@example.net",
        "--group", "newsletter", "--sender", "news@example.com",
    )  # fmt: skip
    assert result.returncode == 2
    assert "not allowed with" in result.stderr


def test_suppress_unknown_reason_is_a_clean_error(config_file: Path) -> None:
    result = run("suppress", "-c", str(config_file), "add", "a@example.net", "--reason", "bogus")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "bogus" in result.stderr


def test_suppress_needs_a_shared_redis(config_dict: dict[str, Any], tmp_path: Path) -> None:
    del config_dict["redis"]["url"]
    path = write_yaml(tmp_path / "relay.yaml", config_dict)
    result = run("suppress", "-c", str(path), "show", "a@example.net")
    assert result.returncode == 2
    assert "redis.url" in result.stderr


def test_suppress_redis_down_exits_1(config_dict: dict[str, Any], tmp_path: Path) -> None:
    config_dict["redis"]["url"] = f"redis://127.0.0.1:{free_port()}/0"
    path = write_yaml(tmp_path / "relay.yaml", config_dict)
    result = run("suppress", "-c", str(path), "show", "a@example.net")
    assert result.returncode == 1
    assert result.stderr.startswith("error:") or "\nerror:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("suppress", "show", "a@example.net"),
        ("events", "tail"),
        ("report",),
        ("queue", "list"),
        ("inbound", "list"),
    ],
    ids=" ".join,
)
def test_every_store_command_with_redis_refusing_says_one_line_and_exits_1(
    config_dict: dict[str, Any], tmp_path: Path, command: tuple[str, ...]
) -> None:
    port = free_port()
    config_dict["redis"]["url"] = f"redis://127.0.0.1:{port}/0"
    path = write_yaml(tmp_path / "relay.yaml", config_dict)
    result = run(command[0], "-c", str(path), *command[1:])
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert re.fullmatch(rf"error: [a-z ]+: ConnectionError \(redis at 127\.0\.0\.1:{port}\)", line)


def test_bad_config_exits_2(config_dict: dict[str, Any], tmp_path: Path) -> None:
    config_dict["redis"]["url"] = "http://127.0.0.1:6379"
    path = write_yaml(tmp_path / "relay.yaml", config_dict)
    result = run("suppress", "-c", str(path), "list")
    assert result.returncode == 2
    assert "redis.url" in result.stderr


def entry_times(line: str) -> tuple[datetime, datetime | None]:
    """(created, expires) of one ``suppress show`` line."""
    fields = dict(f.split("=", 1) for f in line.split("\t") if "=" in f)

    def when(text: str) -> datetime | None:
        return None if text == "never" else datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")

    created = when(fields["created"])
    assert created is not None
    return created, when(fields["expires"])


def test_suppress_add_bounce_takes_the_configured_expiry(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    config_dict["suppression"] = {"hard_bounce_days": 90, "soft_bounce_days": [3, 9]}
    cfg = str(write_yaml(tmp_path / "relay.yaml", config_dict))

    hard = run("suppress", "add", "hard@example.net", "--reason", "hard-bounce", "-c", cfg)
    assert hard.returncode == 0, hard.stderr
    assert hard.stdout.startswith("added: hard@example.net global\nhard@example.net\tglobal\t")
    created, expires = entry_times(hard.stdout.splitlines()[1])
    assert expires == created + timedelta(days=90)

    for days in (3, 9, 9):  # graduated, the last step repeats
        soft = run("suppress", "add", "soft@example.net", "--reason", "soft-bounce", "-c", cfg)
        assert soft.returncode == 0, soft.stderr
        created, expires = entry_times(soft.stdout.splitlines()[1])
        assert expires == created + timedelta(days=days)

    manual = run("suppress", "add", "manual@example.net", "-c", cfg)  # manual_days unset
    assert entry_times(manual.stdout.splitlines()[1])[1] is None
    given = run("suppress", "add", "x@example.net", "--reason", "hard-bounce",
                "--expires-days", "2", "-c", cfg)  # fmt: skip
    created, expires = entry_times(given.stdout.splitlines()[1])
    assert expires == created + timedelta(days=2)


@pytest.mark.parametrize("flags", [["--group", "newsletter"], ["--expires-days", "4"]])
def test_suppress_add_soft_bounce_is_global_and_graduated(
    config_file: Path, flags: list[str]
) -> None:
    result = run("suppress", "add", "a@example.net", "--reason", "soft-bounce", *flags,
                 "-c", str(config_file))  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "error: soft bounces are global, with the graduated expiry of"
        " suppression.soft_bounce_days: drop --group/--sender/--expires-days\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "{cfg}", "suppress", "show", "a@example.net"],
        ["suppress", "-c", "{cfg}", "show", "a@example.net"],
        ["suppress", "show", "-c", "{cfg}", "a@example.net"],
        ["suppress", "show", "a@example.net", "-c", "{cfg}"],
        ["--config", "{cfg}", "suppress", "show", "a@example.net"],
        ["suppress", "show", "a@example.net", "--config", "{cfg}"],
    ],
)
def test_config_flag_before_or_after_the_command(config_file: Path, argv: list[str]) -> None:
    assert run("suppress", "add", "a@example.net", "-c", str(config_file)).returncode == 0
    result = run(*(arg.format(cfg=config_file) for arg in argv))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("a@example.net\tglobal\tmanual\t")


@pytest.mark.parametrize(
    "command", [["check-config"], ["report", "--days", "1"], ["queue", "list"]]
)
def test_config_flag_on_either_side_of_other_commands(
    config_file: Path, command: list[str]
) -> None:
    before = run("-c", str(config_file), *command)
    after = run(*command, "-c", str(config_file))
    assert (before.returncode, after.returncode) == (0, 0), before.stderr + after.stderr
    assert before.stdout == after.stdout


def readme_commands() -> list[str]:
    """Every ``oneclick-relay <command> ...`` the README and the deployment guide show."""
    from relay.cli.main import _parser

    commands = set(_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    found = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "deployment.md"):
        for m in re.finditer(r"oneclick-relay((?: [^\s`#|&;()]+)+)", doc.read_text()):
            words = m.group(1).split()
            first = next((w for i, w in enumerate(words) if not w.startswith("-")
                          and (i == 0 or words[i - 1] not in ("-c", "--config"))), "")  # fmt: skip
            if first in commands and len(words) > 1:  # not a mention of the command's name
                found.append("oneclick-relay" + m.group(1))
    return found


def test_every_documented_command_parses_as_written() -> None:
    from relay.cli.main import _parser

    commands = readme_commands()
    assert len(commands) >= 25, commands
    for command in commands:
        argv = shlex.split(command.replace("${recipient}", "a@example.net").replace("…", "x"))
        try:
            _parser().parse_args(argv[1:])
        except SystemExit as exc:
            raise AssertionError(f"documented command refused: {command}") from exc


def readme_block(after: str) -> list[str]:
    """The lines of the first ```sh block after the line ``after`` in the README."""
    text = (ROOT / "README.md").read_text().split(after, 1)[1]
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("oneclick-relay ")]


def test_suppression_examples_run_as_written(config_file: Path, tmp_path: Path) -> None:
    """The README's suppress block, word for word, config from ONECLICK_RELAY_CONFIG."""
    (tmp_path / "customers.csv").write_text("address,name\ncarol@example.com,Carol\n")
    (tmp_path / "back.csv").write_text("address\nbob@example.com\n")
    env = {**os.environ, "ONECLICK_RELAY_CONFIG": str(config_file)}
    lines = readme_block("(`suppress pattern add`), and are checked in the same round trip")
    assert len(lines) >= 10, lines

    def run_here(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relay", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        if argv[:2] != ["events", "tail"]:
            result = run_here(argv)
            assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
            continue
        # It follows the stream forever: stop after the change made meanwhile.
        with subprocess.Popen(
            [sys.executable, "-m", "relay", *argv, "--count=1"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as tail:
            time.sleep(1.5)  # let it reach XREAD on "$" (only newer events)
            assert run_here(["suppress", "add", "dave@example.com"]).returncode == 0
            out, err = tail.communicate(timeout=30)
        assert tail.returncode == 0, err
        assert "address=dave@example.com" in out, out
    assert (tmp_path / "oct.csv").read_text().startswith("address,")


# ---------------------------------------------------------------------------
# progress on a terminal, quiet when piped


def run_on_terminal(*args: str, cwd: Path) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal; (exit status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "ONECLICK_RELAY_CONFIG"}
    env |= {"TERM": "xterm-256color", "COLUMNS": "120"}
    with subprocess.Popen(
        [sys.executable, "-m", "relay", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    ) as proc:
        os.close(slave)
        screen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        stdout = proc.stdout.read() if proc.stdout else ""
        code = proc.wait(timeout=60)
    os.close(master)
    return code, stdout, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))


def test_import_shows_progress_on_a_terminal_only(config_file: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("".join(f"user{i}@example.net\n" for i in range(5000)))
    code, stdout, screen = run_on_terminal(
        "suppress", "import", str(big), "-c", str(config_file), cwd=tmp_path
    )
    assert code == 0, screen
    assert stdout == "added: 5000, duplicates: 0, invalid: 0\n"
    assert "lines imported" in screen and "5000/5000" in screen, screen
    assert re.search(r"[\d,]+/s", screen), screen  # the rate
    assert "ETA" in screen and "0:00:00" in screen, screen

    again = run("suppress", "import", str(big), "-c", str(config_file))  # piped: quiet
    assert again.returncode == 0
    assert again.stdout == "added: 0, duplicates: 5000, invalid: 0\n"
    assert again.stderr == ""


def test_export_to_a_file_shows_progress_on_a_terminal_only(
    config_file: Path, tmp_path: Path
) -> None:
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"user{i}@example.net\n" for i in range(3000)))
    assert run("suppress", "import", str(listed), "-c", str(config_file)).returncode == 0
    out = tmp_path / "out.csv"
    code, stdout, screen = run_on_terminal(
        "suppress", "export", "--out", str(out), "-c", str(config_file), cwd=tmp_path
    )
    assert code == 0, screen
    assert stdout == ""
    assert len(out.read_text().splitlines()) == 3001
    assert "exported" in screen and "3,001" in screen, screen
    assert re.search(r"[\d,]+/s", screen), screen
    piped = run("suppress", "export", "-c", str(config_file))
    assert piped.returncode == 0
    assert piped.stderr == ""
    assert len(piped.stdout.splitlines()) == 3001


# ---------------------------------------------------------------------------
# queue


def test_queue_list(config_file: Path, redis_url: str) -> None:
    empty = run("queue", "-c", str(config_file), "list")
    assert empty.returncode == 0, empty.stderr
    assert "0 message(s) in the retry queue" in empty.stdout

    async def put() -> None:
        client = redis_client.connect(redis_url, 1)
        try:
            queue = RetryQueue(client, "ocr", RetryConfig())
            await queue.put("bounce@example.com", "bob@example.org", message(), "451 4.2.0 later")
            await queue.put("bounce@example.com", "carol@example.com", message(), "451 4.2.0 x")
        finally:
            await client.aclose()

    asyncio.run(put())
    listed = run("queue", "-c", str(config_file), "list")
    assert listed.returncode == 0, listed.stderr
    assert "2 message(s) in the retry queue" in listed.stdout
    assert "rcpt=bob@example.org" in listed.stdout
    assert "rcpt=carol@example.com" in listed.stdout
    assert "attempts=0" in listed.stdout


# ---------------------------------------------------------------------------
# key generation


@pytest.mark.parametrize(("key_type", "algorithm"), [("rsa", "rsa"), ("ed25519", "ed25519")])
def test_dkim_keygen(tmp_path: Path, key_type: str, algorithm: str) -> None:
    out = tmp_path / "dkim"
    result = run(
        "dkim-keygen", "--domain", "example.com", "--selector", "s2030",
        "--type", key_type, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    path = out / "example.com.s2030.pem"
    assert path.is_file()
    assert mode(path) == 0o600
    assert str(path) in result.stdout

    [record_line] = [line for line in result.stdout.splitlines() if " IN TXT " in line]
    name, _, strings = record_line.partition(" IN TXT ")
    assert name == "s2030._domainkey.example.com."
    parts = re.findall(r'"([^"]*)"', strings)
    assert parts
    assert all(len(p) <= 255 for p in parts)
    record = "".join(parts)
    assert record.startswith(f"v=DKIM1; k={algorithm}; p=")

    key = load_key(DkimKeyConfig("example.com", "s2030", path))
    assert key.dns_record() == record

    # a message signed with the new key verifies against the printed record
    msg = Message.parse(message())
    signed = msg.replace(prepend=Signer([key]).sign(msg, [key], body_hash(msg.body))).to_bytes()

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        return record.encode() if qname == b"s2030._domainkey.example.com." else None

    assert dkim.verify(signed, dnsfunc=dnsfunc)


def test_token_keygen(tmp_path: Path) -> None:
    first, second = tmp_path / "keys" / "k1.key", tmp_path / "keys" / "k2.key"
    for path in (first, second):
        result = run("token-keygen", "--out", str(path))
        assert result.returncode == 0, result.stderr
        assert mode(path) == 0o600
        assert str(path) in result.stdout
        assert len(path.read_bytes().strip()) >= 32
    assert first.read_bytes() != second.read_bytes()

    config = parse_config(
        {
            "http": {"public_url": "https://u.example.com"},
            "tokens": {
                "keys": [
                    {"id": "k1", "secret_file": str(first)},
                    {"id": "k2", "secret_file": str(second)},
                ]
            },
        }
    )
    codec = TokenCodec(config.tokens)
    claims = codec.verify(codec.issue("jane@example.com", "newsletter"))
    assert (claims.recipient, claims.key_id) == ("jane@example.com", "k1")


# ---------------------------------------------------------------------------
# demo


def test_demo(tmp_path: Path) -> None:
    result = run("demo", "--out", str(tmp_path / "demo"), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "1. A newsletter from news@example.com" in out
    assert "2. A receipt from receipts@example.com" in out
    assert "November news" in out
    assert "Your receipt #1001" in out
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in out
    assert "-> FAIL" not in out
    assert out.count("-> pass") >= 2
    assert "Alice no longer gets the newsletter" in out
    assert (tmp_path / "demo" / "oneclick-relay.yaml").is_file()
    assert list((tmp_path / "demo" / "captured").glob("*.eml"))
