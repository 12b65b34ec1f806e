"""The steps for one message, in order: check → modify → sign → deliver.

::

    parse header block ─ From ─ classify ─ suppression lookup      (once per message)
        ─ Received / Date / Message-ID, strip the application's List-* (once)
        ─ body hash                                                 (once)
        ─ per copy: token → List-Unsubscribe headers → DKIM sign    (marketing: per recipient)
        ─ deliver over the pool ─ one reply for the client

Signing is always the last change to a copy. The client gets ``250`` only when
the upstream accepted (or, after a partial success, when the deferred copies are
safely in the Redis retry queue); otherwise a 4xx it can retry or the upstream's
5xx. Every outcome is one log line and counted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import Histogram

from relay.config import Config
from relay.errors import PermFail, SmtpError, SmtpReply, StoreUnavailable, TempFail
from relay.eventlog import EventLog
from relay.feedback.bounces import Classifier
from relay.feedback.record import Attribution, Feedback
from relay.mail import headers
from relay.mail.address import domain_of
from relay.mail.body import BodyLinks, Footer, has_https_link
from relay.mail.dkim import DkimKey, Signer, body_hash
from relay.mail.message import Header, Message, from_address
from relay.mail.tokens import TokenCodec
from relay.mail.verp import Verp
from relay.metrics import Metrics
from relay.model import Envelope, Route
from relay.outbound.policy import Policy
from relay.outbound.retry import RetryCopy, RetryQueue
from relay.outbound.upstream import NO_SMTPUTF8, Outbound, Upstream
from relay.suppression.mailto import MailtoCodes
from relay.suppression.report import DailyCounters
from relay.suppression.store import Lookup, SuppressionStore

log = EventLog(__name__)


@dataclass(slots=True)
class _Copy:
    """One copy as its own header block (signature, personal fields, blank line); the
    body is the message's, shared by every copy and never copied per recipient."""

    recipients: tuple[str, ...]
    headers: tuple[Header, ...]
    """The copy's header block as sent: signatures first."""
    body: bytes
    mail_from: str
    failed: SmtpReply | None = None
    """Set when the copy could not be built: its recipients get this reply, nothing is sent."""

    @property
    def head(self) -> bytes:
        """The header block as bytes, with the blank line: ``head + body`` is what is sent."""
        return b"".join(h.raw for h in self.headers) + b"\r\n"

    @property
    def data(self) -> bytes:
        return self.head + self.body


BUILD_FAILED = SmtpReply(451, "4.3.0", "internal error building this copy, try again later")
NOT_QUEUED = SmtpReply(
    550, "5.3.0", "deferred by the upstream and the retry queue is unavailable: not sent"
)
"""After other copies were accepted, a deferred copy that cannot be kept is refused:
a 4xx for the whole message would make the client resend the accepted copies."""
INTERNAL = SmtpReply(451, "4.3.0", "internal error, try again later")


@dataclass(slots=True)
class _Prepared:
    route: Route
    lookup: Lookup
    copies: Iterator[_Copy]
    original: tuple[Header, ...]


@dataclass(frozen=True, slots=True)
class InPlace:
    """What the MTA does with the message it holds (milter mode).

    On success the MTA delivers to ``keep`` only (every other envelope recipient
    was suppressed or re-injected) with ``headers`` as the copy's header block,
    and ``mail_from`` as its envelope sender; ``discard``: nothing is left to send.
    Any other reply is the client's answer (tempfail or reject).
    """

    reply: SmtpReply
    keep: tuple[str, ...] = ()
    headers: tuple[Header, ...] = ()
    mail_from: str = ""
    discard: bool = False
    original: tuple[Header, ...] = ()
    """The header block as the MTA handed it over, parsed once: what ``headers`` replaces."""


@dataclass(frozen=True, slots=True)
class _Personal:
    """Per-recipient parts of a marketing copy, prepared once per message."""

    codes: dict[str, str] = field(default_factory=dict)
    """Each recipient's mailto code (``relay.mail.mailto``); empty without mailto."""
    links: BodyLinks | None = None
    """The body with slots for the recipient's URL; None: the body is shared."""


