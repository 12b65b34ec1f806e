"""What the operator commands do (``check-config``, ``suppress``, ``events``, ``queue``).

``cli.py`` parses arguments; these functions talk to the config, Redis and the
terminal, and return the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO, cast
from urllib.parse import urlsplit, urlunsplit

from relay.cli.audit import audit
from relay.cli.progress import count_lines, meter
from relay.config import Config
from relay.config import audit as config_audit
from relay.errors import StoreUnavailable
from relay.mail.dkim import Signer
from relay.outbound.retry import RetryQueue
from relay.runtime import parts
from relay.store.inbound import InboundLog
from relay.suppression.report import DailyCounters, DayRow, verdict
from relay.suppression.store import (
    DAY,
    GLOBAL,
    ProtectedEntry,
    Suppression,
    SuppressionStore,
    describe_scope,
    parse_scope,
)
from relay.suppression.transfer import (
    ExportFilter,
    export_csv,
    import_lines,
    remove_lines,
    scan_stats,
    stats,
)

EXIT_CONFIG = 2


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}"
        if parts.port:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def check_config(config: Config, *, insecure_permissions: bool = False) -> int:
    from relay.outbound.policy import Policy

    refusals, warnings = audit(config, insecure_permissions=insecure_permissions)
    if refusals:
        for finding in refusals:
            print(f"config error: {finding}", file=sys.stderr)
        return EXIT_CONFIG
    policy = Policy(config.policy)
    smtp, up, http = config.smtp, config.upstream, config.http
    print(f"config OK: {config.source}")
    if smtp.listen is not None:
        print(f"  smtp     listen {smtp.listen}, {len(smtp.allowed_networks)} allowed network(s)")
    else:
        print("  smtp     no listener (milter only)")
    print(f"  upstream {up.host}:{up.port} tls={up.tls} connections={up.connections}")
    print(f"  http     listen {http.listen}, links {http.public_url}/u/<token>")
    if config.redis.embedded:
        print(f"  redis    EMBEDDED, append-only file in {config.redis.data_dir} (single host)")
    elif config.redis.url:
        print(f"  redis    {redact_url(config.redis.url)}")
    elif config.redis.sentinel is not None:
        print(f"  redis    sentinel {config.redis.sentinel.master}")
    else:
        print("  redis    EMBEDDED, throwaway (demo only)")
    keys = config.tokens.keys
    print(f"  tokens   issue with {keys[0].id!r}, verify {len(keys)} key(s)")
    for key in config.dkim.keys:
        print(f"  dkim     d={key.domain} s={key.selector}")
    bounces = config.bounces
    if bounces.return_path_domain:
        rp = f"{bounces.local_part}+<code>@{bounces.return_path_domain}"
        print(f"  bounces  return path {rp} (VERP)")
    if bounces.listen is not None:
        t = bounces.thresholds
        print(
            f"  bounces  {bounces.protocol} listen {bounces.listen}, thresholds"
            f" hard={t.hard or 'never'} soft={t.soft or 'never'}"
            f" unknown={t.unknown or 'never'} policy={t.policy or 'never'}"
        )
    if config.unsubscribe.mailto_address:
        local, _, domain = config.unsubscribe.mailto_address.rpartition("@")
        print(f"  mailto   {local}+<code>@{domain}?subject=unsubscribe%20<token>")
    compliance = config.compliance
    if compliance.cfbl_address:
        print(f"  cfbl     CFBL-Address: {compliance.cfbl_address}; report=arf")
    if compliance.feedback_id:
        print(f"  feedback Feedback-ID: {compliance.feedback_id}")
    if config.milter.listen is not None:
        for line in postfix_milter_lines(config):
            print(line)
    print("routes (first match wins):")
    for line in policy.describe():
        print(f"  {line}")
    notice = config_audit.store_notice(config)
    if notice:
        print(f"WARNING: {notice}", file=sys.stderr)
    for finding in warnings:
        print(f"WARNING: {finding}", file=sys.stderr)
    cfbl_domain = (compliance.cfbl_address or "").rpartition("@")[2]
    signer = Signer.from_config(config.dkim) if cfbl_domain else None
    for rule in config.policy.senders:
        domain = rule.match.rpartition("@")[2]
        if rule.message_class != "marketing" or any(ch in domain for ch in "*?["):
            continue
        dkim_keys = signer.keys_for(domain) if signer is not None else []
        if dkim_keys and not any(_aligned(cfbl_domain, k.domain) for k in dkim_keys):
            print(
                f"WARNING: compliance.cfbl_address domain {cfbl_domain} is not aligned with"
                f" DKIM d={dkim_keys[0].domain} of marketing sender {rule.match!r}: RFC 9477"
                " receivers ignore its CFBL-Address",
                file=sys.stderr,
            )
    return 0


def postfix_milter_lines(config: Config) -> list[str]:
    """What a Postfix admin adds for milter mode: main.cf, and master.cf's re-injection port."""
    milter = config.milter
    listen = milter.listen
    socket = f"unix:{listen}" if isinstance(listen, Path) else f"inet:{listen}"
    up = config.upstream
    lines = [
        f"  milter   listen {socket}, multi_recipient={milter.multi_recipient}",
        "postfix main.cf (then 'postfix reload'):",
        f"  smtpd_milters = {socket}",
        "  milter_default_action = tempfail",
        "  milter_protocol = 6",
    ]
    if milter.multi_recipient == "reinject":
        lines += [
            "postfix master.cf: the re-injection listener (upstream), without milters:",
            f"  {up.host}:{up.port} inet n - n - - smtpd",
            "    -o smtpd_milters=",
            "    -o receive_override_options=no_milters",
            f"    -o mynetworks={up.host}/32",
            "    -o smtpd_relay_restrictions=permit_mynetworks,reject",
        ]
    if isinstance(listen, Path):
        lines.append(
            "  (a chrooted smtpd sees the socket relative to /var/spool/postfix;"
            " add the postfix user to the relay's group)"
        )
    return lines


