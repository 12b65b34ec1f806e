"""Command line: argument parsing and exit codes only (2 on a config error)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from relay import __version__
from relay.config import Config, load_config
from relay.errors import ConfigError, StoreUnavailable

T = TypeVar("T")
EXIT_CONFIG = 2


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed, else the standard loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("mail.log", "aiosmtpd", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oneclick-relay",
        description="SMTP relay adding RFC 8058 one-click unsubscribe, suppression and DKIM.",
    )
    p.add_argument("--version", action="version", version=f"oneclick-relay {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "-c", "--config", type=Path, help="YAML file (default: $ONECLICK_RELAY_CONFIG)"
        )
        return sp

    with_config(sub.add_parser("serve", help="run the relay (SMTP and HTTP)"))
    with_config(sub.add_parser("check-config", help="validate the config and print the routes"))

    demo = sub.add_parser("demo", help="run a self-contained demonstration")
    demo.add_argument("--keep-running", action="store_true", help="stay up after the demo")
    demo.add_argument("--out", type=Path, help="folder for config, keys and captured mail")

    sup = with_config(sub.add_parser("suppress", help="manage the suppression list"))
    sup_sub = sup.add_subparsers(dest="action", required=True)
    for name in ("add", "remove"):
        sp = sup_sub.add_parser(name)
        sp.add_argument("address")
        scope = sp.add_mutually_exclusive_group()
        scope.add_argument("--group", help="one marketing group (default: global)")
        scope.add_argument("--sender", help="one From address")
        sp.add_argument("--reason", default="manual" if name == "add" else None)
        if name == "add":
            sp.add_argument("--expires-days", type=float, help="expire after N days")
    show = sup_sub.add_parser("show", help="every entry for one address")
    show.add_argument("address")
    lst = sup_sub.add_parser("list", help="every entry (streamed)")
    lst.add_argument("--limit", type=int, default=0)

    queue = with_config(sub.add_parser("queue", help="the retry queue"))
    queue.add_argument("action", choices=["list"])

    keygen = sub.add_parser("dkim-keygen", help="write a DKIM private key, print its DNS record")
    keygen.add_argument("--domain", required=True)
    keygen.add_argument("--selector", required=True)
    keygen.add_argument("--type", choices=["rsa", "ed25519"], default="rsa")
    keygen.add_argument("--bits", type=int, default=2048, choices=[1024, 2048, 3072, 4096])
    keygen.add_argument("--out", type=Path, required=True)

    tk = sub.add_parser("token-keygen", help="write a random token secret file (mode 0600)")
    tk.add_argument("--out", type=Path, required=True)

    pw = sub.add_parser("passwd", help="add or change an SMTP AUTH user (password on stdin)")
    pw.add_argument("users_file", type=Path)
    pw.add_argument("username")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "serve":
        from relay.workers import run_workers

        return run_workers(load_config(args.config))
    if command == "check-config":
        return check_config(load_config(args.config))
    if command == "demo":
        from relay.demo import run_demo

        return run_async(run_demo(out=args.out, keep_running=args.keep_running))
    if command == "suppress":
        return run_async(_suppress(args, load_config(args.config)))
    if command == "queue":
        return run_async(_queue_list(load_config(args.config)))
    if command == "dkim-keygen":
        from relay.keygen import dkim_keygen

        path, record = dkim_keygen(args.domain, args.selector, args.type, args.bits, args.out)
        print(f"private key: {path} (mode 0600)")
        print("publish this DNS record:")
        print(record)
        return 0
    if command == "passwd":
        from relay.auth import set_password

        if sys.stdin.isatty():
            import getpass

            password = getpass.getpass(f"password for {args.username}: ")
        else:
            password = sys.stdin.readline().rstrip("\r\n")
        if len(password) < 8:
            print("error: the password must have at least 8 characters", file=sys.stderr)
            return 1
        set_password(args.users_file, args.username, password)
        print(f"{args.username} written to {args.users_file}")
        return 0
    if command == "token-keygen":
        from relay.keygen import token_keygen

        token_keygen(args.out)
        print(f"token secret written to {args.out} (mode 0600)")
        return 0
    raise AssertionError(command)


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}"
        if parts.port:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def check_config(config: Config) -> int:
    from relay.policy import Policy
    from relay.signing import Signer

    signer = Signer.from_config(config.dkim)
    policy = Policy(config.policy)
    print(f"config OK: {config.source}")
    print(f"  smtp   listen {config.smtp.listen}, allowed {len(config.smtp.allowed_networks)} nets")
    print(f"  upstream {config.upstream.host}:{config.upstream.port} tls={config.upstream.tls}")
    print(f"  http   listen {config.http.listen}, public {config.http.public_url}/u/<token>")
    redis = redact_url(config.redis.url) if config.redis.url else "embedded (no redis.url)"
    print(f"  redis  {redis}")
    print(
        f"  tokens issue with {config.tokens.keys[0].id!r}, verify {len(config.tokens.keys)} key(s)"
    )
    for key in config.dkim.keys:
        print(f"  dkim   d={key.domain} s={key.selector}")
    print("routes (first match wins):")
    for line in policy.describe():
        print(f"  {line}")
    warnings = 0
    for rule in config.policy.senders:
        if rule.message_class != "marketing":
            continue
        domain = rule.match.rpartition("@")[2]
        if any(ch in domain for ch in "*?["):
            continue
        if not signer.keys_for(domain):
            warnings += 1
            print(
                f"WARNING: marketing sender {rule.match!r} has no DKIM key for {domain}:"
                " mailbox providers will not offer one-click unsubscribe",
                file=sys.stderr,
            )
    return 0


async def _suppress(args: argparse.Namespace, config: Config) -> int:
    from relay import redis_client
    from relay.suppression import SuppressionStore, describe_scope, parse_scope

    if not config.redis.url:
        raise ConfigError("redis.url", "the CLI needs a shared Redis (the embedded one is private)")
    redis = redis_client.connect(config.redis.url, config.redis.timeout)
    store = SuppressionStore(redis, config.redis.key_prefix)
    now = time.time()
    try:
        if args.action == "add":
            scope_add = parse_scope(args.group, args.sender)
            ttl = args.expires_days * 86400 if args.expires_days else None
            new = await store.add(args.address, scope_add, args.reason, source="cli", ttl=ttl)
            print(
                ("added" if new else "already present")
                + f": {args.address} {describe_scope(scope_add)}"
            )
        elif args.action == "remove":
            scope: str | None = (
                parse_scope(args.group, args.sender) if args.group or args.sender else None
            )
            removed = await store.remove(args.address, scope, args.reason, source="cli")
            print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}")
            return 0 if removed else 1
        elif args.action == "show":
            entries = await store.entries(args.address)
            if not entries:
                print(f"{args.address}: not suppressed")
            for e in entries:
                print(_entry_line(e, now))
        else:
            count = 0
            async for e in store.scan():
                print(_entry_line(e, now))
                count += 1
                if args.limit and count >= args.limit:
                    break
    finally:
        await redis.aclose()
    return 0


def _entry_line(e: Any, now: float) -> str:
    from relay.suppression import describe_scope

    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.created))
    expires = (
        "never" if not e.expires else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.expires))
    )
    state = "live" if e.live(now) else "expired"
    return (
        f"{e.address}\t{describe_scope(e.scope)}\t{e.reason}\tcreated={created}"
        f"\texpires={expires}\tsource={e.source}\t{state}"
    )


async def _queue_list(config: Config) -> int:
    from relay import redis_client
    from relay.retryqueue import RetryQueue

    if not config.redis.url:
        raise ConfigError("redis.url", "the CLI needs a shared Redis (the embedded one is private)")
    redis = redis_client.connect(config.redis.url, config.redis.timeout)
    try:
        items = await RetryQueue(redis, config.redis.key_prefix, config.retry).list()
    finally:
        await redis.aclose()
    print(f"{len(items)} message(s) in the retry queue")
    for item in items:
        due = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(item.due))
        print(
            f"{item.id}\trcpt={item.rcpt}\tfrom={item.mail_from}\tattempts={item.attempts}"
            f"\tnext={due}\tlast={item.reply}"
        )
    return 0