@dataclass(slots=True)
class Trace:
    """What the per-message log line says."""

    queue_id: str
    message_id: str = "-"
    sender: str = "-"
    route: Route | None = None
    kept: int = 0
    suppressed: int = 0
    signed: str = "-"
    replies: dict[str, SmtpReply] = field(default_factory=dict)
    queued: int = 0


class _Timed:
    """Time one block into a histogram: a plain context manager, cheaper than a generator."""

    __slots__ = ("_histogram", "_started")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        self._histogram.observe(time.perf_counter() - self._started)


class Pipeline:
    def __init__(
        self,
        *,
        config: Config,
        policy: Policy,
        store: SuppressionStore,
        tokens: TokenCodec,
        signer: Signer,
        upstream: Upstream,
        retry: RetryQueue,
        metrics: Metrics,
        counters: DailyCounters,
        clock: Callable[[], float] = time.time,
        verp: Verp | None = None,
        feedback: Feedback | None = None,
        mailto: MailtoCodes | None = None,
    ) -> None:
        """``verp``: per-copy return paths; ``feedback``: judge the upstream's refusals;
        ``mailto``: the codes in the mailto unsubscribe address."""
        self._verp = verp
        self._mailto = mailto
        self._feedback = feedback
        self._classifier = Classifier.from_config(config.bounces)
        self._config = config
        self._policy = policy
        self._store = store
        self._tokens = tokens
        self._signer = signer
        self._upstream = upstream
        self._retry = retry
        self._metrics = metrics
        self._counters = counters
        self._clock = clock
        self._stages: dict[str, Histogram] = {}

    async def handle(self, envelope: Envelope) -> SmtpReply:
        started = time.perf_counter()
        trace = Trace(queue_id=uuid.uuid4().hex[:12].upper())
        try:
            reply = await self._run(envelope, trace)
        except SmtpError as exc:
            reply = exc.reply
        except Exception:  # a bug must not turn accepted copies into a 4xx (resent twice)
            log.exception("pipeline error", id=trace.queue_id)
            reply = self._after_error(trace)
        self._record(envelope, trace, reply, (time.perf_counter() - started) * 1000)
        return reply

    def _after_error(self, trace: Trace) -> SmtpReply:
        """The reply after an unexpected error: 451 only if no copy was accepted yet."""
        accepted = sum(1 for r in trace.replies.values() if r.is_success)
        if not accepted:
            return INTERNAL
        for rcpt, reply in trace.replies.items():
            if not reply.is_success:
                log.error("recipient not confirmed", id=trace.queue_id, rcpt=rcpt, reply=reply)
        return SmtpReply(
            250,
            "2.0.0",
            f"Ok: delivered {accepted}, {len(trace.replies) - accepted} not confirmed"
            f" (internal error) id={trace.queue_id}",
        )

    def refusal(self, address: str) -> SmtpReply | None:
        """An envelope address the upstream is known not to take (UTF-8 without SMTPUTF8).

        Lets the front end refuse it at MAIL/RCPT; until the upstream's capabilities are
        known, the same refusal comes per recipient from the delivery.
        """
        if not address.isascii() and self._upstream.smtputf8 is False:
            return NO_SMTPUTF8
        return None

    def _stage(self, name: str) -> _Timed:
        """Time a block into the stage histogram (``oneclick_stage_seconds``)."""
        histogram = self._stages.get(name)
        if histogram is None:
            histogram = self._stages[name] = self._metrics.stage.labels(name)
        return _Timed(histogram)

    async def _run(self, envelope: Envelope, trace: Trace) -> SmtpReply:
        prepared = await self._prepare(envelope, trace, received=True, split_shared=True)
        if prepared is None:
            return self._all_suppressed(trace)
        with self._stage("upstream"):
            trace.replies, deferred = await self._deliver(prepared.copies, trace.kept)
        with self._stage("bounces"):
            await self._judge(trace, prepared.lookup, prepared.route)
        return await self._answer(envelope, deferred, trace)

    async def handle_in_place(
        self, envelope: Envelope, queue_id: str = "", *, reinject: bool = True
    ) -> InPlace:
        """Milter mode: the MTA keeps the message; answer how its copy changes.

        Runs the same check → modify → sign steps as ``handle`` but delivers only what
        the MTA cannot: the MTA's own copy goes to the first kept recipient (marketing)
        or to all of them (transactional, never split); every other marketing
        recipient's personalised copy is re-injected through ``upstream`` now. If any
        re-injection fails the whole message is tempfailed, so the client retries and
        nothing is acknowledged that was not handed on. The MTA adds its own Received.
        ``reinject=False``: a marketing message for several recipients is tempfailed
        instead (the front end asked the client for one recipient per transaction).
        """
        started = time.perf_counter()
        trace = Trace(queue_id=queue_id or uuid.uuid4().hex[:12].upper())
        try:
            result = await self._in_place(envelope, trace, reinject)
        except SmtpError as exc:
            result = InPlace(exc.reply)
        self._record(envelope, trace, result.reply, (time.perf_counter() - started) * 1000)
        return result

    async def _in_place(self, envelope: Envelope, trace: Trace, reinject: bool) -> InPlace:
        prepared = await self._prepare(envelope, trace, received=False, split_shared=False)
        if prepared is None:
            return InPlace(self._all_suppressed(trace), discard=True)
        copies = iter(prepared.copies)
        own = next(copies)
        if own.failed is not None:
            raise SmtpError(own.failed.code, own.failed.enhanced, own.failed.text)
        others = trace.kept - len(own.recipients)
        if others and not reinject:
            raise TempFail(
                "4.5.3", "marketing mail is sent one recipient per transaction; send them apart"
            )
        replies: dict[str, SmtpReply] = {}
        if others:
            with self._stage("upstream"):
                replies, _ = await self._deliver(copies, others)
            failed = [r for r, reply in replies.items() if not reply.is_success]
            if failed:
                accepted = len(replies) - len(failed)
                log.warning(
                    "re-injection failed",
                    id=trace.queue_id,
                    failed=len(failed),
                    accepted=accepted,
                    first=str(replies[failed[0]]),
                    effect="message tempfailed; accepted copies are sent again on the retry",
                )
                raise TempFail(
                    "4.4.0",
                    f"re-injection of {len(failed)} of {others} personalised copies failed,"
                    " try again later",
                )
        mine = SmtpReply(250, "2.0.0", "kept in the MTA's transaction")
        trace.replies = {**dict.fromkeys(own.recipients, mine), **replies}
        with self._stage("bounces"):
            await self._judge(trace, prepared.lookup, prepared.route)
        parts = [f"in place {len(own.recipients)}"]
        if others:
            parts.append(f"re-injected {others}")
        if trace.suppressed:
            parts.append(f"suppressed {trace.suppressed}")
        reply = SmtpReply(250, "2.0.0", f"Ok: {', '.join(parts)} id={trace.queue_id}")
        return InPlace(reply, own.recipients, own.headers, own.mail_from, False, prepared.original)

    def is_marketing_sender(self, address: str) -> bool:
        """What the policy says of an address before the header is seen (milter RCPT)."""
        return self._policy.classify(address).is_marketing

    def _all_suppressed(self, trace: Trace) -> SmtpReply:
        return SmtpReply(
            250,
            "2.0.0",
            f"Ok: nothing sent, all {trace.suppressed} recipient(s) suppressed id={trace.queue_id}",
        )

    async def _prepare(
        self, envelope: Envelope, trace: Trace, *, received: bool, split_shared: bool
    ) -> _Prepared | None:
        """Check → modify → sign, nothing delivered; None when every recipient is suppressed.

        ``received``: prepend our own trace field (an MTA running us as a milter adds
        its own). ``split_shared``: with VERP, send a shared copy once per recipient.
        """
        with self._stage("parse"):
            message = Message.parse(envelope.data)
            if not message.headers and envelope.mail_from:
                # no header block at all: like Postfix's cleanup, From is the envelope sender
                from_field = Header.build("From", f"<{envelope.mail_from}>")
                message = message.replace(prepend=[from_field])
            sender = from_address(message)
            trace.sender = sender
            route = self._policy.classify(sender)
            trace.route = route

        with self._stage("suppression"):
            lookup = await self._lookup(envelope.rcpt_tos, route)
            blocked = lookup.blocked
        kept = tuple(r for r in envelope.rcpt_tos if r not in blocked)
        trace.kept, trace.suppressed = len(kept), len(blocked)
        for rcpt, entry in blocked.items():
            self._metrics.dropped.labels(entry.reason).inc()
            log.info(
                "suppressed",
                id=trace.queue_id,
                rcpt=rcpt,
                scope=entry.scope,
                reason=entry.reason,
            )
        if not kept:
            return None

        with self._stage("modify"):
            base = self._modify(message, envelope, route, trace.queue_id, received)
            ids = base.get_all("Message-ID")
            trace.message_id = ids[0].value if ids else "-"
            keys = self._signer.keys_for(domain_of(sender))
            if not keys:
                self._metrics.unsigned.labels(route.message_class).inc()
                if route.is_marketing and self._config.dkim.require_for_marketing:
                    raise TempFail(
                        "4.7.5", f"no DKIM key for {domain_of(sender)}; marketing mail not sent"
                    )
            trace.signed = ",".join(f"{k.selector}/{k.algorithm}" for k in keys) or "unsigned"
            bh = body_hash(base.body) if keys else b""
            # milter mode: the MTA keeps its own body for the kept copy, so no body rewrite
            personal = await self._personal(base, kept, route, trace.queue_id, split_shared)
            copies = self._copies(
                base,
                kept,
                route,
                keys,
                bh,
                envelope.mail_from,
                trace.queue_id,
                split_shared,
                personal,
            )
        return _Prepared(route, lookup, copies, message.headers)

    async def _lookup(self, rcpts: tuple[str, ...], route: Route) -> Lookup:
        try:
            return await self._store.lookup(rcpts, route)
        except StoreUnavailable as exc:
            action = self._config.redis.on_error.for_class(route.message_class)
            self._metrics.redis_errors.labels(action).inc()
            log.warning("suppression lookup failed", error=exc, action=action)
            if action == "tempfail":
                raise TempFail("4.3.0", "suppression list unavailable, try again later") from None
            return Lookup({}, {})

    def _return_path(self, mail_from: str, rcpt: str, group: str | None, queue_id: str) -> str:
        """The copy's envelope sender: a VERP address, unless off or a null reverse path."""
        if self._verp is None or not mail_from:
            return mail_from
        return self._verp.address(rcpt, group, queue_id, self._clock())

    async def _judge(self, trace: Trace, lookup: Lookup, route: Route) -> None:
        """Successes end failure streaks; the upstream's RCPT refusals are classified.

        A permanent refusal is a final failure, counted like a bounce; a temporary one
        is only counted as a deferral (the message lives on in the client or the retry
        queue, whose expiry is the final failure).
        """
        delivered = {
            r: s
            for r, s in lookup.streaks.items()
            if r in trace.replies and trace.replies[r].is_success
        }
        group = route.group or "-"
        try:
            await self._store.note_delivered(delivered, trace.queue_id[:4])
            for rcpt, reply in trace.replies.items():
                if reply.stage != "rcpt" or reply.is_success:
                    continue
                kind = self._classifier.kind(reply.enhanced, reply.text)
                if reply.is_temporary:
                    self._metrics.deferrals.labels(kind).inc()
                elif self._feedback is not None:
                    who = Attribution(rcpt, group, self._clock(), trace.queue_id[:4], "relay")
                    why = self._classifier.classify(reply.enhanced, reply.text)
                    await self._feedback.failure(
                        who, why.kind, reply.enhanced, "relay", reply.text, why.reason, why.evidence
                    )
        except StoreUnavailable as exc:
            log.warning("bounce bookkeeping skipped", id=trace.queue_id, error=exc)

    def _modify(
        self, message: Message, envelope: Envelope, route: Route, queue_id: str, received: bool
    ) -> Message:
        """Changes shared by every copy: trace, missing defaults, no stale List-* fields."""
        hostname = self._config.smtp.hostname
        now = self._clock()
        remove: tuple[str, ...] = ()
        if route.is_marketing:
            remove = (
                (*headers.LIST_HEADERS, "list-id") if not self._keeps_app(message, route) else ()
            )
            remove += headers.compliance_names(self._config.compliance)
        return message.replace(
            remove=remove,
            prepend=(
                [headers.received(envelope.helo, envelope.client, hostname, queue_id, now)]
                if received
                else []
            ),
            append=headers.missing_defaults(message, hostname, now),
        )

    async def _personal(
        self,
        base: Message,
        rcpts: tuple[str, ...],
        route: Route,
        queue_id: str,
        rewrite_body: bool = True,
    ) -> _Personal:
        """What differs per marketing recipient beyond the token: mailto code, body link."""
        if not route.is_marketing:
            return _Personal()
        keeps_app = self._keeps_app(base, route)
        links = None if keeps_app else self._body_links(base)
        if links is None:
            self._lint_body_link(base, route)
        if keeps_app:
            return _Personal()
        codes = await self._mailto_codes(base, rcpts, route, queue_id)
        return _Personal(codes, links if rewrite_body else None)

    def _lint_body_link(self, base: Message, route: Route) -> None:
        """A marketing message with neither the placeholder nor any https link in its body
        is counted, and refused with ``compliance.require_body_link``."""
        if has_https_link(base.header_bytes(), base.body):
            return
        self._metrics.compliance.labels("no-body-link").inc()
        self._counters.add("no-body-link", route.group or self._policy.config.default_group)
        if self._config.compliance.require_body_link:
            placeholder = self._config.unsubscribe.placeholder
            raise PermFail(
                "5.7.0",
                f"marketing mail needs a visible unsubscribe link: put {placeholder} in its"
                " text and HTML parts (the relay puts each recipient's link there), or set"
                " unsubscribe.footer: true",
            )

    def _body_links(self, base: Message) -> BodyLinks | None:
        """The body as a template when it has the placeholder (or a footer is wanted)."""
        unsub = self._config.unsubscribe
        footer = Footer(unsub.footer_text, unsub.footer_html) if unsub.footer else None
        links = BodyLinks.find(base.header_bytes(), base.body, unsub.placeholder, footer)
        outcome = "none" if links is None else "footer" if links.footer else "placeholder"
        self._metrics.body_links.labels(outcome).inc()
        return links

    async def _mailto_codes(
        self, base: Message, rcpts: tuple[str, ...], route: Route, queue_id: str
    ) -> dict[str, str]:
        """Each marketing recipient's mailto code, stored in one round trip.

        Without Redis the copies still go out, their mailto address without a code
        (the token in its subject still works where the client keeps the subject).
        """
        if self._mailto is None:
            return {}
        group_name = route.group or self._policy.config.default_group
        group = self._policy.config.groups.get(group_name)
        if headers.mailto_address(group, self._config.unsubscribe.mailto_address) is None:
            return {}
        sender = route.sender if route.unsubscribe_scope == "sender" else None
        try:
            return await self._mailto.issue(rcpts, group_name, route.unsubscribe_scope, sender)
        except StoreUnavailable as exc:
            self._metrics.redis_errors.labels("mailto-without-code").inc()
            log.warning("mailto codes not stored", id=queue_id, error=exc)
            return {}

    @staticmethod
    def _keeps_app(message: Message, route: Route) -> bool:
        return route.keep_app_unsubscribe and headers.app_https_unsubscribe(message) is not None

    def _copies(
        self,
        base: Message,
        rcpts: tuple[str, ...],
        route: Route,
        keys: list[DkimKey],
        bh: bytes,
        mail_from: str,
        queue_id: str,
        split_shared: bool = True,
        extra: _Personal | None = None,
    ) -> Iterator[_Copy]:
        """The signed copies to send, built one at a time as the delivery workers ask.

        With VERP on, a copy shared by several recipients (transactional mail, an
        application's own List-Unsubscribe) is signed once and sent once per recipient,
        each with its own return path.
        """
        extra = extra or _Personal()
        shared = None
        if not route.is_marketing:
            shared = self._sign(base, keys, bh)
        elif self._keeps_app(base, route):
            fixed = base.replace(
                remove=("list-unsubscribe-post",),
                append=[
                    Header.build("List-Unsubscribe-Post", headers.ONE_CLICK),
                    *self._compliance(route, None),
                ],
            )
            shared = self._sign(fixed, keys, bh)
        if shared is not None:
            if self._verp is None or not mail_from or not split_shared:
                yield _Copy(rcpts, shared, base.body, mail_from)
                return
            for rcpt in rcpts:
                return_path = self._return_path(mail_from, rcpt, route.group, queue_id)
                yield _Copy((rcpt,), shared, base.body, return_path)
            return
        group_name = route.group or self._policy.config.default_group
        group = self._policy.config.groups.get(group_name)
        public_url = self._config.http.public_url
        sender = route.sender if route.unsubscribe_scope == "sender" else None
        for rcpt in rcpts:
            try:
                token = self._tokens.issue(rcpt, group_name, route.unsubscribe_scope, sender)
                url = headers.unsubscribe_url(public_url, token)
                fields = headers.one_click_headers(
                    url,
                    group,
                    token,
                    self._config.unsubscribe.mailto_address,
                    extra.codes.get(rcpt),
                )
                personal = base.replace(prepend=[*fields, *self._compliance(route, token)])
                copy_bh = bh
                if extra.links is not None:  # before signing: the body hash is this copy's
                    personal = personal.with_body(extra.links.render(url))
                    copy_bh = body_hash(personal.body) if keys else b""
                return_path = self._return_path(mail_from, rcpt, group_name, queue_id)
                signed = self._sign(personal, keys, copy_bh)
            except Exception:  # one recipient's copy must not stop the others
                log.exception("copy not built", id=queue_id, rcpt=rcpt)
                yield _Copy((rcpt,), (), base.body, mail_from, BUILD_FAILED)
                continue
            yield _Copy((rcpt,), signed, personal.body, return_path)

    def _compliance(self, route: Route, token: str | None) -> list[Header]:
        """CFBL-Address, CFBL-Feedback-ID (the copy's token) and Feedback-ID, as configured."""
        group_name = route.group or self._policy.config.default_group
        return headers.compliance_headers(
            self._config.compliance,
            self._policy.config.groups.get(group_name),
            group_name,
            domain_of(route.sender),
            token,
        )

    def _sign(self, message: Message, keys: list[DkimKey], bh: bytes) -> tuple[Header, ...]:
        """The copy's header block: the signatures on top of the signed fields."""
        if not keys:
            return message.headers
        with self._stage("sign"):
            signatures = self._signer.sign(message, keys, bh)
        return (*signatures, *message.headers)

    async def _deliver(
        self, copies: Iterator[_Copy], recipients: int
    ) -> tuple[dict[str, SmtpReply], dict[str, _Copy]]:
        """All copies over the pool, at most ``upstream.connections`` at a time.

        Copies are built lazily, so a 1,000-recipient newsletter never holds 1,000
        signed copies in memory: at most one whole copy per connection is in flight, and a
        deferred copy is kept as its header block only (the body is the message's).
        Answers the reply per recipient and each deferred recipient's copy.
        """
        replies: dict[str, SmtpReply] = {}
        deferred: dict[str, _Copy] = {}

        async def worker() -> None:
            for copy in copies:
                if copy.failed is not None:
                    replies.update(dict.fromkeys(copy.recipients, copy.failed))
                    continue
                out = Outbound(copy.mail_from, copy.recipients, copy.data)
                try:
                    result = await self._upstream.send(out)
                except Exception:  # not a reply: a bug; the copy is deferred, not lost
                    log.exception("upstream send failed", rcpts=len(copy.recipients))
                    result = dict.fromkeys(copy.recipients, INTERNAL)
                replies.update(result)
                for rcpt, reply in result.items():
                    if reply.is_temporary:
                        deferred[rcpt] = copy

        workers = min(recipients, self._upstream.connections)
        await asyncio.gather(*(worker() for _ in range(workers)))
        for reply in replies.values():
            self._metrics.upstream_replies.labels(f"{reply.code // 100}xx").inc()
        return replies, deferred

    async def _answer(
        self, envelope: Envelope, deferred_copies: dict[str, _Copy], trace: Trace
    ) -> SmtpReply:
        replies = trace.replies
        accepted = [r for r, reply in replies.items() if reply.is_success]
        deferred = [r for r, reply in replies.items() if reply.is_temporary]
        refused = [r for r, reply in replies.items() if reply.is_permanent]
        if not accepted:
            return next((replies[r] for r in deferred), None) or replies[refused[0]]
        queued = 0
        # copies share one body (one stored body per message), unless a body link made
        # each copy's its own: one queued message per distinct body object
        by_body: dict[int, tuple[bytes, list[RetryCopy]]] = {}
        for rcpt in deferred:
            copy = deferred_copies.get(rcpt)
            if copy is None or copy.failed is not None:
                # other copies were accepted: refuse this one rather than 4xx the message
                log.error(
                    "deferred copy not queued", id=trace.queue_id, rcpt=rcpt, reason="not built"
                )
                replies[rcpt] = NOT_QUEUED
                self._metrics.retry.labels("not-queued").inc()
                continue
            item = RetryCopy(copy.mail_from, rcpt, copy.head, str(replies[rcpt]))
            by_body.setdefault(id(copy.body), (copy.body, []))[1].append(item)
        for body, items in by_body.values():
            try:
                await self._retry.put_message(items, body, self._upstream.identity)
            except StoreUnavailable as exc:
                log.error(
                    "deferred copies not queued",
                    id=trace.queue_id,
                    rcpts=len(items),
                    error=str(exc),
                    effect="refused",
                )
                for item in items:
                    replies[item.rcpt] = NOT_QUEUED
                self._metrics.retry.labels("not-queued").inc(len(items))
            else:
                queued += len(items)
                self._metrics.retry.labels("queued").inc(len(items))
        trace.queued = queued
        deferred = [r for r in deferred if replies[r].is_temporary]
        refused = [r for r, reply in replies.items() if reply.is_permanent]
        parts = [f"delivered {len(accepted)}"]
        if deferred:
            parts.append(f"queued {len(deferred)}")
        if refused:
            parts.append(f"refused {len(refused)}")
        if trace.suppressed:
            parts.append(f"suppressed {trace.suppressed}")
        return SmtpReply(250, "2.0.0", f"Ok: {', '.join(parts)} id={trace.queue_id}")

    def _record(self, envelope: Envelope, trace: Trace, reply: SmtpReply, ms: float) -> None:
        route = trace.route
        message_class = route.message_class if route else "unknown"
        replies = trace.replies
        delivered = sum(1 for r in replies.values() if r.is_success)
        refused = sum(1 for r in replies.values() if r.is_permanent)
        if not reply.is_success:
            outcome = "tempfail" if reply.is_temporary else "permfail"
            if route is None:
                outcome = "rejected"
        elif not replies:
            outcome = "suppressed"
        elif delivered == len(replies):
            outcome = "delivered"
        else:
            outcome = "partial"
        self._metrics.messages.labels(message_class, outcome).inc()
        if delivered:
            self._counters.add("sent", route.group if route else None, delivered)
        for name, count in (
            ("delivered", delivered),
            ("queued", trace.queued),
            ("refused", refused),
            ("suppressed", trace.suppressed),
        ):
            if count:
                self._metrics.recipients.labels(message_class, name).inc(count)
        for rcpt, r in replies.items():
            if not r.is_success:
                log.info("recipient", id=trace.queue_id, rcpt=rcpt, reply=r)
        log.info(
            "message",
            id=trace.queue_id,
            msgid=trace.message_id,
            **{"from": trace.sender, "class": message_class},
            group=(route.group if route else None) or "-",
            rcpts=len(envelope.rcpt_tos),
            kept=trace.kept,
            suppressed=trace.suppressed,
            copies=len(replies) if route and route.is_marketing else min(1, len(replies)),
            dkim=trace.signed,
            reply=reply.code,
            enhanced=reply.enhanced,
            ms=round(ms, 1),
        )