def _aligned(domain: str, signing: str) -> bool:
    """Relaxed alignment without a public-suffix list: one is the other or its subdomain."""
    a, b = domain.lower().rstrip("."), signing.lower().rstrip(".")
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def _time(timestamp: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp)) if timestamp else "never"


def entry_line(e: Suppression, now: float) -> str:
    state = "live" if e.live(now) else "expired"
    return (
        f"{e.address}\t{describe_scope(e.scope)}\t{e.reason}\tcreated={_time(e.created)}"
        f"\texpires={_time(e.expires)}\tsource={e.source}\t{state}"
    )


def _scope_or_none(args: argparse.Namespace) -> str | None:
    group, sender = getattr(args, "group", None), getattr(args, "sender", None)
    return parse_scope(group, sender) if group or sender else None


@contextmanager
def _output(path: Path | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
    else:
        with path.open("w", encoding="utf-8", newline="") as f:
            yield f


async def run_store_command(args: argparse.Namespace, config: Config) -> int:
    async with parts.command_stores(config) as stores:
        if args.command == "queue":
            return await _queue_list(stores.retry)
        if args.command == "events":
            return await _events_tail(stores, args.from_start, args.count, config.redis.timeout)
        if args.command == "report":
            return await _report(stores.counters, args.days, args.group, args.json)
        if args.command == "inbound":
            return await _inbound(
                stores.inbound, config, args.action, args.id, args.limit, args.raw
            )
        return await _suppress(args, stores.store)


EX_TEMPFAIL = 75
"""sysexits.h: what an MTA's pipe delivery takes as "defer and retry"."""


async def ingest(config: Config, data: bytes, recipients: list[str]) -> int:
    """One message from an MTA's pipe: the same parts as the inbound listener."""
    from relay.metrics import Metrics

    if len(data) > config.bounces.max_message_size:
        print("error: message larger than bounces.max_message_size", file=sys.stderr)
        return 1
    try:
        async with parts.command_stores(config) as stores:
            intake = parts.handling(config, stores, Metrics()).intake
            result = await intake.process(data, recipients, "ingest")
            await stores.counters.flush()
    except StoreUnavailable as exc:
        print(f"error: {exc}; try again later", file=sys.stderr)
        return EX_TEMPFAIL
    print(f"{result.outcome} id={result.id} kind={result.kind} {result.detail}".rstrip())
    return 0


async def _inbound(
    records: InboundLog,
    config: Config,
    action: str,
    inbound_id: str | None,
    limit: int,
    raw: bool = False,
) -> int:
    if action == "show":
        if not inbound_id:
            print("error: give the id that 'inbound list' prints", file=sys.stderr)
            return 2
        data = await records.data(inbound_id)
        if data is None:
            print(f"{inbound_id}: not kept (unknown, or older than bounces.keep_days)")
            return 1
        if not raw:
            record = await records.record(inbound_id)
            print(inbound_reading(config, data, record.outcome if record else ""))
            sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    for r in await records.recent(limit):
        text = [v or "-" for v in (r.source, r.kind, r.outcome)]
        print("\t".join([r.id, _time(int(r.received)), *text]))
    return 0


def inbound_reading(config: Config, data: bytes, outcome: str) -> str:
    """What ``inbound show`` prints above the message: per recipient the reason, the
    evidence (which field or phrase decided) and the decision taken, for an audit."""
    from relay.feedback.bounces import Classifier, parse, readings
    from relay.feedback.intake import Addresses
    from relay.mail.address import normalize_address
    from relay.mail.verp import Verp

    report = parse(data)
    addresses = Addresses(config, Verp.from_config(config))
    taken: dict[str, str] = {}
    for item in outcome.split()[1:]:
        parts = item.split(":")
        if len(parts) >= 5:
            taken[parts[0]] = parts[-1]
    lines = [
        f"# kind: {report.kind} (read by {report.detector or '-'})",
        f"# outcome: {outcome or '-'}",
    ]

    def own(address: str) -> bool:
        return addresses.role(address) is not None

    for r in readings(report, Classifier.from_config(config.bounces), own):
        decision = taken.get(normalize_address(r.recipient), "none (not attributed)")
        if r.verdict in ("complaint", "ignored"):
            decision = outcome.partition(" ")[0] or "-"
        lines.append(
            f"# recipient {r.recipient}: reason={r.reason} kind={r.verdict}"
            f" status={r.status or '-'} decision={decision}"
        )
        lines.append(f"#   evidence: {r.evidence}")
    return "\n".join(lines) + "\n#"


async def _suppress(args: argparse.Namespace, store: SuppressionStore) -> int:
    action: str = args.action
    now = time.time()
    if action == "add":
        return await _add(args, store, now)
    if action == "remove" and (args.file is not None or args.address is None):
        return await _remove_file(args, store)
    if action == "remove":
        try:
            removed = await store.remove(
                args.address, _scope_or_none(args), args.reason, source="cli", force=args.force
            )
        except ProtectedEntry as exc:
            print(f"refused: {exc} (use --force; the removal is logged)", file=sys.stderr)
            return 1
        for e in removed:
            print(f"removed: {e.address} {describe_scope(e.scope)} {e.reason}")
        if not removed:
            print(f"{args.address}: nothing to remove")
        return 0 if removed else 1
    if action == "show":
        entries = await store.entries(args.address)
        pattern = await store.pattern_match(args.address)
        if not entries and pattern is None:
            print(f"{args.address}: not suppressed")
        for e in entries:
            print(entry_line(e, now))
        if pattern is not None:
            print(f"{args.address}\tglobal\tpattern\tmatches {pattern!r} (marketing mail)")
        return 0
    if action == "list":
        return await _list(args, store, now)
    if action == "import":
        return await _import(args, store)
    if action == "export":
        filters = ExportFilter(args.group, args.sender, args.reason, args.since, args.until)
        # Progress only when the CSV goes to a file: on a terminal the rows are the progress.
        with _output(args.out) as out, meter("exported", None, quiet=args.out is None) as m:
            async for chunk in export_csv(store, filters):
                out.write(chunk)
                m.advance(chunk.count("\n"))
        return 0
    if action == "stats":
        if args.reconcile:
            await store.reconcile()
        result = await (scan_stats(store) if args.scan else stats(store))
        if result.scanned:
            print(f"addresses suppressed: {result.addresses} (expired entries: {result.expired})")
        else:
            when = _time(int(result.reconciled)) if result.reconciled else "never"
            print(f"live entries: {result.entries} (kept counts; last reconcile: {when})")
            if result.addresses is not None:
                print(f"addresses suppressed at the last reconcile: {result.addresses}")
        print(f"patterns: {result.patterns}")
        for (kind, reason), n in sorted(result.by_scope_reason.items()):
            print(f"  {kind:<8} {reason:<12} {n}")
        print("unsubscribes per day (last 30 days):")
        for day, n in sorted(result.unsubscribes_per_day.items()):
            print(f"  {day} {n}")
        return 0
    return await _pattern(args, store)


async def _add(args: argparse.Namespace, store: SuppressionStore, now: float) -> int:
    """One entry; without ``--expires-days`` the reason's expiry from ``suppression:``."""
    scope = parse_scope(args.group, args.sender)
    if args.reason == "soft-bounce" and (scope != GLOBAL or args.expires_days is not None):
        print(
            "error: soft bounces are global, with the graduated expiry of"
            " suppression.soft_bounce_days: drop --group/--sender/--expires-days",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if args.expires_days is not None and args.expires_days <= 0:
        print("error: --expires-days must be a positive number of days", file=sys.stderr)
        return EXIT_CONFIG
    if args.expires_days is None:
        new = await store.add(args.address, scope, args.reason, source="cli")
    else:
        ttl = args.expires_days * DAY
        new = await store.add(args.address, scope, args.reason, source="cli", ttl=ttl)
    print(f"{'added' if new else 'already present'}: {args.address} {describe_scope(scope)}")
    for e in await store.entries(args.address):
        if e.scope == scope and e.reason == args.reason:
            print(entry_line(e, now))
    return 0


async def _list(args: argparse.Namespace, store: SuppressionStore, now: float) -> int:
    filters = ExportFilter(args.group, args.sender, args.reason, live_only=not args.all)
    count = 0
    async for e in store.scan():
        if filters.accepts(e, now):
            print(entry_line(e, now))
            count += 1
            if args.limit and count >= args.limit:
                break
    return 0


async def _remove_file(args: argparse.Namespace, store: SuppressionStore) -> int:
    """``suppress remove --file``: a per-line report; exit 3 when a line was not usable."""
    if args.file is None or args.address is not None or args.reason or args.force:
        print(
            "error: give either an address (with --reason/--force if needed) or --file FILE",
            file=sys.stderr,
        )
        return 2
    scope = _scope_or_none(args)
    try:
        if str(args.file) == "-":
            report = await remove_lines(
                store, sys.stdin, scope=scope, source="cli-file", dry_run=args.dry_run
            )
        else:
            with args.file.open(encoding="utf-8-sig") as f:
                report = await remove_lines(
                    store, f, scope=scope, source="cli-file", dry_run=args.dry_run
                )
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 1
    verb = "would remove" if args.dry_run else "removed"
    for r in report.lines:
        outcome = verb if r.outcome == "removed" else r.outcome
        print(f"line {r.line}: {r.address}: {outcome}{': ' + r.detail if r.detail else ''}")
    print(
        f"{verb}: {report.count('removed')}, not suppressed: {report.count('not-suppressed')},"
        f" protected: {report.count('protected')}, duplicates: {report.count('duplicate')},"
        f" invalid: {report.count('invalid')}"
    )
    return 3 if report.count("invalid") else 0


async def _import(args: argparse.Namespace, store: SuppressionStore) -> int:
    scope = _scope_or_none(args) or GLOBAL
    what = "checked" if args.dry_run else "imported"
    if str(args.file) == "-":
        lines: TextIO = sys.stdin
        with meter(f"lines {what}", None) as m:
            report = await import_lines(
                store,
                m.lines(lines),
                scope=scope,
                reason=args.reason,
                source="import",
                dry_run=args.dry_run,
            )
    else:
        try:
            total = count_lines(args.file) if sys.stderr.isatty() else None
            with args.file.open(encoding="utf-8-sig") as f, meter(f"lines {what}", total) as m:
                report = await import_lines(
                    store,
                    m.lines(f),
                    scope=scope,
                    reason=args.reason,
                    source="import",
                    dry_run=args.dry_run,
                )
        except (OSError, UnicodeDecodeError) as exc:
            print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
            return 1
    verb = "would add" if args.dry_run else "added"
    invalid = len(report.invalid)
    print(f"{verb}: {report.accepted}, duplicates: {report.duplicates}, invalid: {invalid}")
    for number, text, error in report.invalid:
        print(f"  line {number}: {text!r}: {error}")
    return 0 if not report.invalid else 3


async def _pattern(args: argparse.Namespace, store: SuppressionStore) -> int:
    if args.pattern_action == "list":
        for p in store.policy.patterns:
            print(f"{p}\t(config)")
        for p in await store.patterns():
            print(f"{p}\t(redis)")
        return 0
    if not args.pattern:
        print("error: give a pattern, e.g. mailinator.com or 'noreply@*'", file=sys.stderr)
        return 2
    if args.pattern_action == "add":
        new = await store.add_pattern(args.pattern, source="cli")
        print(f"{'added' if new else 'already present'}: {args.pattern}")
        return 0
    gone = await store.remove_pattern(args.pattern, source="cli")
    print(f"{'removed' if gone else 'not present'}: {args.pattern}")
    return 0 if gone else 1


async def _events_tail(stores: parts.Stores, from_start: bool, count: int, timeout: float) -> int:
    """Print stream entries as they arrive (``XREAD BLOCK``), one line each."""
    redis, key = stores.redis, stores.store.events_key
    last = "0-0" if from_start else "$"
    seen = 0
    # Block for less than the socket timeout (redis.timeout), or every wait is an error.
    block_ms = max(50, int(timeout * 500))
    while True:
        try:
            reply = await redis.xread({key: last}, block=block_ms, count=100)
        except asyncio.CancelledError:
            return 0
        for _, messages in cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], reply):
            for event_id, fields in messages:
                last = event_id.decode()
                text = " ".join(f"{k.decode()}={v.decode()}" for k, v in fields.items())
                print(f"{last} {text}", flush=True)
                seen += 1
                if count and seen >= count:
                    return 0


