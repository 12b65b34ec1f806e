"""Command line: argument parsing and exit codes only (2 on a config error)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import TypeVar

from relay import __version__
from relay.config import load_config
from relay.config.loader import require_store
from relay.errors import ConfigError, StoreUnavailable
from relay.runtime import logs
from relay.runtime.lifecycle import StartError
from relay.runtime.loop import run_async
from relay.suppression.store import MANUAL_REASONS

T = TypeVar("T")
log = logging.getLogger("relay.cli")
EXIT_CONFIG = 2


def _setup_logging(verbose: bool) -> None:
    logs.setup("text", "debug" if verbose else "info")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oneclick-relay",
        description="SMTP relay adding RFC 8058 one-click unsubscribe, suppression and DKIM.",
    )
    p.add_argument("--version", action="version", version=f"oneclick-relay {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    config_help = "YAML file (default: $ONECLICK_RELAY_CONFIG); before or after the command"
    p.add_argument("-c", "--config", type=Path, default=None, help=config_help)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # SUPPRESS: when given only before the command, the sub-parser keeps that value.
        sp.add_argument("-c", "--config", type=Path, default=argparse.SUPPRESS, help=config_help)
        return sp

    insecure_help = "start even if key or secret files are readable by others (not advised)"
    for name, text in (
        ("serve", "run the relay (SMTP and HTTP)"),
        ("check-config", "validate the config, print the routes and every warning"),
    ):
        sp = with_config(sub.add_parser(name, help=text))
        sp.add_argument("--insecure-permissions", action="store_true", help=insecure_help)

    demo = sub.add_parser("demo", help="run a self-contained demonstration")
    demo.add_argument("--keep-running", action="store_true", help="stay up after the demo")
    demo.add_argument("--out", type=Path, help="folder for config, keys and captured mail")

    sup = with_config(sub.add_parser("suppress", help="manage the suppression list"))
    sup_sub = sup.add_subparsers(dest="action", required=True)

    def scope_flags(sp: argparse.ArgumentParser) -> None:
        scope = sp.add_mutually_exclusive_group()
        scope.add_argument("--group", help="one marketing group (default: global)")
        scope.add_argument("--sender", help="one From address")

    add = with_config(sup_sub.add_parser("add", help="suppress an address"))
    add.add_argument("address")
    scope_flags(add)
    add.add_argument("--reason", default="manual", choices=[*MANUAL_REASONS, "soft-bounce"])
    add.add_argument(
        "--expires-days",
        type=float,
        help="expire after N days (default: the reason's expiry from suppression:)",
    )
    remove = with_config(
        sup_sub.add_parser(
            "remove", help="re-subscribe: delete entries (audited); --file for many addresses"
        )
    )
    remove.add_argument("address", nargs="?")
    scope_flags(remove)
    remove.add_argument("--reason")
    remove.add_argument("--force", action="store_true", help="also remove complaint entries")
    remove.add_argument(
        "--file",
        type=Path,
        help="one address per line, or CSV with an 'address' column ('-' for stdin);"
        " complaint entries are never removed in bulk",
    )
    remove.add_argument("--dry-run", action="store_true", help="with --file: report only")
    show = with_config(sup_sub.add_parser("show", help="every entry for one address, and why"))
    show.add_argument("address")
    lst = with_config(sup_sub.add_parser("list", help="entries, streamed"))
    scope_flags(lst)
    lst.add_argument("--reason")
    lst.add_argument("--all", action="store_true", help="include expired entries")
    lst.add_argument("--limit", type=int, default=0)
    imp = with_config(
        sup_sub.add_parser("import", help="CSV with an 'address' column, or one per line")
    )
    imp.add_argument("file", type=Path, help="file to read ('-' for stdin)")
    scope_flags(imp)
    imp.add_argument("--reason", default="manual", choices=list(MANUAL_REASONS))
    imp.add_argument("--dry-run", action="store_true")
    exp = with_config(sup_sub.add_parser("export", help="CSV of live entries, streamed"))
    scope_flags(exp)
    exp.add_argument("--reason")
    exp.add_argument("--since", type=date.fromisoformat, help="created on or after YYYY-MM-DD")
    exp.add_argument("--until", type=date.fromisoformat, help="created on or before YYYY-MM-DD")
    exp.add_argument("--out", type=Path, help="file (default: stdout)")
    st = with_config(
        sup_sub.add_parser("stats", help="counts per scope and reason, unsubscribes per day")
    )
    st.add_argument("--scan", action="store_true", help="count with a full scan (slow at millions)")
    st.add_argument(
        "--reconcile",
        action="store_true",
        help="recount with a full scan and correct the kept counts (run e.g. daily)",
    )
    pat = with_config(
        sup_sub.add_parser("pattern", help="domain or address-glob patterns never mailed")
    )
    pat.add_argument("pattern_action", choices=["add", "remove", "list"])
    pat.add_argument("pattern", nargs="?")

    events = with_config(sub.add_parser("events", help="the stream of suppression changes"))
    events.add_argument("action", choices=["tail"])
    events.add_argument("--from-start", action="store_true", help="replay the whole stream")
    events.add_argument("--count", type=int, default=0, help="stop after N events")

    report = with_config(sub.add_parser("report", help="sent, bounces, complaints per day"))
    report.add_argument("--days", type=int, default=7)
    report.add_argument("--group")
    report.add_argument("--json", action="store_true")

    queue = with_config(sub.add_parser("queue", help="the retry queue"))
    queue.add_argument("action", choices=["list"])

    ingest = with_config(
        sub.add_parser("ingest", help="process one bounce, complaint or mailto unsubscribe (stdin)")
    )
    ingest.add_argument(
        "--recipient",
        action="append",
        default=[],
        help="envelope recipient, repeatable (Postfix pipe: ${recipient}); else from the headers",
    )
    inbound = with_config(sub.add_parser("inbound", help="inbound messages kept for audit"))
    inbound.add_argument("action", choices=["list", "show"])
    inbound.add_argument("id", nargs="?", help="the id 'list' prints (for 'show')")
    inbound.add_argument("--limit", type=int, default=50)
    inbound.add_argument(
        "--raw", action="store_true", help="'show': only the message, without the reading"
    )

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
    except (StoreUnavailable, StartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "serve":
        from relay.cli.audit import audit
        from relay.runtime.workers import run_workers

        config = load_config(args.config)
        require_store(config, "serve")
        logs.setup(config.log.format, "debug" if args.verbose else config.log.level)
        refusals, warnings = audit(config, insecure_permissions=args.insecure_permissions)
        for finding in warnings:
            log.warning("config warning: %s", finding)
        for finding in refusals:
            print(f"config error: {finding}", file=sys.stderr)
        if refusals:
            return EXIT_CONFIG
        return run_workers(config)
    if command == "check-config":
        from relay.cli.commands import check_config

        config = load_config(args.config)
        require_store(config, "check-config")
        return check_config(config, insecure_permissions=args.insecure_permissions)
    if command == "demo":
        from relay.cli.demo import run_demo

        return run_async(run_demo(out=args.out, keep_running=args.keep_running))
    if command in ("suppress", "queue", "events", "report", "inbound"):
        from relay.cli import commands

        return run_async(commands.run_store_command(args, load_config(args.config)))
    if command == "ingest":
        from relay.cli import commands

        config = load_config(args.config)
        data = sys.stdin.buffer.read(config.bounces.max_message_size + 1)
        return run_async(commands.ingest(config, data, args.recipient))
    if command == "dkim-keygen":
        from relay.cli.keygen import dkim_keygen

        path, record = dkim_keygen(args.domain, args.selector, args.type, args.bits, args.out)
        print(f"private key: {path} (mode 0600)")
        print("publish this DNS record:")
        print(record)
        return 0
    if command == "passwd":
        from relay.smtp.auth import set_password

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
        from relay.cli.keygen import token_keygen

        token_keygen(args.out)
        print(f"token secret written to {args.out} (mode 0600)")
        return 0
    raise AssertionError(command)