async def _report(counters: DailyCounters, days: int, group: str | None, as_json: bool) -> int:
    rows = [r for r in await counters.report(days) if group is None or r.group == group]
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    print(
        f"{'day':<11} {'group':<16} {'sent':>8} {'hard':>6} {'soft':>6} {'unkn.':>6}"
        f" {'policy':>6} {'compl.':>6} {'unsub':>6} {'nolink':>6} {'complaint rate':>15}"
    )
    for r in _with_day_totals(rows) if group is None else rows:
        c = r.counts
        print(
            f"{r.day:<11} {r.group:<16} {c.get('sent', 0):>8} {c.get('hard-bounce', 0):>6}"
            f" {c.get('soft-bounce', 0):>6} {c.get('unknown-bounce', 0):>6}"
            f" {c.get('policy-bounce', 0):>6} {c.get('complaint', 0):>6}"
            f" {c.get('unsubscribe', 0):>6} {c.get('no-body-link', 0):>6}"
            f" {r.complaint_rate:>14.3%} {verdict(r.complaint_rate)}"
        )
    if not rows:
        print(f"no mail counted in the last {days} day(s)")
    return 0


def _with_day_totals(rows: list[DayRow]) -> list[DayRow]:
    """Each day's groups, then an ``(all)`` row: Gmail judges the whole domain's rate."""
    out: list[DayRow] = []
    for day in dict.fromkeys(r.day for r in rows):
        group_rows = [r for r in rows if r.day == day]
        out.extend(group_rows)
        if len(group_rows) > 1:
            total: Counter[str] = Counter()
            for r in group_rows:
                total.update(r.counts)
            out.append(DayRow(day, "(all)", dict(total)))
    return out


async def _queue_list(retry: RetryQueue) -> int:
    items = await retry.list()
    print(f"{len(items)} message(s) in the retry queue")
    for item in items:
        print(
            f"{item.id}\trcpt={item.rcpt}\tfrom={item.mail_from}\tattempts={item.attempts}"
            f"\tnext={_time(int(item.due))}\tlast={item.reply}"
        )
    return 0
